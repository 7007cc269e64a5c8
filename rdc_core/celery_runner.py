"""The Celery task backend (``RDC_TASK_BACKEND=celery``): production's workers and beat.

The same registry of named tasks as the in-process runner (:mod:`rdc_core.tasks`) becomes a
Celery app: each task keeps its name, is retried with backoff when the database or the
object store is unavailable, and acknowledged only after it ran (``acks_late``), so a
worker killed mid-task leaves the task for another worker. Tasks are idempotent, which is
what makes running them again safe. Periodic tasks become the beat schedule.

Metrics (:mod:`rdc_core.metrics`):

- every process with the app reports the depth of the broker queue at scrape time
  (``rdc_task_queue_depth{backend="celery"}``): Redis list lengths or RabbitMQ's message
  count, through a passive queue declare;
- a worker records each task's run time and outcome in its main process, where Celery hands
  back the result of every pool (prefork children included), and serves ``/metrics`` on
  ``RDC_METRICS_PORT`` when that is set.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from celery import Celery, bootsteps
from celery.exceptions import Retry, WorkerLostError
from celery.worker.request import Request
from kombu import Connection
from kombu.exceptions import ChannelError

from rdc_core.errors import DatabaseUnavailableError, StorageError
from rdc_core.metrics import (
    FAILURE,
    RETRY,
    SUCCESS,
    GaugeSample,
    declare_tasks,
    observe_task,
    register_gauge_source,
)
from rdc_core.settings import Settings
from rdc_core.tasks import (
    active_runner,
    registered_periodic_tasks,
    registered_tasks,
    set_active_runner,
)

__all__ = ["CeleryTaskRunner", "MeasuredRequest", "broker_queue_depth", "make_celery_app"]

log = logging.getLogger(__name__)


def make_celery_app(settings: Settings) -> Celery:
    """A Celery app with every registered task and the periodic schedule.

    Register the tasks first (import the modules that declare them).
    """
    if not settings.broker_url:
        raise ValueError("RDC_BROKER_URL is required with RDC_TASK_BACKEND=celery")
    app = Celery("rdc", broker=settings.broker_url)
    app.conf.update(
        task_default_queue=settings.task_queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        timezone="UTC",
        beat_schedule={
            periodic.name: {
                "task": periodic.name,
                "schedule": periodic.interval(),
                "options": {"expires": max(periodic.interval() * 2, 1.0)},
            }
            for periodic in registered_periodic_tasks()
        },
    )
    for name, func in registered_tasks().items():
        app.task(
            name=name,
            autoretry_for=(DatabaseUnavailableError, StorageError),
            retry_backoff=True,
            retry_backoff_max=60,
            max_retries=8,
            Request=MeasuredRequest,
        )(func)
    declare_tasks(registered_tasks())
    register_gauge_source(
        "broker", _queue_depth_sampler(settings.broker_url, settings.task_queue), timeout=3.0
    )
    # RDC_METRICS_PORT (Settings.metrics_port; read with getattr until that field exists).
    metrics_port = settings.metrics_port
    if metrics_port:
        app.steps["worker"].add(_metrics_server_step(settings.http_host, metrics_port))
    return app


class CeleryTaskRunner:
    """Enqueues registered tasks on the broker; workers and beat run separately."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def submit(self, name: str, /, **kwargs: Any) -> None:
        if name not in registered_tasks():
            raise KeyError(f"no task named {name!r}")
        self.app.send_task(name, kwargs=kwargs)

    def start(self) -> None:
        """Nothing to start here: ``rdc worker`` and ``rdc beat`` run the tasks. Tasks
        enqueued after a commit (:func:`rdc_core.tasks.submit_after_commit`) go to the
        broker from now on."""
        set_active_runner(self)

    def stop(self) -> None:
        """Tasks enqueued after a commit are no longer sent from this process."""
        if active_runner() is self:
            set_active_runner(None)


# --- queue depth ------------------------------------------------------------------------


