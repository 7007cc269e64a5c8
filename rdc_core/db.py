"""Database engine, sessions and the declarative base shared by every package.

SQLite (the embedded default) runs in WAL mode with ``synchronous=FULL`` so that a commit that
returned is on disk; write transactions start with ``BEGIN IMMEDIATE`` so that concurrent
writers queue on the busy timeout instead of failing when a read turns into a write.
PostgreSQL is used as it is, by URL.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import Connection, DateTime, Engine, MetaData, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

from rdc_core.errors import DatabaseUnavailableError, TransactionLostError
from rdc_core.settings import Settings, get_settings, private_directory

__all__ = [
    "Base",
    "UTCDateTime",
    "after_commit",
    "begin_driver_write",
    "deferred_sync",
    "direct_savepoint",
    "dispose_engines",
    "execute_direct",
    "execute_direct_many",
    "get_engine",
    "insert_ignore",
    "new_session",
    "on_rollback",
    "read_session",
    "run_after_commit",
    "run_rollback_undos",
    "session_connection",
    "session_scope",
    "stable_id",
    "take_after_commit",
    "upsert",
    "utcnow",
]

log = logging.getLogger(__name__)

_NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Namespace for IDs derived from natural keys (UIDs, codes, usernames): the same input gives
# the same ID on every replica, so every write can be an idempotent upsert.
_ID_NAMESPACE = uuid.UUID("6f1c2a4e-8d0b-5c3e-9a71-2b4d6e8f0a13")


def stable_id(kind: str, *natural_key: str) -> str:
    """A deterministic ID for an object of ``kind`` identified by ``natural_key``."""
    return str(uuid.uuid5(_ID_NAMESPACE, "\x1f".join((kind, *natural_key))))


def utcnow() -> datetime:
    """Timezone-aware current time in UTC (everything is stored in UTC)."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always returned timezone-aware.

    SQLite has no time zones; without this, values would come back naive and comparisons
    with aware datetimes would fail.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base for every table of the product."""

    metadata = MetaData(naming_convention=_NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime()}


_engines: dict[str, Engine] = {}
_sessionmakers: dict[tuple[str, bool], sessionmaker[Session]] = {}
_lock = threading.Lock()


class _WriterGate:
    """One writer at a time: among this process's threads and, for a database file, among
    every process that opens it (``rdc serve``, its DICOM listener processes, ``rdc import``).

    SQLite allows one writer per database. Left to itself, a blocked writer polls with
    sleeps of up to 100 ms; queueing writers on a lock hands the database over the moment the
    previous transaction ends. Threads queue on a lock. Processes take ``flock`` of a lock file
    beside the database, which the kernel releases if its holder dies. A free file lock is
    taken at once; a held one is waited for in a blocking ``flock`` (the kernel wakes the
    waiter when the holder lets go: no polling), run by a thread of the gate's own so that
    the writer can give up after SQLite's busy timeout and fail as "database is locked" (a
    holder that hangs must not hang every writer; a blocking ``flock`` cannot time out).
    """

    def __init__(self, lock_path: Path | None) -> None:
        self._threads = threading.Lock()
        self._lock_path = lock_path
        self._fd: int | None = None
        self._waiter: _FileLockWaiter | None = None
        self._open()
        _gates.add(self)

    def _open(self) -> None:
        if self._lock_path is None:
            return
        try:
            # Read-only is enough for flock, and lets other users' processes share the lock.
            fd = os.open(self._lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            log.warning("no writer lock shared between processes (%s): %s", self._lock_path, exc)
            return
        self._fd = fd
        self._waiter = _FileLockWaiter(fd)
        # Not at interpreter exit: daemon threads may still be committing through this gate.
        self._closer = weakref.finalize(self, os.close, fd)
        self._closer.atexit = False

    def reopen_after_fork(self) -> None:
        """A forked child shares the parent's open lock file, and so its lock: open its own."""
        self._threads = threading.Lock()
        if self._fd is not None:
            self._closer()  # closes the inherited descriptor, once
            self._fd = None
            self._waiter = None
        self._open()

    def acquire(self) -> None:
        if not self._threads.acquire(timeout=_BUSY_TIMEOUT_SECONDS):
            raise sqlite3.OperationalError("database is locked (by another thread)")
        if self._waiter is None:
            return
        try:
            self._waiter.lock(_BUSY_TIMEOUT_SECONDS)
        except BaseException:
            self._threads.release()
            raise

    def release(self) -> None:
        try:
            if self._waiter is not None:
                self._waiter.unlock()
        finally:
            self._threads.release()


