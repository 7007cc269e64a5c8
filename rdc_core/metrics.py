"""Prometheus metrics of this process.

They are exposed at ``/metrics`` by the web layer, on ``RDC_HTTP_PORT`` by a DICOM-only
replica, and on ``RDC_METRICS_PORT`` by ``rdc worker``.

Two kinds:

- counters and histograms that the code updates as things happen (objects received, task
  run times and failures);
- gauges of a backlog (the broker queue, exams still receiving, open work items), computed
  when Prometheus scrapes, by *gauge sources* (:func:`register_gauge_source`). A source's
  result is kept for a few seconds, and a scrape waits for a slow source only up to its
  timeout: a slow or broken backend never fails or stalls the scrape. Its series are left out
  of that scrape instead, and ``rdc_metrics_source_up{source=…}`` is 0.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Final

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "DICOM_BYTES",
    "DICOM_CONNECTIONS",
    "DICOM_FAILURES",
    "DICOM_INSTANCES",
    "FAILURE",
    "GAUGES",
    "LAB_MESSAGES",
    "RETRY",
    "SUCCESS",
    "TASK_FAILURES",
    "TASK_RETRIES",
    "TASK_SECONDS",
    "GaugeSample",
    "declare_tasks",
    "observe_task",
    "register_gauge_source",
    "unregister_gauge_source",
]

log = logging.getLogger(__name__)

DICOM_INSTANCES = Counter(
    "rdc_dicom_instances_total", "DICOM objects received and indexed, by outcome", ["outcome"]
)
DICOM_BYTES = Counter("rdc_dicom_received_bytes_total", "Bytes of DICOM objects received")
DICOM_FAILURES = Counter(
    "rdc_dicom_failures_total", "C-STORE requests answered with a failure, by status", ["status"]
)
DICOM_CONNECTIONS = Counter(
    "rdc_dicom_connections_total",
    "DICOM connections handed to each listener process (RDC_DICOM_PROCESSES > 1), by its index",
    ["process"],
)
LAB_MESSAGES = Counter(
    "rdc_lab_messages_total",
    "HL7 v2 lab messages answered, by channel (mllp, http) and acknowledgement code",
    ["channel", "code"],
)

# Outcomes of one run of a background task.
SUCCESS: Final = "success"
FAILURE: Final = "failure"  # failed for good
RETRY: Final = "retry"  # failed, and will run again

TASK_SECONDS = Histogram(
    "rdc_task_seconds",
    "Run time of background tasks, by task and outcome (success, failure, retry)",
    ["task", "outcome"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120),
)
TASK_FAILURES = Counter(
    "rdc_task_failures_total", "Background task runs that failed for good (not retried)", ["task"]
)
TASK_RETRIES = Counter(
    "rdc_task_retries_total", "Background task runs that failed and were queued again", ["task"]
)


def observe_task(task: str, outcome: str, seconds: float | None) -> None:
    """Record one run of ``task``: its run time (when known) and whether it failed."""
    if seconds is not None:
        TASK_SECONDS.labels(task=task, outcome=outcome).observe(seconds)
    if outcome == FAILURE:
        TASK_FAILURES.labels(task=task).inc()
    elif outcome == RETRY:
        TASK_RETRIES.labels(task=task).inc()


def declare_tasks(names: Iterable[str]) -> None:
    """Create the series of these tasks at zero, so that they exist before the first run."""
    for name in names:
        TASK_SECONDS.labels(task=name, outcome=SUCCESS)
        TASK_FAILURES.labels(task=name)
        TASK_RETRIES.labels(task=name)


# The gauges computed at scrape time: name -> (help, label names). Sources may only report
# these, so that every process exposes the same families with the same labels.
GAUGES: Final[dict[str, tuple[str, tuple[str, ...]]]] = {
    "rdc_task_queue_depth": (
        "Background tasks waiting to run: messages in the broker queue (backend celery), or "
        "tasks submitted to this process and not started yet (backend inprocess)",
        ("backend", "queue"),
    ),
    "rdc_tasks_running": ("Background tasks running in this process", ("backend",)),
    "rdc_exams_receiving": ("Exams still receiving instances (not READY yet)", ()),
    "rdc_work_items_open": ("Open work items (exams to be read), by priority", ("priority",)),
    "rdc_work_items_overdue": ("Open work items past their due time, by priority", ("priority",)),
    "rdc_audit_chain_intact": (
        "1 when the last verification found the audit trail intact, 0 when it did not",
        (),
    ),
    "rdc_audit_chain_verified_timestamp_seconds": (
        "When the audit trail was last verified (Unix time)",
        (),
    ),
}
SOURCE_UP = "rdc_metrics_source_up"

GaugeSample = tuple[str, tuple[str, ...], float]
"""One value of a gauge: (name in :data:`GAUGES`, label values in the declared order, value)."""


class _GaugeSource:
    """One source of scrape-time gauges: at most one refresh at a time, kept ``ttl`` seconds."""

    def __init__(
        self,
        name: str,
        sample: Callable[[], Iterable[GaugeSample]],
        *,
        ttl: float,
        timeout: float,
        blocking: bool,
    ) -> None:
        self.name = name
        self.timeout = timeout
        self._sample = sample
        self._ttl = ttl
        self._blocking = blocking
        self._lock = threading.Lock()
        self._samples: list[GaugeSample] | None = None  # None: the last refresh failed
        self._taken = -math.inf  # monotonic time the last refresh ended
        self._refreshing: threading.Event | None = None  # set when the refresh in flight ends
        self._failing = False

    def begin(self) -> threading.Event | None:
        """Start a refresh unless the last result is recent enough or one is under way;
        returns the event to wait for, or None when the result is ready."""
        with self._lock:
            if self._refreshing is not None:
                return self._refreshing
            if time.monotonic() - self._taken < self._ttl:
                return None
            done = self._refreshing = threading.Event()
        if not self._blocking:
            self._refresh(done)
            return None
        threading.Thread(
            target=self._refresh, args=(done,), name=f"rdc-metrics-{self.name}", daemon=True
        ).start()
        return done

    def result(self) -> list[GaugeSample] | None:
        """The samples of the last refresh; None when it failed or is still running."""
        with self._lock:
            return None if self._refreshing is not None else self._samples

    def _refresh(self, done: threading.Event) -> None:
        samples: list[GaugeSample] | None
        try:
            samples = [_checked(sample) for sample in self._sample()]
        except Exception as exc:  # a broken backend must never break the scrape
            samples = None
            if not self._failing:
                log.warning("metrics source %s failed: %s", self.name, exc)
        else:
            if self._failing:
                log.info("metrics source %s answers again", self.name)
        with self._lock:
            self._failing = samples is None
            self._samples = samples
            self._taken = time.monotonic()
            self._refreshing = None
        done.set()


def _checked(sample: GaugeSample) -> GaugeSample:
    name, labels, value = sample
    if name not in GAUGES:
        raise ValueError(f"unknown gauge {name!r}")
    if len(labels) != len(GAUGES[name][1]):
        raise ValueError(f"gauge {name} takes labels {GAUGES[name][1]}, got {labels}")
    return name, tuple(str(v) for v in labels), float(value)


class _ScrapeTimeGauges(Collector):
    """The collector behind every gauge source (registered once on the default registry)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sources: dict[str, _GaugeSource] = {}

    def add(self, source: _GaugeSource) -> None:
        with self._lock:
            self._sources[source.name] = source

    def remove(self, name: str) -> None:
        with self._lock:
            self._sources.pop(name, None)

    def describe(self) -> Iterator[Metric]:
        for name, (documentation, labels) in GAUGES.items():
            yield GaugeMetricFamily(name, documentation, labels=labels)
        yield GaugeMetricFamily(SOURCE_UP, "", labels=["source"])

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            sources = list(self._sources.values())
        if not sources:
            return
        started = time.monotonic()
        # Every source refreshes in parallel; each is waited for up to its own timeout.
        pending = [(source, source.begin()) for source in sources]
        families = {
            name: GaugeMetricFamily(name, documentation, labels=labels)
            for name, (documentation, labels) in GAUGES.items()
        }
        up = GaugeMetricFamily(
            SOURCE_UP,
            "Whether a source of the scrape-time gauges answered in time (1) or not (0)",
            labels=["source"],
        )
        for source, done in pending:
            if done is not None:
                done.wait(max(0.0, started + source.timeout - time.monotonic()))
            samples = source.result()
            up.add_metric([source.name], 0.0 if samples is None else 1.0)
            for name, labels, value in samples or ():
                families[name].add_metric(list(labels), value)
        yield from (family for family in families.values() if family.samples)
        yield up


_COLLECTOR = _ScrapeTimeGauges()
REGISTRY.register(_COLLECTOR)


def register_gauge_source(
    name: str,
    sample: Callable[[], Iterable[GaugeSample]],
    *,
    ttl: float = 5.0,
    timeout: float = 2.5,
    blocking: bool = True,
) -> None:
    """Compute gauges of :data:`GAUGES` with ``sample()`` when Prometheus scrapes.

    ``sample`` runs in a helper thread (``blocking=False``: in the scrape itself, for cheap
    in-memory values); its result is reused for ``ttl`` seconds, and a scrape waits for it at
    most ``timeout`` seconds. Registering a name again replaces the source.
    """
    _COLLECTOR.add(_GaugeSource(name, sample, ttl=ttl, timeout=timeout, blocking=blocking))


def unregister_gauge_source(name: str) -> None:
    """Stop computing the gauges of source ``name``."""
    _COLLECTOR.remove(name)
