"""Metrics: task run times and failures, the backlog gauges computed at scrape time, and what a
running ``rdc serve`` exposes on ``/metrics``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE

from rdc_core import tasks
from rdc_core.metrics import (
    TASK_FAILURES,
    TASK_SECONDS,
    GaugeSample,
    _GaugeSource,
    _ScrapeTimeGauges,
)
from tests.helpers import RdcServer, free_port, wait_for

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Prometheus text exposition -> {(sample name, labels): value}."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(base_url: str) -> Samples:
    """GET ``base_url``/metrics and parse it."""
    response = httpx.get(f"{base_url}/metrics", timeout=15)
    assert response.status_code == 200, response.text
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def metric_value(metric: MetricWrapperBase, name: str, **labels: str) -> float:
    """A sample of one metric object (without running the scrape-time gauge sources)."""
    for family in metric.collect():
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


# --- scrape-time gauges -----------------------------------------------------------------------


def _collect(collector: _ScrapeTimeGauges) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in collector.collect()
        for sample in family.samples
    }


def test_gauge_sources_are_cached_bounded_and_never_fail_the_scrape() -> None:
    calls = {"fast": 0}
    release = threading.Event()

    def fast() -> list[GaugeSample]:
        calls["fast"] += 1
        return [("rdc_exams_receiving", (), 7)]

    def slow() -> list[GaugeSample]:
        release.wait(10)
        return [("rdc_task_queue_depth", ("celery", "q"), 3)]

    def broken() -> list[GaugeSample]:
        raise ConnectionError("database is down")

    def wrong() -> list[GaugeSample]:
        return [("rdc_work_items_open", (), 1)]  # missing its priority label

    collector = _ScrapeTimeGauges()
    collector.add(_GaugeSource("fast", fast, ttl=60, timeout=1, blocking=True))
    collector.add(_GaugeSource("slow", slow, ttl=0, timeout=0.3, blocking=True))
    collector.add(_GaugeSource("broken", broken, ttl=0, timeout=1, blocking=True))
    collector.add(_GaugeSource("wrong", wrong, ttl=0, timeout=1, blocking=False))
    try:
        started = time.monotonic()
        first = _collect(collector)
        assert time.monotonic() - started < 2  # sources are waited for in parallel
        assert value(first, "rdc_exams_receiving") == 7
        assert value(first, "rdc_metrics_source_up", source="fast") == 1
        assert value(first, "rdc_metrics_source_up", source="slow") == 0
        assert value(first, "rdc_metrics_source_up", source="broken") == 0
        assert value(first, "rdc_metrics_source_up", source="wrong") == 0
        assert not any(name == "rdc_task_queue_depth" for name, _ in first)

        # The slow source answers meanwhile: the next scrape has it. The fast one is cached.
        release.set()
        wait_for(
            lambda: (
                value(_collect(collector), "rdc_task_queue_depth", backend="celery", queue="q") == 3
            ),
            timeout=5,
            what="the slow source's value",
        )
        assert calls["fast"] == 1
    finally:
        release.set()


# --- the in-process runner --------------------------------------------------------------------


@pytest.fixture
def test_tasks() -> Iterator[Callable[[str, Callable[..., object]], str]]:
    """Register throw-away tasks; they leave the registry after the test."""
    names: list[str] = []

    def register(name: str, func: Callable[..., object]) -> str:
        tasks.task(name)(func)
        names.append(name)
        return name

    yield register
    for name in names:
        tasks._tasks.pop(name, None)


def test_inprocess_runner_records_run_times_failures_and_load(
    test_tasks: Callable[[str, Callable[..., object]], str],
) -> None:
    gate = threading.Event()
    ok = test_tasks("tests.metrics.ok", lambda: None)
    boom = test_tasks("tests.metrics.boom", lambda: 1 / 0)
    blocked = test_tasks("tests.metrics.blocked", lambda: gate.wait(10))

    def count(task: str, outcome: str) -> float:
        return metric_value(TASK_SECONDS, "rdc_task_seconds_count", task=task, outcome=outcome)

    def load() -> tuple[float, float]:
        samples = dict(((name, labels), v) for name, labels, v in tasks._load.samples())
        return (
            samples[("rdc_task_queue_depth", ("inprocess", "inprocess"))],
            samples[("rdc_tasks_running", ("inprocess",))],
        )

    runner = tasks.InProcessTaskRunner(threads=1, run_periodic=False)
    runner.start()
    try:
        # Declared at start: the series exist at zero before the first run.
        assert metric_value(TASK_FAILURES, "rdc_task_failures_total", task=boom) == 0
        base = load()
        runner.submit(blocked)
        runner.submit(ok)
        runner.submit(boom)
        wait_for(
            lambda: load() == (base[0] + 2, base[1] + 1), timeout=5, what="1 running, 2 queued"
        )
        gate.set()
        wait_for(lambda: count(boom, "failure") == 1, timeout=5, what="the failing task to run")
        wait_for(lambda: load() == base, timeout=5, what="the runner to drain")
        assert count(ok, "success") == 1
        assert count(blocked, "success") == 1
        assert metric_value(TASK_FAILURES, "rdc_task_failures_total", task=boom) == 1
        assert metric_value(TASK_SECONDS, "rdc_task_seconds_sum", task=blocked, outcome="success")

        runner.run_now(ok)
        assert count(ok, "success") == 2
    finally:
        gate.set()
        runner.stop()


# --- a running server -------------------------------------------------------------------------


def test_server_metrics_move_with_tasks_and_backlog(
    server: RdcServer, testdata: Path, alliance: dict[str, str]
) -> None:
    # Send a study first: the backlog gauges are computed at the first scrape, and the exam
    # stays RECEIVING for the stable age (2 s) only.
    ds = pydicom.dcmread(testdata / "dicom" / "CT_small.dcm")
    ae = AE(ae_title="CLINIC_A_CT")
    ae.add_requested_context(ds.SOPClassUID)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="RDC")
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()

    task = "worklist.mark_stable_exams_ready"
    # Embedded, the tasks run in rdc serve, which reports their queue, load and run times. On
    # Celery (the production pass) rdc serve reports the broker queue and the worker the runs.
    if server.worker_metrics:
        backend, queue, source, runs_at = (
            "celery",
            server.env["RDC_TASK_QUEUE"],
            "broker",
            server.worker_metrics,
        )
    else:
        backend, queue, source, runs_at = "inprocess", "inprocess", "inprocess", server.http
    first = scrape(server.http)
    assert value(first, "rdc_metrics_source_up", source="worklist") == 1
    assert value(first, "rdc_metrics_source_up", source=source) == 1
    assert value(first, "rdc_exams_receiving") == 1
    assert value(first, "rdc_task_queue_depth", backend=backend, queue=queue) is not None
    if backend == "inprocess":
        assert value(first, "rdc_tasks_running", backend="inprocess") is not None
    tasks = scrape(runs_at)
    assert value(tasks, "rdc_task_failures_total", task=task) == 0
    assert value(tasks, "rdc_task_retries_total", task=task) == 0
    for priority in ("emergency", "urgent", "routine"):
        assert value(first, "rdc_work_items_open", priority=priority) == 0
        assert value(first, "rdc_work_items_overdue", priority=priority) == 0
    runs = value(tasks, "rdc_task_seconds_count", task=task, outcome="success") or 0

    # The periodic READY detection runs every 0.5 s: its histogram moves.
    wait_for(
        lambda: (
            (value(scrape(runs_at), "rdc_task_seconds_count", task=task, outcome="success") or 0)
            > runs
        ),
        timeout=10,
        what="the READY detection to run",
    )

    # The exam becomes READY and queued: the backlog follows (within the 5 s cache).
    def queued() -> Samples | None:
        samples = scrape(server.http)
        open_items = sum(
            value(samples, "rdc_work_items_open", priority=p) or 0
            for p in ("emergency", "urgent", "routine")
        )
        return samples if open_items == 1 and value(samples, "rdc_exams_receiving") == 0 else None

    wait_for(queued, timeout=20, what="the backlog gauges to show one open work item")


def test_scrape_succeeds_when_the_broker_is_down(database: str) -> None:
    """A broker that does not answer leaves its gauge out; the scrape still answers."""
    from prometheus_client import generate_latest

    import web.api.health  # noqa: F401  (registers the backlog gauges)
    import worklist.tasks  # noqa: F401  (registers the tasks)
    from rdc_core.celery_runner import make_celery_app
    from rdc_core.metrics import unregister_gauge_source
    from rdc_core.settings import Settings

    # The rest of the settings come from the environment the database fixture set.
    make_celery_app(
        Settings(task_backend="celery", broker_url=f"redis://127.0.0.1:{free_port()}/0")
    )
    try:
        started = time.monotonic()
        samples = parse(generate_latest().decode())
        assert time.monotonic() - started < 6
        assert value(samples, "rdc_metrics_source_up", source="broker") == 0
        assert value(samples, "rdc_metrics_source_up", source="worklist") == 1
        assert not any(
            name == "rdc_task_queue_depth" and ("backend", "celery") in labels
            for name, labels in samples
        )
    finally:
        unregister_gauge_source("broker")
