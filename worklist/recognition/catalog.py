"""Reference data of mutual recognition: the versioned catalogue of recognised items and
institutions' QC accreditations, loaded from CSV or YAML.

Loading is all-or-nothing: every row is checked first and any bad row raises
InvalidInputError naming it, before anything is written (the caller's transaction holds the
rest). A catalogue load whose content equals the current version changes nothing.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from rdc_core.db import stable_id, upsert
from rdc_core.errors import InvalidInputError
from worklist.access import Principal, require_roles
from worklist.audit import record_access, record_event
from worklist.models import Discipline, Organization, QualityGrade, Role
from worklist.recognition.models import Accreditation, CatalogItem, CatalogVersion

__all__ = [
    "AccreditationLoad",
    "CatalogLoad",
    "accreditation_out",
    "catalog_items",
    "catalog_versions",
    "current_catalog",
    "item_out",
    "list_accreditations",
    "load_accreditations",
    "load_catalog",
    "parse_records",
]

FORMATS = ("csv", "yaml")
# HR: within the alliance; a province's abbreviation + HR (皖HR); 全国HR: nationwide;
# ★: a scope explained by the item's footnote.
_MARK = re.compile(r"^(?:全国|[\u4e00-\u9fff])?HR$|^★$")
_CODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_GRADES = {"甲": QualityGrade.A, "乙": QualityGrade.B, "丙": QualityGrade.C}
_GRADES.update({"A": QualityGrade.A, "B": QualityGrade.B, "C": QualityGrade.C})
_MAX_ERRORS = 20


@dataclass(frozen=True)
class CatalogLoad:
    """The outcome of loading a catalogue file."""

    version: int
    created: bool
    item_count: int


@dataclass(frozen=True)
class AccreditationLoad:
    """The outcome of loading an accreditation file."""

    inserted: int
    updated: int
    unchanged: int


def parse_records(text: str, fmt: str, *, key: str) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a CSV (header row) or YAML (a list, or a mapping holding the list under
    ``key``) document, each with a label naming it in error messages ("row 3")."""
    if fmt == "csv":
        reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
        if not reader.fieldnames:
            raise InvalidInputError("the CSV file is empty (a header row is required)")
        rows = []
        for record in reader:
            if None in record:
                raise InvalidInputError(f"row {reader.line_num}: more fields than the header")
            if not any((v or "").strip() for v in record.values()):
                continue  # blank line
            rows.append((f"row {reader.line_num}", {k.strip(): v for k, v in record.items()}))
        return rows
    if fmt != "yaml":
        raise InvalidInputError(f"format must be one of {', '.join(FORMATS)}")
    try:
        import yaml
    except ImportError as exc:  # pyyaml is optional at run time
        raise InvalidInputError("YAML needs the pyyaml package (pip install pyyaml)") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidInputError(f"not valid YAML: {exc}") from exc
    if isinstance(data, dict):
        data = data.get(key)
    if not isinstance(data, list):
        raise InvalidInputError(f"YAML must be a list of entries or a mapping with {key!r}")
    out = []
    for n, entry in enumerate(data, start=1):
        if not isinstance(entry, dict):
            raise InvalidInputError(f"entry {n}: must be a mapping")
        flat = dict(entry)
        match = flat.pop("match", None)
        if isinstance(match, dict):
            flat.update(match)
        out.append((f"entry {n}", flat))
    return out


def _text(row: dict[str, Any], name: str) -> str:
    value = row.get(name)
    return "" if value is None else str(value).strip()


def _raise_collected(errors: list[str]) -> None:
    if errors:
        more = f" (and {len(errors) - _MAX_ERRORS} more)" if len(errors) > _MAX_ERRORS else ""
        raise InvalidInputError("; ".join(errors[:_MAX_ERRORS]) + more + "; nothing was changed")


def _codes(value: Any) -> list[str]:
    if value is None:
        return []
    parts = value if isinstance(value, list) else re.split(r"[;,\s|]+", str(value))
    return sorted({str(p).strip() for p in parts if str(p).strip()})