class _FileLockWaiter:
    """The exclusive ``flock`` of one descriptor, with a timeout and without polling.

    Taken at once when it is free. Otherwise a thread of this waiter (started on first need)
    blocks in ``flock`` and hands the lock over when the kernel grants it; the writer waits
    for that on a condition with a timeout. A writer that gave up leaves the request
    *abandoned*: the thread then lets the lock go as soon as it has it, unless a later
    writer asked again meanwhile (then that writer gets it). Callers are serialised by the
    gate's thread lock, so there is at most one request at a time.
    """

    _FREE, _WANTED, _GRANTED, _ABANDONED = range(4)

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._cond = threading.Condition(threading.Lock())
        self._state = self._FREE
        self._thread: threading.Thread | None = None

    def lock(self, timeout: float) -> None:
        with self._cond:
            if self._state == self._FREE:  # no blocked flock of ours in flight
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    pass
            self._state = self._WANTED
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._wait_forever, name="rdc-writer-lock", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()
            if self._cond.wait_for(lambda: self._state == self._GRANTED, timeout):
                self._state = self._FREE
                return
            self._state = self._ABANDONED
        raise sqlite3.OperationalError("database is locked (by another process)")

    def unlock(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _wait_forever(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._state == self._WANTED)
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX)  # blocks, without the interpreter lock
            except OSError as exc:  # e.g. the descriptor closed: the writer times out
                log.error("waiting for the writer lock failed: %s", exc)
                return
            with self._cond:
                if self._state == self._WANTED:
                    self._state = self._GRANTED
                    self._cond.notify_all()
                    continue
            fcntl.flock(self._fd, fcntl.LOCK_UN)  # the writer gave up meanwhile
            with self._cond:
                if self._state == self._ABANDONED:
                    self._state = self._FREE


_BUSY_TIMEOUT_SECONDS = 30
_gates: weakref.WeakSet[_WriterGate] = weakref.WeakSet()


def _reopen_gates_after_fork() -> None:
    for gate in list(_gates):
        gate.reopen_after_fork()


os.register_at_fork(after_in_child=_reopen_gates_after_fork)


def _gated_sqlite_connection(gate: _WriterGate) -> type[sqlite3.Connection]:
    """A sqlite3 connection class that takes the writer gate for its write transactions.

    The gate is taken at BEGIN IMMEDIATE and released after COMMIT or ROLLBACK has really run.
    """

    class GatedConnection(sqlite3.Connection):
        holds_gate = False
        synchronous = "FULL"  # as _on_connect sets it

        def set_synchronous(self, level: str) -> None:
            """FULL: a COMMIT returns once the WAL is on disk. NORMAL: it returns at once and
            the caller syncs the WAL itself (see :func:`deferred_sync`). Only between
            transactions: SQLite refuses to change it inside one."""
            if level != self.synchronous:
                self.execute(f"PRAGMA synchronous={level}").close()
                self.synchronous = level

        def enter_write(self) -> None:
            gate.acquire()
            self.holds_gate = True

        def leave_write(self) -> None:
            if self.holds_gate:
                self.holds_gate = False
                gate.release()

        def commit(self) -> None:
            try:
                super().commit()
            finally:
                self.leave_write()

        def rollback(self) -> None:
            try:
                super().rollback()
            finally:
                self.leave_write()

        def close(self) -> None:
            try:
                super().close()
            finally:
                self.leave_write()

    return GatedConnection


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module so BEGIN is ours.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_SECONDS * 1000}")
        # Pages read through a memory map: no read system call per page (costly in a VM).
        cursor.execute("PRAGMA mmap_size=268435456")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Straight on the driver connection: a BEGIN per transaction through
        # exec_driver_sql cost about 40 us of SQLAlchemy's execution machinery.
        dbapi_connection = conn.connection.dbapi_connection
        if conn.get_execution_options().get("rdc_readonly", False):
            _begin(dbapi_connection, "BEGIN")
            return
        deferred = conn.get_execution_options().get("rdc_defer_sync", False)
        _begin_write(dbapi_connection, "NORMAL" if deferred else "FULL")


