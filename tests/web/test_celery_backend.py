"""Production task backend: Celery worker and beat on Redis run the stable-study detection;
their metrics (queue depth, task run times and failures) and the broker readiness check, on
Redis and RabbitMQ."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from pynetdicom import AE

from tests.helpers import RdcServer, free_port, wait_for
from tests.rdc_core.test_metrics import metric_value, scrape, value

pytestmark = pytest.mark.production  # needs PostgreSQL/S3/Redis: the production pass

AMQP_URL = os.environ.get("RDC_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
READY_TASK = "worklist.mark_stable_exams_ready"


@pytest.fixture
def celery_env(rdc_env: dict[str, str]) -> Iterator[dict[str, str]]:
    import redis

    broker = os.environ.get("RDC_TEST_BROKER_URL", "redis://127.0.0.1:6379/0")
    try:
        redis.Redis.from_url(broker).ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is required for the Celery backend test and did not answer: {exc}")
    queue = f"rdc-test-{uuid.uuid4().hex[:12]}"
    yield {
        **rdc_env,
        "RDC_TASK_BACKEND": "celery",
        "RDC_BROKER_URL": broker,
        "RDC_TASK_QUEUE": queue,
        "RDC_STABLE_SCAN_INTERVAL_SECONDS": "1",
    }
    # The queue, and the exchange bindings kombu keeps beside it.
    redis.Redis.from_url(broker).delete(
        queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"
    )


def _start(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "web.cli", *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def test_beat_and_worker_make_exams_ready(
    celery_env: dict[str, str], alliance: dict[str, str], testdata: Path, tmp_path: Path
) -> None:
    from celery import Celery

    server = RdcServer(celery_env, tmp_path / "serve.log", workers=False)  # started below
    server.start()
    processes: list[subprocess.Popen[bytes]] = []
    queue = celery_env["RDC_TASK_QUEUE"]
    try:
        ds = pydicom.dcmread(testdata / "dicom" / "CT_small.dcm")
        ae = AE(ae_title="CLINIC_A_CT")
        ae.add_requested_context(ds.SOPClassUID)
        assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="RDC")
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()

        # Three tasks wait on the broker, no worker runs: the service's /metrics shows them.
        client = Celery(broker=celery_env["RDC_BROKER_URL"])
        for _ in range(3):
            client.send_task(READY_TASK, queue=queue)
        depth = value(scrape(server.http), "rdc_task_queue_depth", backend="celery", queue=queue)
        assert depth == 3

        # With the Celery backend the service itself runs no background work.
        time.sleep(4)  # twice the stable age
        with server.db() as db:
            assert db.execute("SELECT state FROM exams").fetchone()[0] == "RECEIVING"

        # A prefork worker (production's pool) serves its own metrics.
        metrics = f"http://127.0.0.1:{free_port()}"
        worker_env = {**celery_env, "RDC_METRICS_PORT": metrics.rsplit(":", 1)[1]}
        processes.append(
            _start(worker_env, tmp_path / "worker.log", "worker", "--concurrency", "1")
        )
        processes.append(_start(celery_env, tmp_path / "beat.log", "beat"))
        reader = server.client("reader", alliance["reader"])
        page = wait_for(
            lambda: (p := reader.get("/api/v1/worklist").json())["total"] == 1 and p,
            timeout=60,
            what=f"beat + worker to queue the exam (logs in {tmp_path})",
        )
        assert page["items"][0]["study_instance_uid"] == ds.StudyInstanceUID
        with server.db() as db:
            assert db.execute("SELECT count(*) FROM work_items").fetchone()[0] == 1
        assert READY_TASK in (tmp_path / "worker.log").read_text()

        # The worker ran the three queued tasks and beat's: its histogram counted them (in the
        # main process, although they ran in a pool process), and the queue drained.
        worker = wait_for(
            lambda: (
                (m := _scrape_if_up(metrics))
                and (value(m, "rdc_task_seconds_count", task=READY_TASK, outcome="success") or 0)
                >= 4
                and m
            ),
            timeout=30,
            what=f"the worker's /metrics (RDC_METRICS_PORT) to count the runs (logs in {tmp_path})",
        )
        assert value(worker, "rdc_task_failures_total", task=READY_TASK) == 0
        assert value(worker, "rdc_metrics_source_up", source="broker") == 1
        wait_for(
            lambda: (
                value(scrape(server.http), "rdc_task_queue_depth", backend="celery", queue=queue)
                == 0
            ),
            timeout=15,
            what="the queue depth to drop to 0",
        )
        service = scrape(server.http)
        assert value(service, "rdc_work_items_open", priority="routine") == 1
        assert value(service, "rdc_exams_receiving") == 0
    finally:
        for proc in processes:
            _stop(proc)
        server.stop()


def _scrape_if_up(base_url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    try:
        return scrape(base_url)
    except httpx.ConnectError:
        return {}


@pytest.fixture
def throwaway_tasks() -> Iterator[None]:
    """Tasks that fail, once or always; they leave the registry after the test."""
    from rdc_core import tasks
    from rdc_core.errors import DatabaseUnavailableError

    flag = {"failed": False}

    def flaky() -> None:  # fails once as a database outage does: retried
        if not flag["failed"]:
            flag["failed"] = True
            raise DatabaseUnavailableError("database restarting")

    def broken() -> None:  # a bug: not retried
        raise ValueError("broken task")

    tasks.task("tests.flaky")(flaky)
    tasks.task("tests.broken")(broken)
    yield
    for name in ("tests.flaky", "tests.broken"):
        tasks._tasks.pop(name, None)


def test_worker_counts_failures_and_retries(
    celery_env: dict[str, str], throwaway_tasks: None, tmp_path: Path
) -> None:
    from celery.contrib.testing.worker import start_worker

    from rdc_core.celery_runner import make_celery_app
    from rdc_core.metrics import TASK_FAILURES, TASK_RETRIES, TASK_SECONDS
    from rdc_core.settings import Settings

    app = make_celery_app(
        Settings(
            data_dir=tmp_path,
            task_backend="celery",
            broker_url=celery_env["RDC_BROKER_URL"],
            task_queue=celery_env["RDC_TASK_QUEUE"],
        )
    )

    def runs(task: str, outcome: str) -> float:
        return metric_value(TASK_SECONDS, "rdc_task_seconds_count", task=task, outcome=outcome)

    before = {
        (task, outcome): runs(task, outcome)
        for task in ("tests.flaky", "tests.broken")
        for outcome in ("success", "failure", "retry")
    }
    # prefork, as in production: the results come back from the pool process.
    with start_worker(app, pool="prefork", concurrency=1, perform_ping_check=False):
        app.send_task("tests.flaky")
        app.send_task("tests.broken")
        wait_for(
            lambda: (
                runs("tests.flaky", "success") > before["tests.flaky", "success"]
                and runs("tests.broken", "failure") > before["tests.broken", "failure"]
            ),
            timeout=30,
            what="the tasks to run (the retry comes after a backoff of up to 2 s)",
        )
    assert runs("tests.flaky", "retry") == before["tests.flaky", "retry"] + 1
    assert runs("tests.broken", "success") == before["tests.broken", "success"]
    assert metric_value(TASK_RETRIES, "rdc_task_retries_total", task="tests.flaky") == 1
    assert metric_value(TASK_FAILURES, "rdc_task_failures_total", task="tests.flaky") == 0
    assert metric_value(TASK_FAILURES, "rdc_task_failures_total", task="tests.broken") == 1


@pytest.mark.parametrize(
    ("broker", "ready"),
    [
        ("redis", True),
        ("amqp", True),
        ("amqp-wrong-password", False),
        ("amqp-closed-port", False),
        ("redis-closed-port", False),
    ],
)
def test_readyz_checks_the_broker(
    database: str, monkeypatch: pytest.MonkeyPatch, broker: str, ready: bool
) -> None:
    from rdc_core.settings import reset_settings
    from web.api.health import readyz

    url = {
        "redis": os.environ.get("RDC_TEST_BROKER_URL", "redis://127.0.0.1:6379/0"),
        "amqp": AMQP_URL,
        "amqp-wrong-password": AMQP_URL.replace("guest@", "wrong-password@"),
        "amqp-closed-port": f"amqp://guest:guest@127.0.0.1:{free_port()}//",
        "redis-closed-port": f"redis://127.0.0.1:{free_port()}/0",
    }[broker]
    monkeypatch.setenv("RDC_TASK_BACKEND", "celery")
    monkeypatch.setenv("RDC_BROKER_URL", url)
    reset_settings()
    response = readyz()
    body = json.loads(bytes(response.body))
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["store"] == "ok"
    if ready:
        assert response.status_code == 200, body
        assert body["checks"]["broker"] == "ok"
    else:
        assert response.status_code == 503, body
        assert body["checks"]["broker"].startswith("error: "), body


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_broker_queue_depth(broker: str) -> None:
    from kombu import Connection, Queue

    from rdc_core.celery_runner import broker_queue_depth

    url = {
        "redis": os.environ.get("RDC_TEST_BROKER_URL", "redis://127.0.0.1:6379/0"),
        "amqp": AMQP_URL,
    }[broker]
    name = f"rdc-test-{uuid.uuid4().hex[:12]}"
    assert broker_queue_depth(url, name) == 0  # never declared: nothing waits
    with Connection(url) as connection:
        queue = Queue(name)(connection.default_channel)
        queue.declare()
        try:
            producer = connection.Producer(routing_key=name)
            for i in range(5):
                producer.publish({"n": i})
            wait_for(lambda: broker_queue_depth(url, name) == 5, timeout=5, what="5 messages")
            assert queue.get(no_ack=True) is not None  # one message taken off
            wait_for(lambda: broker_queue_depth(url, name) == 4, timeout=5, what="4 messages")
        finally:
            queue.purge()
            queue.delete()
    with pytest.raises(Exception):  # noqa: B017  (whatever the transport raises)
        broker_queue_depth(f"redis://127.0.0.1:{free_port()}/0", name, timeout=1)
