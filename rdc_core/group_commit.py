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

Several writers on one PostgreSQL database (two gateways, or a gateway and an import) lock
the same rows. A unit may give an ``order`` key: a batch runs its units in key order, so
writers take the rows of one key (e.g. a patient's, then an exam's) in the same order and
do not wait on each other in a circle. A unit that still loses a deadlock or a serialization
check (SQLSTATE 40P01, 40001), or whose batch's commit does, is run again in a fresh
transaction, a few times: its rollback undo actions are forgotten, not run, as the next
attempt relies on what they would remove (the object it stored).

:class:`Batcher` is the leader/follower scheme on its own, for other batched work (e.g. the
object store's synced writes).
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from rdc_core.db import (
    deferred_sync,
    direct_savepoint,
    new_session,
    run_after_commit,
    run_rollback_undos,
    session_connection,
    take_after_commit,
)
from rdc_core.errors import DatabaseUnavailableError, TransactionLostError

__all__ = ["BatchEntry", "Batcher", "BulkWriter", "GroupCommitter"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Writes several units at once in the caller's transaction: one result per item, in order,
# or None for an item it leaves to the unit's own work. Raising leaves them all to it (the
# writer's statements are rolled back to a savepoint first).
BulkWriter = Callable[[Session, list[Any]], list[Any]]


E = TypeVar("E", bound="BatchEntry")


class BatchEntry:
    """One piece of work queued with a :class:`Batcher`; subclasses carry the work."""

    def __init__(self, *, queued: bool = False) -> None:
        self.wake = threading.Event()
        self.finished = False
        # Queued with Batcher.submit (nobody waits on it): the batcher's thread leads for it.
        self.queued = queued

    def finish(self) -> None:
        """Mark it decided and wake its caller; the lead function calls it for every entry
        of a batch it took."""
        self.finished = True
        self.wake.set()


class Batcher(Generic[E]):
    """Leader/follower batching of entries from many threads.

    A caller of :meth:`run` that finds no batch in progress leads: it calls ``lead(take)``
    itself (a lone caller pays no hand-over); callers arriving meanwhile queue up and the
    first of them leads the next batch, which takes them all. ``lead`` calls ``take()``
    once it is ready for the entries (e.g. once it holds a lock: whatever arrived while it
    waited is in that batch, so batches grow with the load), processes them and calls
    :meth:`BatchEntry.finish` on each. Entries queued with :meth:`submit` are led by the
    batcher's own thread.
    """

    def __init__(
        self,
        lead: Callable[[Callable[[], list[E]]], None],
        *,
        max_batch: int,
        name: str = "rdc-batcher",
    ) -> None:
        self._handle = lead
        self._max_batch = max_batch
        self._name = name
        self._lock = threading.Lock()
        self._pending: list[E] = []
        self._leading = False
        self._thread: threading.Thread | None = None  # leads for submit(), made on first use
        self._wanted = threading.Event()

    @property
    def waiting(self) -> int:
        """How many entries are queued, not yet taken by a batch."""
        with self._lock:
            return len(self._pending)

    def run(self, entry: E) -> None:
        """Queue ``entry`` and return once it is finished (possibly led by this thread; the
        lead function may finish a batch's entries after it returned, from another thread)."""
        with self._lock:
            self._pending.append(entry)
            lead = not self._leading
            self._leading = True
        while True:
            if lead:
                # Set again when the entry is finished (or this thread is to lead once more:
                # a batch took at most max_batch entries and this one was not among them).
                entry.wake.clear()
                self._lead()
            entry.wake.wait()
            if entry.finished:
                return
            lead = True  # woken to lead the next batch

    def submit(self, entry: E) -> None:
        """Queue ``entry`` (``queued=True``) without waiting for it."""
        with self._lock:
            self._pending.append(entry)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._lead_forever, name=self._name, daemon=True
                )
                self._thread.start()
            if self._leading:
                return  # the batch in progress hands on to the next leader
            self._leading = True
        self._wanted.set()

    def _lead_forever(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            try:
                self._lead()
            except Exception:  # lead finishes entries, never fails itself; keep going
                log.exception("%s", self._name)

    def _take(self) -> list[E]:
        with self._lock:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
        return batch

    def _lead(self) -> None:
        try:
            self._handle(self._take)
        finally:
            with self._lock:
                following = self._pending[0] if self._pending else None
                if following is None:
                    self._leading = False
                elif not following.queued:
                    following.wake.set()  # a caller of run(): it leads the next batch
            if following is not None and following.queued:
                self._wanted.set()  # a submitted entry: the batcher's thread leads


class _Job(BatchEntry, Generic[T]):
    def __init__(
        self,
        work: Callable[[Session], T],
        *,
        done: Callable[[Any, BaseException | None], None] | None = None,
        bulk: tuple[BulkWriter, Any] | None = None,
        order: tuple[Any, ...] = (),
    ) -> None:
        super().__init__(queued=done is not None)
        self.work = work
        self.result: Any = None
        self.error: BaseException | None = None
        # For a unit queued with submit(): called with (result, error) once it is decided.
        self.done = done
        self.bulk = bulk
        self.order = order
        self.attempts = 0

    def finish(self) -> None:
        super().finish()
        if self.done is not None:
            try:
                self.done(self.result, self.error)
            except Exception:
                log.exception("the callback of a group-commit unit failed")


# A unit that lost a deadlock or a serialization check runs again this often at most.
ATTEMPTS = 5
_RETRYABLE_STATES = frozenset({"40001", "40P01"})  # serialization_failure, deadlock_detected


def retryable(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it was raised from) is a deadlock or serialization
    failure: the transaction lost a race and the same work succeeds when run again."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        orig = seen.orig if isinstance(seen, DBAPIError) else seen
        state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
        if state in _RETRYABLE_STATES:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _domain_error(exc: Exception) -> Exception:
    if isinstance(exc, OperationalError):
        return DatabaseUnavailableError(str(exc.orig or exc))
    return exc


class GroupCommitter:
    """Runs units of work from many threads in shared transactions.

    Leader/follower (:class:`Batcher`): a caller that finds no transaction in progress runs
    the queued units itself (so a lone caller pays no hand-over); callers arriving meanwhile
    queue up and the next transaction, run by the first of them, takes them all.

    The leader begins its transaction first (on SQLite that waits, blocked, for the writer
    lock that every process opening the database shares) and only then takes the queued
    units: every unit that arrived while it waited goes into that one transaction, so
    batches grow with the load instead of the lock being taken once per few units.
    """

    def __init__(self, *, max_batch: int = 512) -> None:
        self._batcher: Batcher[_Job[Any]] = Batcher(
            self._lead, max_batch=max_batch, name="rdc-group-commit"
        )
        # Syncs a committed batch while the next one runs (its thread starts on first use).
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="rdc-commit-sync")

    @property
    def waiting(self) -> int:
        """How many units are queued for the next transaction."""
        return self._batcher.waiting

    def submit(
        self,
        work: Callable[[Session], T],
        done: Callable[[Any, BaseException | None], None],
        *,
        bulk: tuple[BulkWriter, Any] | None = None,
        order: tuple[Any, ...] = (),
    ) -> None:
        """Queue ``work(session)`` without waiting for it: ``done(result, error)`` is called
        (in the committer's writer thread) once it is committed or has failed. For a thread
        that must go on reading requests, e.g. one serving many senders' requests."""
        self._batcher.submit(_Job(work, done=done, bulk=bulk, order=order))

    def run(
        self,
        work: Callable[[Session], T],
        *,
        bulk: tuple[BulkWriter, Any] | None = None,
        order: tuple[Any, ...] = (),
    ) -> T:
        """Run ``work(session)``; return its result once it is committed, or raise its error
        (DatabaseUnavailableError when the shared commit failed). ``bulk``, ``order``: see
        the module."""
        job: _Job[T] = _Job(work, bulk=bulk, order=order)
        self._batcher.run(job)
        if job.error is not None:
            raise job.error
        return job.result

    def _lead(self, take: Callable[[], list[_Job[Any]]]) -> None:
        batch: list[_Job[Any]] | None = None
        while True:
            session = new_session(defer_sync=True)
            try:
                session_connection(session)  # BEGIN; on SQLite: the writer lock is ours
            except Exception as exc:
                self._fail(session, take() if batch is None else batch, exc)
                return
            # The first transaction takes what queued while it began; a retry, its losers.
            batch = self._run_batch(session, take() if batch is None else batch)
            if not batch:
                return
            # Lost a deadlock or serialization check: again in a fresh transaction, after a
            # short random pause so that the winner gets ahead.
            time.sleep(random.uniform(0.001, 0.01) * batch[0].attempts)

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

    @staticmethod
    def _lost(job: _Job[Any], exc: BaseException) -> bool:
        """Whether ``job`` lost a race it may run again for (see the module)."""
        job.attempts += 1
        if job.attempts < ATTEMPTS and retryable(exc):
            log.warning("a group-commit unit lost a race (attempt %d): %s", job.attempts, exc)
            return True
        return False

    def _run_batch(self, session: Session, batch: list[_Job[Any]]) -> list[_Job[Any]]:
        """Run ``batch`` in the session's transaction, commit and finish its units; return
        the units to run again in a fresh transaction (unfinished)."""
        again: list[_Job[Any]] = []
        complete: Callable[[], None] | None = None
        batch.sort(key=lambda job: job.order)  # stable: units without a key keep their order
        try:
            if len(batch) == 1:
                # A lone unit is its own transaction: no savepoint needed.
                job = batch[0]
                try:
                    job.result = job.work(session)
                except Exception as exc:
                    if not self._lost(job, exc):
                        raise
                    again.append(job)
                    session.info.pop("rdc_on_rollback", None)  # the retry needs its object
                    with contextlib.suppress(Exception):
                        session.rollback()
                    return again
            else:
                for job in self._run_bulk(session, batch):
                    mark = len(session.info.get("rdc_on_rollback", []))
                    try:
                        with direct_savepoint(session):
                            job.result = job.work(session)
                    except TransactionLostError:
                        raise  # every unit of the batch is lost: fail them all below
                    except Exception as exc:
                        if self._lost(job, exc):
                            again.append(job)
                            del session.info.get("rdc_on_rollback", [])[mark:]
                        else:
                            run_rollback_undos(session, since=mark)
                            job.error = _domain_error(exc)
            session.commit()
        except Exception as exc:
            with contextlib.suppress(Exception):
                session.rollback()
            retry = [job for job in batch if job.error is None and job not in again]
            if retry and all(self._lost(job, exc) for job in retry):
                # The commit lost a race (e.g. a serialization check): all of it again.
                log.warning("group commit of %d units lost a race; again: %s", len(batch), exc)
                session.info.pop("rdc_on_rollback", None)
                for job in retry:
                    job.result = None
                again += retry  # unfinished: the finally below must not tell their callers
                return again
            run_rollback_undos(session, since=0)
            if len(batch) == 1:  # a lone unit's own error (e.g. permission denied)
                failure = _domain_error(exc)
            else:
                log.error("group commit of %d units failed: %s", len(batch), exc)
                failure = DatabaseUnavailableError(f"index commit failed: {exc}")
            for job in batch + again:
                if job.error is None:
                    job.error = failure
                    job.result = None
            again = []
        else:
            complete = self._completion(session, [job for job in batch if job not in again])
        finally:
            session.close()
            if complete is None:
                for job in batch:
                    if job not in again:
                        job.finish()
        if complete is not None:
            if self._batcher.waiting:
                # Units are waiting: their transaction may begin while this one syncs.
                self._syncer.submit(complete)
            else:
                complete()
        return again

    @staticmethod
    def _completion(session: Session, done: list[_Job[Any]]) -> Callable[[], None] | None:
        """After the commit of ``done``'s transaction: None if it is durable already (its
        after-commit callbacks have run); else the function that syncs it and only then runs
        those callbacks and tells each unit (a failed sync fails them: not durable)."""
        sync = deferred_sync(session)
        if sync is None:
            run_after_commit(session)
            return None
        callbacks = take_after_commit(session)

        def complete() -> None:
            try:
                sync()
            except OSError as exc:
                log.error("the index commit of %d units was not made durable: %s", len(done), exc)
                failure = DatabaseUnavailableError(f"index commit not made durable: {exc}")
                for job in done:
                    if job.error is None:
                        job.error, job.result = failure, None
            else:
                for callback in callbacks:
                    try:
                        callback()
                    except Exception:
                        log.exception("an after-commit action of a group commit failed")
            finally:
                for job in done:
                    job.finish()

        return complete
