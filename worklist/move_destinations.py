"""A clinic's C-MOVE destinations: the AE titles (its PACS, its workstations) the centre may
send the clinic's own studies to when the clinic asks by C-MOVE. A destination flagged TLS
is reached over DICOM TLS with the push-backs' client context."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Boolean, ForeignKey, Integer, String, false, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from rdc_core.db import Base, upsert, utcnow
from rdc_core.errors import InvalidInputError
from worklist.audit import record_event
from worklist.directory import get_organization

__all__ = [
    "MoveDestinationRecord",
    "MoveDestinationRef",
    "add_move_destination",
    "move_destination_for",
    "parse_move_destination",
]

_SPEC = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:@]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})$")


class MoveDestinationRecord(Base):
    """One registered move destination of a clinic (AE title unique within the clinic)."""

    __tablename__ = "dicom_move_destinations"

    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), primary_key=True)
    ae_title: Mapped[str] = mapped_column(String(16), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    tls: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


@dataclass(frozen=True, slots=True)
class MoveDestinationRef:
    """A move destination: AE title, host and port; ``tls``: reached over DICOM TLS."""

    ae_title: str
    host: str
    port: int
    tls: bool = False


def parse_move_destination(spec: str, *, tls: bool = False) -> MoveDestinationRef:
    """``AE@host:port`` -> MoveDestinationRef; raises InvalidInputError."""
    match = _SPEC.match(spec.strip())
    if match is None:
        raise InvalidInputError(f"move destination {spec!r} is not AE@host:port")
    port = int(match["port"])
    if not 0 < port < 65536:
        raise InvalidInputError(f"move destination {spec!r}: port out of range")
    ae = match["ae"].strip()
    if not ae or not ae.isascii() or "\\" in ae:
        raise InvalidInputError(f"move destination {spec!r}: invalid AE title")
    return MoveDestinationRef(ae.upper(), match["host"].strip("[]"), port, tls)


def add_move_destination(
    session: Session, *, org_code: str, spec: str, tls: bool = False, actor: str = "cli"
) -> MoveDestinationRef:
    """Register (or re-point) a move destination of the clinic ``org_code``; ``tls``: it
    is reached over DICOM TLS."""
    destination = parse_move_destination(spec, tls=tls)
    org = get_organization(session, code=org_code)
    upsert(
        session,
        MoveDestinationRecord.__table__,
        {
            "org_id": org.id,
            "ae_title": destination.ae_title,
            "host": destination.host,
            "port": destination.port,
            "tls": destination.tls,
            "created_at": utcnow(),
        },
        conflict=["org_id", "ae_title"],
        update=["host", "port", "tls"],
    )
    record_event(
        session,
        actor=actor,
        action="move_destination.set",
        object_type="organization",
        object_id=org.id,
        org_id=org.id,
        detail={
            "ae_title": destination.ae_title,
            "host": destination.host,
            "port": destination.port,
            "tls": destination.tls,
        },
    )
    return destination


def move_destination_for(
    session: Session, *, org_id: str, ae_title: str
) -> MoveDestinationRef | None:
    """The clinic's move destination called ``ae_title``, or None."""
    row = session.execute(
        select(MoveDestinationRecord).where(
            MoveDestinationRecord.org_id == org_id,
            MoveDestinationRecord.ae_title == ae_title.strip().upper(),
        )
    ).scalar_one_or_none()
    if row is None:
        return None
    return MoveDestinationRef(row.ae_title, row.host, row.port, row.tls)
