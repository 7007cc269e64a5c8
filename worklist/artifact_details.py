"""Artifact details: the seam through which an ingester tells the hub what it knows about
its own artifacts, without the hub importing it or naming its formats.

The hub keeps one generic :class:`~worklist.models.Artifact` row per stored object (kind,
ref, object key, size, SHA-256, received at, source). What only the ingester knows (for a
DICOM instance: series, instance number, frame count, SOP class, transfer syntax) lives in
its own detail table. An ingester registers one :class:`ArtifactDetails` per artifact kind at
import (``dicom_gateway.models`` registers the ``instance`` kind)::

    from worklist.artifact_details import register_artifact_details

    register_artifact_details(DicomInstanceDetails())

The hub asks the registered providers for

- the objects a signed report names (:func:`signed_objects`),
- the listing of an exam's objects in the exam detail (:func:`exam_objects`),
- how many frames each marked key image has (:func:`frame_counts`),
- a SQL condition "this artifact is in one of these formats" (:func:`format_clause`), with
  which a discipline package (ECG) finds the artifacts it can read.

With no provider registered (a process that loaded no ingester), every answer is empty: the
hub works on its own columns.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import false, or_

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement
    from sqlalchemy.orm import QueryableAttribute, Session

__all__ = [
    "ArtifactDetails",
    "artifact_details",
    "exam_objects",
    "format_clause",
    "frame_counts",
    "register_artifact_details",
    "signed_objects",
]


class ArtifactDetails(Protocol):
    """What an ingester answers about its artifacts of one :attr:`kind`."""

    kind: str

    def signed_objects(self, session: Session, *, exam_id: str) -> list[dict[str, Any]]:
        """The exam's objects as the signed report document names them (plain JSON values,
        in a stable order)."""
        ...

    def exam_objects(self, session: Session, *, exam_id: str) -> list[Mapping[str, Any]]:
        """The exam's objects for the exam detail (``ExamDetail.instances``)."""
        ...

    def frame_counts(
        self, session: Session, *, exam_id: str, refs: Collection[str]
    ) -> dict[str, int]:
        """Frames per artifact ``ref`` of the exam (refs not found are left out)."""
        ...

    def format_clause(
        self, artifact_id: ColumnElement[str] | QueryableAttribute[str], formats: Collection[str]
    ) -> ColumnElement[bool]:
        """SQL: the artifact with this ID is in one of ``formats`` (e.g. SOP class UIDs)."""
        ...


_lock = threading.Lock()
_providers: dict[str, ArtifactDetails] = {}


def register_artifact_details(details: ArtifactDetails) -> None:
    """Register (or replace) the provider of one artifact kind."""
    with _lock:
        _providers[details.kind] = details


def artifact_details() -> list[ArtifactDetails]:
    """The registered providers, by kind."""
    with _lock:
        return [_providers[kind] for kind in sorted(_providers)]


def signed_objects(session: Session, *, exam_id: str) -> list[dict[str, Any]]:
    return [o for p in artifact_details() for o in p.signed_objects(session, exam_id=exam_id)]


def exam_objects(session: Session, *, exam_id: str) -> list[Mapping[str, Any]]:
    return [o for p in artifact_details() for o in p.exam_objects(session, exam_id=exam_id)]


def frame_counts(session: Session, *, exam_id: str, refs: Collection[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for provider in artifact_details():
        counts.update(provider.frame_counts(session, exam_id=exam_id, refs=refs))
    return counts


def format_clause(
    artifact_id: ColumnElement[str] | QueryableAttribute[str], formats: Collection[str]
) -> ColumnElement[bool]:
    clauses = [p.format_clause(artifact_id, formats) for p in artifact_details()]
    return or_(*clauses) if clauses else false()