def _catalog_item(row: dict[str, Any]) -> dict[str, Any]:
    code = _text(row, "code")
    if not _CODE.match(code):
        raise ValueError("code: 1-64 letters, digits, . _ - (required)")
    try:
        discipline = Discipline(_text(row, "discipline").lower())
    except ValueError:
        raise ValueError("discipline must be imaging, ecg or lab") from None
    name_zh = _text(row, "name_zh") or _text(row, "name")
    if not name_zh:
        raise ValueError("name_zh is required")
    mark = _text(row, "scope_mark") or _text(row, "mark")
    if not _MARK.match(mark):
        raise ValueError(f"scope_mark {mark!r}: HR, a province + HR (e.g. 皖HR), 全国HR or ★")
    note = _text(row, "scope_note") or _text(row, "footnote")
    if mark == "★" and not note:
        raise ValueError("a ★ mark needs its footnote (scope_note)")
    try:
        valid_days = int(_text(row, "valid_days"))
    except ValueError:
        raise ValueError("valid_days must be a whole number of days") from None
    if not 1 <= valid_days <= 3650:
        raise ValueError("valid_days must be 1..3650")
    grade_text = _text(row, "min_grade").upper()
    if grade_text and grade_text not in _GRADES:
        raise ValueError("min_grade must be 甲, 乙 or 丙 (or A, B, C)")
    if grade_text and discipline is not Discipline.IMAGING:
        raise ValueError("min_grade applies to imaging items only")
    modality = _text(row, "modality").upper()
    if discipline is Discipline.IMAGING and not modality:
        raise ValueError("imaging items need a modality (e.g. CT)")
    return {
        "code": code,
        "discipline": discipline.value,
        "name_zh": name_zh,
        "name_en": _text(row, "name_en"),
        "scope_mark": mark,
        "scope_note": note,
        "valid_days": valid_days,
        "min_grade": _GRADES[grade_text].value if grade_text else None,
        "modality": modality,
        "body_part": _text(row, "body_part").upper(),
        "test_codes": _codes(row.get("test_codes")),
    }


def current_catalog(session: Session) -> CatalogVersion | None:
    """The newest catalogue version, or None before any catalogue was loaded."""
    return session.execute(
        select(CatalogVersion).order_by(CatalogVersion.version.desc()).limit(1)
    ).scalar_one_or_none()


_ADMIN = frozenset({Role.ADMIN})
_ACCREDITATION_READERS = frozenset({Role.ADMIN, Role.QC})


def _audit_change(
    session: Session,
    principal: Principal | None,
    action: str,
    object_id: str,
    detail: dict[str, Any],
) -> None:
    if principal is None:  # the administrator's shell (rdc catalog / rdc accreditation)
        record_event(
            session,
            actor="cli",
            action=action,
            object_type="recognition",
            object_id=object_id,
            detail=detail,
        )
    else:
        record_access(
            session,
            principal,
            action=action,
            object_type="recognition",
            object_id=object_id,
            detail=detail,
        )


