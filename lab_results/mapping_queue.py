"""Resolving the mapping queue: an administrator maps a held local code to a catalogue LOINC.

The mapping becomes a row of the local-code table (:class:`LabCodeMapping`, the sender's
facility, or ``*`` for every sender), the queue entry is marked resolved, and the orders held
with that code unmapped are verified again (:func:`lab_results.processing.reverify_for_code`):
released, alerted or kept on the lab worklist as if the code had been mapped from the start.
Idempotent: resolving again with the same LOINC changes nothing and re-verifies nothing; a
different LOINC for a resolved code is a conflict (the earlier mapping may have released
results already). Audited with the state before and after.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from lab_results.mapping import load_catalogue
from lab_results.models import LabCodeMapping, LabMappingQueueEntry
from lab_results.processing import reverify_for_code
from rdc_core.db import stable_id
from rdc_core.errors import ConflictError, InvalidInputError, NotFoundError
from rdc_core.settings import Settings
from rdc_core.storage import ObjectStore
from worklist.access import Principal, require_roles
from worklist.audit import record_access
from worklist.models import Role

__all__ = ["MappingResolutionOut", "resolve_mapping_entry"]

ANY_SENDER = "*"


class MappingResolutionOut(BaseModel):
    """What resolving one queue entry did."""

    entry_id: str
    facility: str  # the mapping's facility: the sender's, or "*" for every sender
    code_system: str
    code: str
    loinc: str
    analyte: str
    name_zh: str
    created: bool  # a new local-code row (False: it existed with this LOINC)
    reverified: list[str] = Field(default_factory=list)  # order (= exam) IDs verified again
    released: list[str] = Field(default_factory=list)
    held: list[str] = Field(default_factory=list)
    alerts: list[str] = Field(default_factory=list)


def _state(entry: LabMappingQueueEntry, mapping: LabCodeMapping | None) -> dict[str, Any]:
    return {
        "resolved_at": entry.resolved_at.isoformat() if entry.resolved_at else None,
        "resolved_loinc": entry.resolved_loinc,
        "mapping": (
            {"facility": mapping.facility, "local_code": mapping.local_code, "loinc": mapping.loinc}
            if mapping is not None
            else None
        ),
    }


def resolve_mapping_entry(
    session: Session,
    *,
    principal: Principal,
    entry_id: str,
    loinc: str,
    all_senders: bool,
    store: ObjectStore,
    settings: Settings,
    now: datetime,
) -> MappingResolutionOut:
    """Map the queue entry's code to ``loinc`` (a catalogue code) for its sender (or for
    every sender) and verify the held orders again (administrators of the lead hospital)."""
    require_roles(principal, {Role.ADMIN}, lead_only=True)
    entry = session.execute(
        select(LabMappingQueueEntry).where(LabMappingQueueEntry.id == entry_id).with_for_update()
    ).scalar_one_or_none()
    if entry is None:
        raise NotFoundError(f"no mapping-queue entry {entry_id}")
    target = load_catalogue().by_loinc(loinc.strip())
    if target is None:
        raise InvalidInputError(f"LOINC {loinc.strip()} is not in the alliance test catalogue")
    facility = ANY_SENDER if all_senders else entry.facility
    mapping = session.execute(
        select(LabCodeMapping).where(
            LabCodeMapping.facility == facility,
            LabCodeMapping.code_system == entry.code_system,
            LabCodeMapping.local_code == entry.code,
        )
    ).scalar_one_or_none()
    if entry.resolved_loinc and entry.resolved_loinc != target.loinc:
        raise ConflictError(
            f"{entry.code} is already mapped to LOINC {entry.resolved_loinc}; "
            "results may have been released under it"
        )
    if mapping is not None and mapping.loinc != target.loinc:
        raise ConflictError(
            f"{entry.code} of {facility} is already mapped to LOINC {mapping.loinc}"
        )
    before = _state(entry, mapping)
    created = mapping is None
    if mapping is None:
        mapping = LabCodeMapping(
            id=stable_id("lab_code_mapping", facility, entry.code_system, entry.code),
            facility=facility,
            code_system=entry.code_system,
            local_code=entry.code,
            loinc=target.loinc,
            created_by=principal.user_id,
            created_at=now,
        )
        session.add(mapping)
    if entry.resolved_at is None:
        entry.resolved_at = now
        entry.resolved_loinc = target.loinc
    session.flush()
    outcome = reverify_for_code(
        session, facility=facility, code=entry.code, store=store, settings=settings, now=now
    )
    out = MappingResolutionOut(
        entry_id=entry.id,
        facility=facility,
        code_system=entry.code_system,
        code=entry.code,
        loinc=target.loinc,
        analyte=target.analyte,
        name_zh=target.name_zh,
        created=created,
        reverified=outcome.orders,
        released=outcome.released,
        held=outcome.held,
        alerts=outcome.alerts,
    )
    if created or outcome.orders:
        record_access(
            session,
            principal,
            action="lab.mapping.resolve",
            object_type="lab_mapping_queue",
            object_id=entry.id,
            detail={
                "before": before,
                "after": _state(entry, mapping),
                "reverified": outcome.orders,
                "released": outcome.released,
            },
        )
    return out