def _begin_write(dbapi_connection: Any, synchronous: str) -> None:
    """Take the writer gate, then BEGIN IMMEDIATE, on a gated SQLite driver connection whose
    COMMIT syncs (``FULL``) or leaves the sync to the caller (``NORMAL``)."""
    try:
        dbapi_connection.set_synchronous(synchronous)
        dbapi_connection.enter_write()
    except sqlite3.Error as exc:
        raise DBAPIError.instance("BEGIN IMMEDIATE", (), exc, sqlite3.Error) from exc
    try:
        _begin(dbapi_connection, "BEGIN IMMEDIATE")
    except BaseException:
        dbapi_connection.leave_write()
        raise


def _begin(dbapi_connection: sqlite3.Connection, statement: str) -> None:
    try:
        dbapi_connection.execute(statement).close()
    except sqlite3.Error as exc:
        raise DBAPIError.instance(statement, (), exc, sqlite3.Error) from exc


def get_engine(url: str | None = None) -> Engine:
    """The engine for ``url`` (default: the configured database), created once per process."""
    url = url or _configured_url()
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _make_engine(url)
            _engines[url] = engine
        return engine


def _make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        lock_path = None
        if parsed.database and parsed.database != ":memory:":
            _create_private_database(Path(parsed.database))
            lock_path = Path(f"{parsed.database}.writer-lock")
        engine = create_engine(
            url,
            connect_args={
                "check_same_thread": False,
                "timeout": _BUSY_TIMEOUT_SECONDS,
                "factory": _gated_sqlite_connection(_WriterGate(lock_path)),
            },
            pool_size=8,
            max_overflow=32,
            # The connection used last has the freshest page cache: SQLite re-reads what
            # other connections wrote since a connection's last transaction.
            pool_use_lifo=True,
        )
        _configure_sqlite(engine)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _create_private_database(path: Path) -> None:
    """Create the SQLite file (and its directory) readable by the owner only, 0600 / 0700:
    it holds patient data. SQLite gives its -wal and -shm files the database file's mode."""
    private_directory(path.parent)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))


