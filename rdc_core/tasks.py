"""Background work: named tasks, a registry, and the runner that executes them.

A task is a plain function registered under a stable dotted name with :func:`task`.
Edges enqueue work by name with :meth:`TaskRunner.submit` *after* their transaction
committed (:func:`submit_after_commit` does both: the task goes to the process's running
runner once the transaction commits); periodic tasks are declared with :func:`periodic`.
The embedded runner below uses a thread pool and a scheduler thread; a Celery runner
implements the same interface.
Tasks must be idempotent: a retry or a second replica running the same task changes nothing.

Both runners record every run in :mod:`rdc_core.metrics` (run time by task and outcome,
failures); the embedded runner also reports how many tasks wait and run in the process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from rdc_core.metrics import (
    FAILURE,
    SUCCESS,
    GaugeSample,
    declare_tasks,
    observe_task,
    register_gauge_source,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = [
    "InProcessTaskRunner",
    "PeriodicTask",
    "TaskRunner",
    "active_runner",
    "periodic",
    "registered_periodic_tasks",
    "registered_tasks",
    "set_active_runner",
    "submit_after_commit",
    "submit_task",
    "task",
]

log = logging.getLogger(__name__)

TaskFunc = Callable[..., Any]


@dataclass(frozen=True, slots=True)
class PeriodicTask:
    """A task the scheduler runs every ``interval()`` seconds (a callable: settings may change)."""

    name: str
    interval: Callable[[], float]


_tasks: dict[str, TaskFunc] = {}
_periodic: dict[str, PeriodicTask] = {}


def task(name: str) -> Callable[[TaskFunc], TaskFunc]:
    """Register the decorated function as the task ``name``."""

    def register(func: TaskFunc) -> TaskFunc:
        existing = _tasks.get(name)
        if existing is not None and existing is not func:
            raise ValueError(f"task {name!r} is already registered")
        _tasks[name] = func
        return func

    return register


def periodic(name: str, *, interval: Callable[[], float]) -> None:
    """Declare that the registered task ``name`` runs every ``interval()`` seconds."""
    _periodic[name] = PeriodicTask(name=name, interval=interval)


def registered_tasks() -> dict[str, TaskFunc]:
    """The task registry (name -> function)."""
    return dict(_tasks)


def registered_periodic_tasks() -> list[PeriodicTask]:
    """Every declared periodic task."""
    return list(_periodic.values())


class TaskRunner(Protocol):
    """What the rest of the product needs from a task backend."""

    def submit(self, name: str, /, **kwargs: Any) -> None:
        """Run task ``name`` with ``kwargs`` in the background."""
        ...

    def start(self) -> None:
        """Start workers and the periodic scheduler."""
        ...

    def stop(self) -> None:
        """Stop accepting work and wait for running tasks."""
        ...


_active: TaskRunner | None = None


def set_active_runner(runner: TaskRunner | None) -> None:
    """Make ``runner`` the one :func:`submit_after_commit` hands tasks to in this process
    (runners call this when they start; ``None`` when the last one stops)."""
    global _active
    _active = runner


def active_runner() -> TaskRunner | None:
    """The task runner started in this process, if any."""
    return _active


def submit_after_commit(session: Session, name: str, /, **kwargs: Any) -> None:
    """Enqueue task ``name`` with ``kwargs`` once the transaction of ``session`` commits
    (nothing is enqueued if it rolls back). A process without a running runner (a DICOM
    listener process, a CLI command) enqueues nothing: such tasks must also be reached by a
    periodic sweep. Never raises: a failed enqueue is logged and left to the sweep."""
    from rdc_core.db import after_commit

    after_commit(session, partial(_submit_quietly, name, kwargs))


def _submit_quietly(name: str, kwargs: dict[str, Any]) -> None:
    submit_task(name, **kwargs)


def submit_task(name: str, /, **kwargs: Any) -> bool:
    """Enqueue task ``name`` now on this process's running task runner. False when there is
    none (a DICOM listener process, a CLI command, a test without a runner: a periodic sweep
    must pick the work up) or the enqueue failed (logged; the sweep catches up). Work that
    belongs to a transaction goes through :func:`submit_after_commit` instead."""
    runner = _active
    if runner is None:
        log.debug("task %s not enqueued: no task runner in this process", name)
        return False
    try:
        runner.submit(name, **kwargs)
    except Exception as exc:
        log.warning("task %s could not be enqueued: %s", name, exc)
        return False
    return True


class _Load:
    """Tasks submitted to in-process runners and not started yet, and tasks running."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.queued = 0
        self.running = 0

    def change(self, *, queued: int = 0, running: int = 0) -> None:
        with self._lock:
            self.queued += queued
            self.running += running

    def samples(self) -> list[GaugeSample]:
        with self._lock:
            queued, running = self.queued, self.running
        return [
            ("rdc_task_queue_depth", ("inprocess", "inprocess"), queued),
            ("rdc_tasks_running", ("inprocess",), running),
        ]


