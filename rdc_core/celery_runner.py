"""The Celery task backend (``RDC_TASK_BACKEND=celery``): production's workers and beat.

The same registry of named tasks as the in-process runner (:mod:`rdc_core.tasks`) becomes a
Celery app: each task keeps its name, is retried with backoff when the database or the
object store is unavailable, and acknowledged only after it ran (``acks_late``), so a
worker killed mid-task leaves the task for another worker. Tasks are idempotent, which is
what makes running them again safe. Periodic tasks become the beat schedule.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from rdc_core.errors import DatabaseUnavailableError, StorageError
from rdc_core.settings import Settings
from rdc_core.tasks import registered_periodic_tasks, registered_tasks

__all__ = ["CeleryTaskRunner", "make_celery_app"]


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
        )(func)
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
        """Nothing to start here: ``rdc worker`` and ``rdc beat`` run the tasks."""

    def stop(self) -> None:
        """Nothing to stop."""