def dispose_engines() -> None:
    """Close every pooled connection (tests, shutdown, after fork)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _sessionmakers.clear()


_default_url: tuple[Settings, str] | None = None


def _configured_url() -> str:
    # Resolving the SQLite path touches the file system; remember it per settings object.
    global _default_url
    settings = get_settings()
    if _default_url is None or _default_url[0] is not settings:
        _default_url = (settings, settings.resolved_database_url)
    return _default_url[1]


def _sessionmaker(url: str | None, *, defer_sync: bool = False) -> sessionmaker[Session]:
    key = url or _configured_url()
    maker = _sessionmakers.get((key, defer_sync))
    if maker is None:
        engine = get_engine(key)
        bind = engine.execution_options(rdc_defer_sync=True) if defer_sync else engine
        maker = sessionmaker(bind=bind, expire_on_commit=False)
        _sessionmakers[(key, defer_sync)] = maker
    return maker


def new_session(url: str | None = None, *, defer_sync: bool = False) -> Session:
    """A plain write session; the caller commits or rolls back (see :func:`session_scope`).

    ``defer_sync``: on SQLite its COMMIT does not wait for the disk, so the writer lock is let
    go before the sync; the committed transaction is durable only once the function
    :func:`deferred_sync` gives for the session has run, and nobody may be told before.
    """
    return _sessionmaker(url, defer_sync=defer_sync)()


def deferred_sync(session: Session) -> Callable[[], None] | None:
    """For a session of ``new_session(defer_sync=True)`` whose transaction committed: the
    function that makes the commit durable (an fdatasync of SQLite's WAL file, which holds
    every frame committed before it; where a checkpoint has already moved them into the
    database file, SQLite synced that file). None when the commit was durable already
    (PostgreSQL, or a session that does not defer). Call it before the session's
    connection could be closed as the last one of the database (it is pooled)."""
    bind = session.get_bind()
    if not isinstance(bind, Engine) or bind.dialect.name != "sqlite":
        return None
    if not bind.get_execution_options().get("rdc_defer_sync"):
        return None
    database = bind.url.database
    if not database or database == ":memory:":
        return None
    return partial(_sync_wal, database)


def begin_driver_write(engine: Engine, dbapi_connection: Any) -> Callable[[], None] | None:
    """Begin a write transaction straight on ``dbapi_connection``, a driver connection of
    ``engine``'s pool that the caller holds and uses without SQLAlchemy's Connection (for a
    path that writes a few rows per transaction, thousands of times a second: the lab
    intake's index rows). As the engine's own write transactions begin: on SQLite the writer
    gate is taken (this process's threads, then every process's file lock, within the busy
    timeout), then BEGIN IMMEDIATE; the driver's ``commit()`` or ``rollback()`` lets the gate
    go. The transaction's COMMIT does not wait for the disk (synchronous=NORMAL, as for
    ``new_session(defer_sync=True)``): the function returned makes it durable (an fdatasync of
    the WAL, see :func:`deferred_sync`); call it after the COMMIT and tell nobody before it
    returned. None when the commit is durable by itself (PostgreSQL: the driver begins the
    transaction on the first statement; an in-memory SQLite database). Raises DBAPIError."""
    if engine.dialect.name != "sqlite":
        return None
    _begin_write(dbapi_connection, "NORMAL")
    database = engine.url.database
    if not database or database == ":memory:":
        return None
    return partial(_sync_wal, database)


def _sync_wal(database: str) -> None:
    try:
        fd = os.open(f"{database}-wal", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        # The last connection checkpointed the WAL into the database file and removed it.
        fd = os.open(database, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def run_rollback_undos(session: Session, *, since: int = 0) -> None:
    """Run, newest first, the undo actions registered with :func:`on_rollback` after the
    first ``since`` of them, and forget them (used when a savepoint or transaction failed)."""
    undos = session.info.get("rdc_on_rollback", [])
    mine, undos[since:] = undos[since:], []
    for undo in reversed(mine):
        try:
            undo()
        except Exception:  # the original error matters more; log and go on
            log.exception("compensating action after rollback failed")


def run_after_commit(session: Session) -> None:
    """Run the callbacks registered with :func:`after_commit` (the transaction committed)."""
    for callback in take_after_commit(session):
        callback()


def take_after_commit(session: Session) -> list[Callable[[], None]]:
    """The transaction committed: forget its undo actions, and return (and forget) its
    :func:`after_commit` callbacks for the caller to run (e.g. once the commit is durable)."""
    session.info.pop("rdc_on_rollback", None)
    callbacks: list[Callable[[], None]] = session.info.pop("rdc_after_commit", [])
    return callbacks


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A write transaction: commits when the block ends, rolls back on any exception.

    Driver-level failures (database down, locked too long) are raised as
    :class:`~rdc_core.errors.DatabaseUnavailableError` so edges can answer "try again".
    """
    session = _sessionmaker(url)()
    try:
        yield session
        session.commit()
    except (OperationalError, DBAPIError) as exc:
        _rollback(session)
        if isinstance(exc, OperationalError) or exc.connection_invalidated:
            raise DatabaseUnavailableError(str(exc.orig or exc)) from exc
        raise
    except BaseException:
        _rollback(session)
        raise
    else:
        run_after_commit(session)
    finally:
        session.close()


def _rollback(session: Session) -> None:
    try:
        session.rollback()
    finally:
        session.info.pop("rdc_after_commit", None)
        run_rollback_undos(session)


def on_rollback(session: Session, undo: Callable[[], None]) -> None:
    """Run ``undo`` if the transaction of ``session`` rolls back.

    Services use this to remove an object they wrote to the store when the index
    transaction fails, so a failure leaves nothing half-written.
    """
    session.info.setdefault("rdc_on_rollback", []).append(undo)


def after_commit(session: Session, callback: Callable[[], None]) -> None:
    """Run ``callback`` once the transaction of ``session`` committed (e.g. enqueue a task)."""
    session.info.setdefault("rdc_after_commit", []).append(callback)