def broker_queue_depth(broker_url: str, queue: str, *, timeout: float = 2.0) -> int:
    """How many messages wait in ``queue`` on the broker.

    A passive queue declare, which declares nothing: RabbitMQ answers with the queue's message
    count, kombu's Redis transport with the lengths of the queue's lists (one per priority).
    A queue that does not exist yet holds nothing.
    """
    with Connection(
        broker_url,
        connect_timeout=timeout,
        transport_options={"socket_timeout": timeout, "socket_connect_timeout": timeout},
    ) as connection:
        channel = connection.channel()
        try:
            return int(channel.queue_declare(queue=queue, passive=True).message_count)
        except ChannelError as exc:
            if str(getattr(exc, "reply_code", "")) == "404":  # NOT_FOUND
                return 0
            raise
        finally:
            with contextlib.suppress(Exception):  # RabbitMQ already closed it after a 404
                channel.close()


def _queue_depth_sampler(broker_url: str, queue: str) -> Callable[[], list[GaugeSample]]:
    def sample() -> list[GaugeSample]:
        return [("rdc_task_queue_depth", ("celery", queue), broker_queue_depth(broker_url, queue))]

    return sample


# --- task run times -----------------------------------------------------------------------


def _outcome(failed: bool, retval: Any) -> str:
    if not failed:
        return SUCCESS
    return RETRY if isinstance(_exception(retval), Retry) else FAILURE


def _exception(exc_info: Any) -> Any:
    """The exception of an ExceptionInfo (unwrapped from billiard's ExceptionWithTraceback)."""
    exc = getattr(exc_info, "exception", None)
    return exc.exc if isinstance(exc, ExceptionWithTraceback) else exc


def _measured(on_success: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``Request.on_success``, which the worker's main process calls with
    ``(failed, result or ExceptionInfo, run time)`` after every run, whatever the pool."""

    @functools.wraps(on_success)
    def wrapper(self: Request, failed__retval__runtime: Any, **kwargs: Any) -> Any:
        if not self.__dict__.get("_rdc_measured"):
            self.__dict__["_rdc_measured"] = True
            try:
                failed, retval, runtime = failed__retval__runtime
                if runtime is None and self.time_start:
                    # Celery times successful runs only; a failed run took from its start
                    # (reported by the pool when the task began) until now.
                    runtime = max(0.0, time.time() - self.time_start)
                observe_task(self.name, _outcome(failed, retval), runtime)
            except Exception:  # metrics never get in the way of acknowledging the task
                log.exception("could not record the run of task %s", self.name)
        return on_success(self, failed__retval__runtime, **kwargs)

    wrapper._rdc_measured = True  # type: ignore[attr-defined]
    return wrapper


class MeasuredRequest(Request):
    """Celery's task request, recording run time and outcome of each run in the worker's main
    process (prefork children's metrics would never reach ``/metrics``).

    The worker subclasses a task's request class once more and overrides ``on_success``
    there (``celery.worker.request.create_request_cls``); ``__init_subclass__`` wraps that
    override too.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("on_success")
        if own is not None and not getattr(own, "_rdc_measured", False):
            cls.on_success = _measured(own)

    on_success = _measured(Request.on_success)

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        # Called directly (not through on_success) when the run gave no result: the pool
        # process running it died.
        if not return_ok and isinstance(_exception(exc_info), WorkerLostError):
            observe_task(self.name, FAILURE, None)
        return super().on_failure(
            exc_info, send_failed_event=send_failed_event, return_ok=return_ok
        )


# --- /metrics of a worker -----------------------------------------------------------------


def _metrics_server_step(host: str, port: int) -> type[bootsteps.StartStopStep]:
    class MetricsServer(bootsteps.StartStopStep):
        """Serves the worker's ``/metrics`` from its main process (after the pool started)."""

        label = "rdc metrics"
        requires = ("celery.worker.components:Pool",)

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.server: Any = None

        def start(self, parent: Any) -> None:
            from prometheus_client import start_http_server

            self.server, _ = start_http_server(port, addr=host)
            log.info("metrics on http://%s:%s/metrics", host, port)

        def stop(self, parent: Any) -> None:
            if self.server is not None:
                self.server.shutdown()
                self.server.server_close()
                self.server = None

        terminate = stop

    return MetricsServer
