"""Portal notifications of every kind (critical values, new report versions, ...): created
by services in their own transaction, listed and marked read by their recipients."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, Select, and_, func, or_, select, update
from sqlalchemy.orm import Session

from rdc_core.db import insert_ignore, stable_id
from rdc_core.errors import InvalidInputError, NotFoundError
from worklist.access import Principal
from worklist.audit import record_access
from worklist.critical_values.models import Notification
from worklist.critical_values.schemas import NotificationOut
from worklist.schemas import Page

__all__ = [
    "BilingualText",
    "add_notification",
    "list_notifications",
    "mark_notification_read",
    "notification_out",
    "notify",
]

# "中文 / English" in one string, or the two languages apart as (zh, en).
BilingualText = str | tuple[str, str]
MAX_PAGE = 500


def _texts(text: BilingualText) -> tuple[str, str]:
    if isinstance(text, tuple):
        zh, en = text
    else:
        zh = en = text
    if not (zh.strip() and en.strip()):
        raise InvalidInputError("a notification needs a text")
    return zh.strip(), en.strip()


def add_notification(
    session: Session,
    *,
    org_id: str,
    user_id: str | None,
    kind: str,
    subject_type: str,
    subject_id: str,
    text: BilingualText,
    now: datetime,
    key: str = "",
    recipient_name: str | None = None,
    recipient_phone: str | None = None,
) -> str | None:
    """Insert one notification (idempotent: the same event for the same recipient is one
    row); returns its ID when it was new, None when it existed already."""
    zh, en = _texts(text)
    recipient = f"user:{user_id}" if user_id else f"org:{org_id}:{recipient_name or ''}"
    notification_id = stable_id("notification", kind, subject_type, subject_id, key, recipient)
    inserted = insert_ignore(
        session,
        Notification.__table__,
        {
            "id": notification_id,
            "org_id": org_id,
            "user_id": user_id,
            "recipient_name": recipient_name,
            "recipient_phone": recipient_phone,
            "kind": kind,
            "subject_type": subject_type,
            "subject_id": subject_id,
            "text_zh": zh,
            "text_en": en,
            "channel": "portal",
            "created_at": now,
            "notified_at": now,
        },
        conflict=["id"],
    )
    return notification_id if inserted else None


def notify(
    session: Session,
    *,
    org_id: str,
    user_ids: Iterable[str] | None = None,
    kind: str,
    subject_type: str,
    subject_id: str,
    text: BilingualText,
    now: datetime,
    key: str = "",
) -> list[str]:
    """Notify users of organisation ``org_id`` in the portal; returns the IDs of the new rows.

    ``user_ids`` None addresses the whole organisation (one row every user of it sees);
    otherwise one row per user. ``text`` is bilingual: ``(zh, en)`` or one string holding
    both. Idempotent: calling again for the same ``kind``/subject/``key`` and recipient
    adds nothing, so retries are safe; give a different ``key`` for a new event about the
    same subject (e.g. the version number).
    """
    recipients: list[str | None] = list(dict.fromkeys(user_ids)) if user_ids is not None else [None]
    created = []
    for user_id in recipients:
        new = add_notification(
            session,
            org_id=org_id,
            user_id=user_id,
            kind=kind,
            subject_type=subject_type,
            subject_id=subject_id,
            text=text,
            now=now,
            key=key,
        )
        if new:
            created.append(new)
    return created


def notification_out(row: Notification) -> NotificationOut:
    """The API view of a notification."""
    text = row.text_zh if row.text_zh == row.text_en else f"{row.text_zh} / {row.text_en}"
    return NotificationOut(
        id=row.id,
        kind=row.kind,
        subject_type=row.subject_type,
        subject_id=row.subject_id,
        text=text,
        text_zh=row.text_zh,
        text_en=row.text_en,
        channel=row.channel,
        recipient_name=row.recipient_name,
        recipient_phone=row.recipient_phone,
        created_at=row.created_at,
        read_at=row.read_at,
    )


def _mine(principal: Principal) -> Any:
    return or_(
        Notification.user_id == principal.user_id,
        and_(Notification.user_id.is_(None), Notification.org_id == principal.org_id),
    )


def list_notifications(
    session: Session,
    *,
    principal: Principal,
    unread_only: bool = True,
    kind: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> Page[NotificationOut]:
    """The caller's notifications (addressed to them, or to their whole organisation),
    newest first; by default only the unread ones (audited)."""
    if not 1 <= limit <= MAX_PAGE or offset < 0:
        raise InvalidInputError(f"limit must be 1-{MAX_PAGE} and offset not negative")
    stmt: Select[Any] = select(Notification).where(_mine(principal))
    if unread_only:
        stmt = stmt.where(Notification.read_at.is_(None))
    if kind:
        stmt = stmt.where(Notification.kind == kind)
    total = session.execute(select(func.count()).select_from(stmt.subquery())).scalar_one()
    rows = (
        session.execute(
            stmt.order_by(Notification.created_at.desc(), Notification.id)
            .limit(limit)
            .offset(offset)
        )
        .scalars()
        .all()
    )
    items = [notification_out(r) for r in rows]
    record_access(
        session,
        principal,
        action="list",
        object_type="notification",
        detail={"notification_ids": [n.id for n in items]},
    )
    return Page[NotificationOut](items=items, total=total, limit=limit, offset=offset)


def mark_notification_read(
    session: Session, *, principal: Principal, notification_id: str, now: datetime
) -> NotificationOut:
    """Mark one of the caller's notifications read (again: keeps the first time). Someone
    else's notification is not found."""
    row = session.execute(
        select(Notification).where(Notification.id == notification_id, _mine(principal))
    ).scalar_one_or_none()
    if row is None:
        raise NotFoundError(f"no notification {notification_id}")
    result = session.execute(
        update(Notification)
        .where(Notification.id == row.id, Notification.read_at.is_(None))
        .values(read_at=now)
        .execution_options(synchronize_session=False)
    )
    if cast(CursorResult[Any], result).rowcount:
        session.refresh(row)
    record_access(session, principal, action="read", object_type="notification", object_id=row.id)
    return notification_out(row)