@contextmanager
def read_session(url: str | None = None) -> Iterator[Session]:
    """A read-only session; on SQLite it does not take the write lock."""
    engine = get_engine(url)
    session = Session(bind=engine.execution_options(rdc_readonly=True), expire_on_commit=False)
    try:
        yield session
    except OperationalError as exc:
        raise DatabaseUnavailableError(str(exc.orig or exc)) from exc
    finally:
        session.rollback()
        session.close()


_statement_cache: dict[tuple[Any, ...], Any] = {}


def _insert_on_conflict(
    session: Session,
    table: Any,
    columns: tuple[str, ...],
    conflict: tuple[str, ...],
    update: tuple[str, ...],
    returning: tuple[str, ...],
) -> Any:
    # Built once per shape and reused: SQLAlchemy then skips compiling it again, which
    # matters on the ingest path (a fresh statement costs several times its execution).
    dialect = session.get_bind().dialect.name
    key = (dialect, table.name, columns, conflict, update, returning)
    stmt = _statement_cache.get(key)
    if stmt is None:
        if dialect == "postgresql":
            base: Any = postgresql.insert(table)
        elif dialect == "sqlite":
            base = sqlite.insert(table)
        else:
            raise NotImplementedError(f"upsert is not implemented for {dialect}")
        if update:
            stmt = base.on_conflict_do_update(
                index_elements=list(conflict),
                set_={name: base.excluded[name] for name in update},
            )
        else:
            # No target: every unique constraint is an arbiter (on PostgreSQL a row that
            # clashes with a concurrent insert on a non-arbiter unique index raises instead).
            stmt = base.on_conflict_do_nothing(index_elements=list(conflict) or None)
        if returning:
            stmt = stmt.returning(*(table.c[name] for name in returning))
        _statement_cache[key] = stmt
    return stmt


def upsert(
    session: Session,
    table: Any,
    values: Mapping[str, Any],
    *,
    conflict: Sequence[str],
    update: Sequence[str] = (),
    returning: Sequence[str] = (),
    other_keys: bool = False,
) -> Any:
    """INSERT ``values`` ... ON CONFLICT (``conflict``) DO UPDATE the ``update`` columns to the
    proposed values (or DO NOTHING when ``update`` is empty).

    The database's constraint decides, so two writers racing on the same key never create
    two rows. With ``returning``, returns the row as it is after the statement.

    ``other_keys``: the table has unique constraints besides ``conflict`` that a concurrent
    writer of the same row fills with the same values (a primary key derived from a natural
    key, for instance). PostgreSQL settles a race only on the conflict target: when another
    transaction commits the same row first, the other unique index raises UniqueViolation.
    With ``other_keys`` the statement runs in a savepoint there and, after such a clash, once
    more: it then sees the committed row and takes the DO UPDATE path. (SQLite has one writer:
    no race.)
    """
    stmt = _insert_on_conflict(
        session, table, tuple(values), tuple(conflict), tuple(update), tuple(returning)
    )
    if other_keys and session.get_bind().dialect.name == "postgresql":
        result = _retried_after_unique_race(session, stmt, values)
    else:
        result = _core_execute(session, stmt, values)
    if returning:
        return result.one()
    return None


_RACE_SAVEPOINT = text("SAVEPOINT rdc_unique_race")
_RELEASE_RACE_SAVEPOINT = text("RELEASE SAVEPOINT rdc_unique_race")
_ROLLBACK_TO_RACE_SAVEPOINT = text("ROLLBACK TO SAVEPOINT rdc_unique_race")


def _retried_after_unique_race(session: Session, stmt: Any, values: Mapping[str, Any]) -> Any:
    execute_direct(session, _RACE_SAVEPOINT, {})
    try:
        result = _core_execute(session, stmt, values)
    except IntegrityError as exc:
        if getattr(exc.orig, "sqlstate", None) != _UNIQUE_VIOLATION:
            raise
        execute_direct(session, _ROLLBACK_TO_RACE_SAVEPOINT, {})
        log.info("unique-key race on %s settled by a second attempt", stmt.table.name)
        result = _core_execute(session, stmt, values)
    result = result.all() if result.returns_rows else None
    execute_direct(session, _RELEASE_RACE_SAVEPOINT, {})
    return _Rows(result)


