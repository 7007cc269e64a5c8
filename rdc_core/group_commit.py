"""Group commit: many small units of work share one transaction and one durable commit.

A DICOM modality waits for each C-STORE answer, and every answer needs a committed index
row; with several associations the per-commit disk sync and the single-writer lock of
SQLite become the bottleneck. :class:`GroupCommitter` runs the units of work submitted by
many threads in one transaction, each inside its own savepoint (one failing unit does not
undo the others), commits once, and only then tells each caller its result.

A unit may also name a *bulk writer* (``bulk=(writer, item)``): the units of a batch that
name the same writer are first offered to it together, ``writer(session, items)``, which
writes the ones it can in a few set-wise statements (one savepoint for all of them) and
answers ``None`` for each it leaves to the unit's own ``work``. That keeps the time the
transaction (on SQLite: the one writer lock) is held per unit falling as batches grow.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from rdc_core.db import (
    direct_savepoint,
    new_session,
    run_after_commit,
    run_rollback_undos,
    session_connection,
)
from rdc_core.errors import DatabaseUnavailableError, TransactionLostError

__all__ = ["BulkWriter", "GroupCommitter"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Writes several units at once in the caller's transaction: one result per item, in order,
# or None for an item it leaves to the unit's own work. Raising leaves them all to it (the
# writer's statements are rolled back to a savepoint first).
BulkWriter = Callable[[Session, list[Any]], list[Any]]


@dataclass
class _Job(Generic[T]):
    work: Callable[[Session], T]
    wake: threading.Event = field(default_factory=threading.Event)
    finished: bool = False
    result: Any = None
    error: BaseException | None = None
    # For a unit queued with submit(): called with (result, error) once it is decided.
    done: Callable[[Any, BaseException | None], None] | None = None
    bulk: tuple[BulkWriter, Any] | None = None

    def finish(self) -> None:
        self.finished = True
        self.wake.set()
        if self.done is not None:
            try:
                self.done(self.result, self.error)
            except Exception:
                log.exception("the callback of a group-commit unit failed")


def _domain_error(exc: Exception) -> Exception:
    if isinstance(exc, OperationalError):
        return DatabaseUnavailableError(str(exc.orig or exc))
    return exc


class GroupCommitter:
    """Runs units of work from many threads in shared transactions.

    Leader/follower: a caller that finds no transaction in progress runs the queued units
    itself (so a lone caller pays no hand-over); callers arriving meanwhile queue up and the
    next transaction, run by the first of them, takes them all.

    The leader begins its transaction first (on SQLite that waits, blocked, for the writer
    lock that every process opening the database shares) and only then takes the queued
    units: every unit that arrived while it waited goes into that one transaction, so
    batches grow with the load instead of the lock being taken once per few units.
    """

    def __init__(self, *, max_batch: int = 512) -> None:
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._pending: list[_Job[Any]] = []
        self._leading = False
        self._writer: threading.Thread | None = None  # leads for submit(), made on first use
        self._wanted = threading.Event()

    def submit(
        self,
        work: Callable[[Session], T],
        done: Callable[[Any, BaseException | None], None],
        *,
        bulk: tuple[BulkWriter, Any] | None = None,
    ) -> None:
        """Queue ``work(session)`` without waiting for it: ``done(result, error)`` is called
        (in the committer's writer thread) once it is committed or has failed. For a thread
        that must go on reading requests, e.g. one serving many senders' requests."""
        job: _Job[T] = _Job(work, done=done, bulk=bulk)
        with self._lock:
            self._pending.append(job)
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_forever, name="rdc-group-commit", daemon=True
                )
                self._writer.start()
            if self._leading:
                return  # the transaction in progress hands on to the next leader
            self._leading = True
        self._wanted.set()

    def _write_forever(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            try:
                self._lead()
            except Exception:  # _lead fails units, never itself; keep the writer alive
                log.exception("group commit writer")

    def run(self, work: Callable[[Session], T], *, bulk: tuple[BulkWriter, Any] | None = None) -> T:
        """Run ``work(session)``; return its result once it is committed, or raise its error
        (DatabaseUnavailableError when the shared commit failed). ``bulk``: see the module."""
        job: _Job[T] = _Job(work, bulk=bulk)
        with self._lock:
            self._pending.append(job)
            lead = not self._leading
            self._leading = True
        if not lead:
            job.wake.wait()
        if not job.finished:  # woken to lead the next transaction
            self._lead()
        if job.error is not None:
            raise job.error
        return job.result

    def _lead(self) -> None:
        try:
            session = new_session()
            try:
                session_connection(session)  # BEGIN; on SQLite: the writer lock is ours
            except Exception as exc:
                self._fail(session, self._take(), exc)
            else:
                self._run_batch(session, self._take())
        finally:
            with self._lock:
                following = self._pending[0] if self._pending else None
                if following is None:
                    self._leading = False
                elif following.done is None:
                    following.wake.set()  # a caller of run(): it leads the next transaction
            if following is not None and following.done is not None:
                self._wanted.set()  # a submitted unit: the writer thread leads

    @staticmethod
    def _run_alone(session: Session, job: _Job[Any]) -> None:
        # A lone unit is its own transaction: no savepoint needed.
        try:
            job.result = job.work(session)
            session.commit()
        except Exception as exc:
            with contextlib.suppress(Exception):
                session.rollback()
            run_rollback_undos(session)
            job.error = _domain_error(exc)
        else:
            run_after_commit(session)

    def _take(self) -> list[_Job[Any]]:
        with self._lock:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
        return batch

    @staticmethod
    def _fail(session: Session, batch: list[_Job[Any]], exc: Exception) -> None:
        log.error("group commit of %d units could not begin: %s", len(batch), exc)
        with contextlib.suppress(Exception):
            session.close()
        failure = _domain_error(exc)
        if not isinstance(failure, DatabaseUnavailableError):
            failure = DatabaseUnavailableError(f"index transaction failed: {exc}")
        for job in batch:
            job.error = failure
            job.finish()

    @staticmethod
    def _run_bulk(session: Session, batch: list[_Job[Any]]) -> list[_Job[Any]]:
        """Offer the units that name a bulk writer to it, two or more at a time; return the
        units left to their own work."""
        groups: dict[Any, list[_Job[Any]]] = {}
        for job in batch:
            if job.bulk is not None:
                groups.setdefault(job.bulk[0], []).append(job)
        done: set[int] = set()
        for writer, jobs in groups.items():
            if len(jobs) < 2:
                continue
            mark = len(session.info.get("rdc_on_rollback", []))
            try:
                with direct_savepoint(session):
                    results = writer(session, [job.bulk[1] for job in jobs])  # type: ignore[index]
            except TransactionLostError:
                raise
            except Exception as exc:  # every unit tries on its own below
                log.warning("bulk write of %d units failed, one by one: %s", len(jobs), exc)
                # Forgotten, not run: each unit tries again (and registers its own) below.
                del session.info.get("rdc_on_rollback", [])[mark:]
                continue
            for job, result in zip(jobs, results, strict=True):
                if result is not None:
                    job.result = result
                    done.add(id(job))
        if not done:
            return batch
        return [job for job in batch if id(job) not in done]

    def _run_batch(self, session: Session, batch: list[_Job[Any]]) -> None:
        try:
            if len(batch) == 1:
                self._run_alone(session, batch[0])
                return
            for job in self._run_bulk(session, batch):
                mark = len(session.info.get("rdc_on_rollback", []))
                try:
                    with direct_savepoint(session):
                        job.result = job.work(session)
                except TransactionLostError:
                    raise  # every unit of the batch is lost: fail them all below
                except Exception as exc:
                    run_rollback_undos(session, since=mark)
                    job.error = _domain_error(exc)
            session.commit()
        except Exception as exc:
            log.error("group commit of %d units failed: %s", len(batch), exc)
            with contextlib.suppress(Exception):
                session.rollback()
            run_rollback_undos(session, since=0)
            failure = DatabaseUnavailableError(f"index commit failed: {exc}")
            for job in batch:
                if job.error is None:
                    job.error = failure
        else:
            run_after_commit(session)
        finally:
            session.close()
            for job in batch:
                job.finish()