_load = _Load()


def _execute(name: str, func: TaskFunc, kwargs: dict[str, Any], *, queued: bool) -> Any:
    """Run one task in this thread, recording its run time and outcome."""
    _load.change(queued=-1 if queued else 0, running=1)
    outcome = FAILURE
    started = time.perf_counter()
    try:
        result = func(**kwargs)
        outcome = SUCCESS
        return result
    finally:
        _load.change(running=-1)
        observe_task(name, outcome, time.perf_counter() - started)


class InProcessTaskRunner:
    """Thread-pool worker plus a scheduler thread, for the one-process embedded mode."""

    def __init__(self, *, threads: int = 4, run_periodic: bool = True) -> None:
        self._threads = threads
        self._run_periodic = run_periodic
        self._pool: ThreadPoolExecutor | None = None
        self._stop = threading.Event()
        self._scheduler: threading.Thread | None = None
        # Periodic tasks never overlap with themselves: a slow run delays the next one.
        self._running: set[str] = set()
        self._running_lock = threading.Lock()

    def start(self) -> None:
        self._stop.clear()
        self._running.clear()  # periodic runs cancelled by an earlier stop()
        declare_tasks(_tasks)
        register_gauge_source("inprocess", _load.samples, ttl=0.0, blocking=False)
        self._pool = ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix="rdc-task")
        set_active_runner(self)
        if self._run_periodic:
            self._scheduler = threading.Thread(
                target=self._schedule_loop, name="rdc-scheduler", daemon=True
            )
            self._scheduler.start()

    def stop(self) -> None:
        self._stop.set()
        if _active is self:
            set_active_runner(None)
        if self._scheduler is not None:
            self._scheduler.join(timeout=10)
            self._scheduler = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def submit(self, name: str, /, **kwargs: Any) -> None:
        func = _tasks.get(name)
        if func is None:
            raise KeyError(f"no task named {name!r}")
        self._enqueue(name, _execute, name, func, kwargs, queued=True)

    def run_now(self, name: str, /, **kwargs: Any) -> Any:
        """Run a task synchronously in the caller's thread (CLI, tests)."""
        return _execute(name, _tasks[name], kwargs, queued=False)

    def _enqueue(self, name: str, call: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
        pool = self._pool
        if pool is None:
            raise RuntimeError("task runner is not started")
        _load.change(queued=1)
        try:
            future = pool.submit(call, *args, **kwargs)
        except BaseException:
            _load.change(queued=-1)
            raise
        future.add_done_callback(lambda f: _finished(name, f))

    def _schedule_loop(self) -> None:
        next_run: dict[str, float] = {}
        while not self._stop.is_set():
            now = time.monotonic()
            for periodic_task in registered_periodic_tasks():
                due = next_run.get(periodic_task.name, now)
                if now >= due:
                    next_run[periodic_task.name] = now + periodic_task.interval()
                    self._submit_periodic(periodic_task.name)
            wait = min((t - now for t in next_run.values()), default=1.0)
            self._stop.wait(max(0.05, min(wait, 1.0)))

    def _submit_periodic(self, name: str) -> None:
        with self._running_lock:
            if name in self._running or self._pool is None:
                return
            self._running.add(name)

        def run() -> None:
            try:
                _execute(name, _tasks[name], {}, queued=True)
            finally:
                with self._running_lock:
                    self._running.discard(name)

        try:
            self._enqueue(name, run)
        except RuntimeError:  # the pool shut down meanwhile
            with self._running_lock:
                self._running.discard(name)


def _finished(name: str, future: Future[Any]) -> None:
    if future.cancelled():  # never started (the runner stopped first)
        _load.change(queued=-1)
        return
    exc = future.exception()
    if exc is not None:
        log.error("task %s failed: %s", name, exc, exc_info=exc)