_UNIQUE_VIOLATION = "23505"


@dataclass(frozen=True)
class _Rows:
    """Rows fetched before the savepoint was released (a result must be read before the
    next statement on the connection)."""

    rows: list[Any] | None

    def one(self) -> Any:
        if self.rows is None or len(self.rows) != 1:
            raise RuntimeError("expected one row")
        return self.rows[0]


def insert_ignore(
    session: Session, table: Any, values: Mapping[str, Any], *, conflict: Sequence[str]
) -> bool:
    """INSERT ... ON CONFLICT DO NOTHING; True when a row was inserted. An empty
    ``conflict`` ignores a clash on any unique constraint."""
    # RETURNING says for sure whether the row went in; rowcount is not reliable on every
    # driver for this statement (psycopg may report -1).
    columns = tuple(values)
    stmt = _insert_on_conflict(session, table, columns, tuple(conflict), (), (columns[0],))
    return bool(execute_direct(session, stmt, values, column_keys=columns))


_SAVEPOINT = text("SAVEPOINT rdc_unit")
_RELEASE_SAVEPOINT = text("RELEASE SAVEPOINT rdc_unit")
_ROLLBACK_TO_SAVEPOINT = text("ROLLBACK TO SAVEPOINT rdc_unit")


@contextmanager
def direct_savepoint(session: Session) -> Iterator[None]:
    """Run the block inside a savepoint of the session's transaction, issued straight on the
    driver connection (see :func:`execute_direct`; Session.begin_nested costs two full
    statement executions). If the block raises, its writes are rolled back to the savepoint
    and the session's ORM objects are expunged, since the session does not know about this
    savepoint: meant for blocks of Core statements, as the ingest units of group commit are.
    Not nested. Raises TransactionLostError when the savepoint is gone with the whole
    transaction (then nothing written in the transaction is kept, not only this block)."""
    execute_direct(session, _SAVEPOINT, {})
    try:
        yield
        if session.new or session.dirty or session.deleted:
            session.flush()  # the block's own ORM changes belong inside its savepoint
    except BaseException as exc:
        try:
            execute_direct(session, _ROLLBACK_TO_SAVEPOINT, {})
            execute_direct(session, _RELEASE_SAVEPOINT, {})
        except Exception as lost:
            # SQLite rolls the whole transaction back on some errors (disk full, I/O), and
            # a lost connection takes it along: the savepoint went with everything before it.
            raise TransactionLostError(f"transaction lost: {exc}; then: {lost}") from exc
        session.expunge_all()
        raise
    execute_direct(session, _RELEASE_SAVEPOINT, {})


@dataclass(frozen=True, slots=True)
class _DirectPlan:
    sql: str
    positional: tuple[str, ...] | None  # bind names in order, or None for named parameters
    processors: tuple[tuple[str, Callable[[Any], Any]], ...]
    compiled: Any


_direct_plans: dict[tuple[Any, str, tuple[str, ...] | None], _DirectPlan | None] = {}


def _direct_plan(
    session: Session, statement: Any, column_keys: tuple[str, ...] | None
) -> tuple[Connection, _DirectPlan | None]:
    """Flush pending ORM changes (as session.execute would) and return the transaction's
    connection with the statement's plan for its dialect (None: run it through SQLAlchemy),
    made on first use and kept per statement object."""
    if session.new or session.dirty or session.deleted:
        session.flush()
    conn = session_connection(session)
    key = (statement, conn.dialect.name, column_keys)
    if key in _direct_plans:
        return conn, _direct_plans[key]
    plan = _direct_plans[key] = _plan_direct(statement, conn.dialect, column_keys)
    return conn, plan