def load_catalog(
    session: Session,
    *,
    text: str,
    fmt: str,
    source: str,
    principal: Principal | None,
    now: datetime,
) -> CatalogLoad:
    """Load a whole catalogue: a new version when the content differs from the current one
    (older versions stay for the decisions that used them), nothing when it is the same.

    ``principal`` None is the local administrator (the CLI); otherwise an admin only.
    """
    if principal is not None:
        require_roles(principal, _ADMIN, lead_only=True)
    loaded_by = principal.actor if principal else "cli"
    items: list[dict[str, Any]] = []
    errors: list[str] = []
    seen: set[str] = set()
    for label, row in parse_records(text, fmt, key="items"):
        try:
            item = _catalog_item(row)
        except ValueError as exc:
            errors.append(f"{label}: {exc}")
            continue
        if item["code"] in seen:
            errors.append(f"{label}: code {item['code']} appears twice")
        seen.add(item["code"])
        items.append(item)
    _raise_collected(errors)
    if not items:
        raise InvalidInputError("the catalogue has no items; nothing was changed")
    items.sort(key=lambda i: i["code"])
    canonical = json.dumps(items, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    current = current_catalog(session)
    if current is not None and current.content_sha256 == digest:
        return CatalogLoad(version=current.version, created=False, item_count=current.item_count)
    _audit_change(
        session, principal, "load_catalog", digest, {"items": len(items), "source": source}
    )
    version = (session.execute(select(func.max(CatalogVersion.version))).scalar() or 0) + 1
    session.add(
        CatalogVersion(
            version=version,
            content_sha256=digest,
            item_count=len(items),
            source=source[:300],
            loaded_by=loaded_by[:100],
            loaded_at=now,
        )
    )
    session.flush()
    for item in items:
        session.add(
            CatalogItem(
                id=stable_id("recognition_item", str(version), item["code"]),
                catalog_version=version,
                **{
                    **item,
                    "min_grade": QualityGrade(item["min_grade"]) if item["min_grade"] else None,
                },
            )
        )
    session.flush()
    return CatalogLoad(version=version, created=True, item_count=len(items))


def item_out(item: CatalogItem) -> dict[str, Any]:
    """A catalogue item as plain JSON."""
    return {
        "code": item.code,
        "discipline": item.discipline.value,
        "name_zh": item.name_zh,
        "name_en": item.name_en,
        "scope_mark": item.scope_mark,
        "scope_note": item.scope_note,
        "valid_days": item.valid_days,
        "min_grade": item.min_grade.value if item.min_grade else None,
        "modality": item.modality,
        "body_part": item.body_part,
        "test_codes": list(item.test_codes or []),
        "catalog_version": item.catalog_version,
    }


def catalog_items(session: Session, *, version: int) -> list[CatalogItem]:
    """The items of one catalogue version, by code."""
    return list(
        session.execute(
            select(CatalogItem)
            .where(CatalogItem.catalog_version == version)
            .order_by(CatalogItem.code)
        ).scalars()
    )


def catalog_versions(session: Session) -> list[dict[str, Any]]:
    """Every catalogue version, newest first."""
    rows = session.execute(select(CatalogVersion).order_by(CatalogVersion.version.desc()))
    return [
        {
            "version": v.version,
            "item_count": v.item_count,
            "content_sha256": v.content_sha256,
            "source": v.source,
            "loaded_by": v.loaded_by,
            "loaded_at": v.loaded_at.isoformat(),
        }
        for v in rows.scalars()
    ]


def _date(row: dict[str, Any], name: str) -> date:
    value = row.get(name)
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):  # YAML reads bare dates itself
        return value
    try:
        return date.fromisoformat(_text(row, name))
    except ValueError:
        raise ValueError(f"{name} must be a date YYYY-MM-DD") from None


def _accreditation(
    row: dict[str, Any], orgs: dict[str, str], item_disciplines: dict[str, Discipline]
) -> dict[str, Any]:
    org_code = _text(row, "org") or _text(row, "institution") or _text(row, "org_code")
    if org_code not in orgs:
        raise ValueError(f"unknown organisation {org_code!r}" if org_code else "org is required")
    item_code = _text(row, "item_code") or _text(row, "item")
    given = _text(row, "discipline").lower()
    if given and given not in {d.value for d in Discipline}:
        raise ValueError("discipline must be imaging, ecg or lab")
    if not item_code and not given:
        raise ValueError("give item_code (one item) or discipline (the whole discipline)")
    if item_code and not _CODE.match(item_code):
        raise ValueError("item_code: 1-64 letters, digits, . _ -")
    discipline = Discipline(given) if given else item_disciplines.get(item_code)
    if discipline is None:
        raise ValueError(f"item {item_code} is not in the current catalogue: give its discipline")
    if item_code in item_disciplines and item_disciplines[item_code] is not discipline:
        raise ValueError(
            f"item {item_code} is {item_disciplines[item_code].value}, not {discipline.value}"
        )
    valid_from, valid_to = _date(row, "valid_from"), _date(row, "valid_to")
    if valid_to < valid_from:
        raise ValueError("valid_to is before valid_from")
    return {
        "org_id": orgs[org_code],
        "discipline": discipline,
        "item_code": item_code,
        "valid_from": valid_from,
        "valid_to": valid_to,
        "note": _text(row, "note"),
    }


