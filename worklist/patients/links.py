"""Which clinic patient rows belong to the same person: the SQL the readers of the index
(priors, recognised results) build on. Only the index's tables, so anything may import it."""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy import or_, select
from sqlalchemy.orm import QueryableAttribute
from sqlalchemy.sql import ColumnElement

from worklist.patients.models import PersonLink

__all__ = ["same_person_clause"]


def same_person_clause(
    column: ColumnElement[str] | QueryableAttribute[str], patient_refs: Collection[str]
) -> ColumnElement[bool]:
    """``column`` (a patient reference) is one of ``patient_refs`` or a patient row linked
    to the same person as one of them."""
    persons = select(PersonLink.person_id).where(PersonLink.patient_ref.in_(list(patient_refs)))
    linked = select(PersonLink.patient_ref).where(PersonLink.person_id.in_(persons))
    return or_(column.in_(list(patient_refs)), column.in_(linked))