def execute_direct(
    session: Session,
    statement: Any,
    params: Mapping[str, Any],
    *,
    column_keys: tuple[str, ...] | None = None,
) -> list[tuple[Any, ...]]:
    """Run a Core statement in the session's transaction and return its rows as plain
    tuples, skipping most of SQLAlchemy's per-execution work. The statement must be built
    once and reused (a module constant or a cached statement): its compiled form is kept
    per statement object.

    For the statements run for every object received. Measured on SQLite: an exam update
    took 69 us through Connection.execute and 28 us this way. The statement is compiled
    once per dialect (``column_keys``: the columns of an INSERT given at run time) and its
    parameters are bound with the same type processors SQLAlchemy uses. A statement that
    needs SQLAlchemy's execution (Python-side column defaults) runs through it instead.
    Driver errors come back as SQLAlchemy's DBAPIError kinds, as from Connection.execute.
    """
    conn, plan = _direct_plan(session, statement, column_keys)
    dialect = conn.dialect
    if plan is None:
        return [tuple(row) for row in conn.execute(statement, dict(params))]
    bound = plan.compiled.construct_params(dict(params))
    for name, process in plan.processors:
        bound[name] = process(bound[name])
    args: Any = bound if plan.positional is None else [bound[n] for n in plan.positional]
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(plan.sql, args)
        return list(cursor.fetchall()) if cursor.description else []
    except dialect.loaded_dbapi.Error as exc:
        raise DBAPIError.instance(plan.sql, args, exc, dialect.loaded_dbapi.Error) from exc
    finally:
        cursor.close()


def execute_direct_many(
    session: Session,
    statement: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    column_keys: tuple[str, ...] | None = None,
) -> None:
    """Run a Core statement that returns no rows once per parameter set of ``rows``, in one
    driver ``executemany`` (see :func:`execute_direct`: built once, bound the same way).
    For the statements of a whole group-commit batch: one call instead of one per row."""
    if not rows:
        return
    conn, plan = _direct_plan(session, statement, column_keys)
    dialect = conn.dialect
    if plan is None:
        conn.execute(statement, [dict(row) for row in rows])
        return
    many: list[Any] = []
    names = plan.positional
    if names is not None and all(name in rows[0] for name in names):
        # Every bind named in the row (the usual case): bound straight from it, without
        # SQLAlchemy's per-row parameter construction (most of the cost of a row).
        processing = dict(plan.processors)
        steps = [(name, processing.get(name)) for name in names]
        for row in rows:
            many.append([row[n] if p is None else p(row[n]) for n, p in steps])
    else:
        for row in rows:
            bound = plan.compiled.construct_params(dict(row))
            for name, process in plan.processors:
                bound[name] = process(bound[name])
            many.append(bound if names is None else [bound[n] for n in names])
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.executemany(plan.sql, many)
    except dialect.loaded_dbapi.Error as exc:
        raise DBAPIError.instance(plan.sql, many, exc, dialect.loaded_dbapi.Error) from exc
    finally:
        cursor.close()


def _plan_direct(
    statement: Any, dialect: Any, column_keys: tuple[str, ...] | None
) -> _DirectPlan | None:
    compiled = statement.compile(
        dialect=dialect, column_keys=list(column_keys) if column_keys is not None else None
    )
    if (
        compiled.insert_prefetch
        or compiled.update_prefetch
        or compiled.literal_execute_params
        or compiled.post_compile_params
    ):
        return None  # defaults to compute or parameters expanded at execution: SQLAlchemy's
    escaped = compiled.escaped_bind_names or {}
    processors = []
    for name, bind in compiled.binds.items():
        process = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if process is not None:
            processors.append((escaped.get(name, name), process))
    positional = None
    if compiled.positional:
        positional = tuple(escaped.get(name, name) for name in compiled.positiontup)
    return _DirectPlan(compiled.string, positional, tuple(processors), compiled)


def _core_execute(session: Session, stmt: Any, values: Mapping[str, Any]) -> Any:
    # A Core statement on the session's own connection: the ORM's execute machinery costs
    # more than the statement itself on the ingest path. Pending ORM changes are flushed
    # first, as session.execute would.
    if session.new or session.dirty or session.deleted:
        session.flush()
    return session_connection(session).execute(stmt, dict(values))


def session_connection(session: Session) -> Connection:
    """The connection of the session's current transaction, remembered for the transaction:
    asking the session for it each time costs as much as a small statement."""
    conn: Connection | None = session.info.get("rdc_connection")
    if conn is None or conn.closed or not conn.in_transaction():
        conn = session.connection()
        session.info["rdc_connection"] = conn
    return conn