def load_accreditations(
    session: Session, *, text: str, fmt: str, principal: Principal | None, now: datetime
) -> AccreditationLoad:
    """Upsert accreditations keyed by (organisation, discipline, item, valid_from); a row
    that exists with other dates or note updates it. ``principal`` None is the CLI;
    otherwise an admin only."""
    if principal is not None:
        require_roles(principal, _ADMIN, lead_only=True)
    orgs = dict(session.execute(select(Organization.code, Organization.id)).all())
    current = current_catalog(session)
    item_disciplines = (
        {i.code: i.discipline for i in catalog_items(session, version=current.version)}
        if current
        else {}
    )
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    keys: set[tuple[Any, ...]] = set()
    for label, record in parse_records(text, fmt, key="accreditations"):
        try:
            row = _accreditation(record, orgs, item_disciplines)
        except ValueError as exc:
            errors.append(f"{label}: {exc}")
            continue
        key = (row["org_id"], row["discipline"], row["item_code"], row["valid_from"])
        if key in keys:
            errors.append(f"{label}: the same accreditation appears twice")
        keys.add(key)
        rows.append(row)
    _raise_collected(errors)
    if not rows:
        raise InvalidInputError("the file has no accreditations; nothing was changed")
    counts = {"inserted": 0, "updated": 0, "unchanged": 0}
    for row in rows:
        row_id = stable_id(
            "accreditation",
            row["org_id"],
            row["discipline"].value,
            row["item_code"],
            row["valid_from"].isoformat(),
        )
        existing = session.get(Accreditation, row_id)
        if existing is None:
            counts["inserted"] += 1
        elif (existing.valid_to, existing.note) == (row["valid_to"], row["note"]):
            counts["unchanged"] += 1
            continue
        else:
            counts["updated"] += 1
        upsert(
            session,
            Accreditation.__table__,
            {**row, "discipline": row["discipline"].value, "id": row_id, "updated_at": now},
            conflict=["id"],
            update=["valid_to", "note", "updated_at"],
        )
    session.expire_all()
    _audit_change(session, principal, "load_accreditations", "*", counts)
    return AccreditationLoad(**counts)


def accreditation_out(acc: Accreditation, org_code: str) -> dict[str, Any]:
    """An accreditation as plain JSON."""
    return {
        "id": acc.id,
        "org": org_code,
        "discipline": acc.discipline.value,
        "item_code": acc.item_code or None,
        "valid_from": acc.valid_from.isoformat(),
        "valid_to": acc.valid_to.isoformat(),
        "note": acc.note,
    }


def list_accreditations(
    session: Session, *, principal: Principal | None, org: str | None = None
) -> list[dict[str, Any]]:
    """Every accreditation (optionally of one organisation code), by organisation and item
    (administrators and QC staff; ``principal`` None is the CLI)."""
    if principal is not None:
        require_roles(principal, _ACCREDITATION_READERS, lead_only=True)
    stmt = (
        select(Accreditation, Organization.code)
        .join(Organization, Organization.id == Accreditation.org_id)
        .order_by(
            Organization.code,
            Accreditation.discipline,
            Accreditation.item_code,
            Accreditation.valid_from,
        )
    )
    if org:
        stmt = stmt.where(Organization.code == org)
    return [accreditation_out(acc, code) for acc, code in session.execute(stmt)]
