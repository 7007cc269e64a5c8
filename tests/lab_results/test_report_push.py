"""Push of a signed report to the clinic's HIS as HL7 ORU^R01 over MLLP: a real socket
server plays the HIS. The retry works after the HIS was down, an AE answer is a recorded
failure, and two concurrent delivery runs never send one delivery twice."""

from __future__ import annotations

import base64
import hashlib
import socketserver
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import hl7
import pytest
from sqlalchemy import select

import lab_results.report_push  # noqa: F401  (registers the "hl7" sender)
from rdc_core.db import session_scope, utcnow
from tests.helpers import free_port
from tests.worklist.conftest import Reading, reading  # noqa: F401  (fixture)
from tests.worklist.test_delivery import add_clinic_endpoint, amend, finalize, set_patient_name
from worklist.delivery.models import DeliveryAttempt, DeliveryState, ReportDelivery
from worklist.delivery.tasks import deliver_due_reports
from worklist.signing.service import get_signed_artifact


def strict_hl7apy_problem(message: str) -> str:
    """Why hl7apy, validating strictly against HL7 v2.5.1, refuses ``message`` ("" if not)."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    try:
        parsed = parse_message(message, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
        parsed.validate()
    except Exception as exc:  # hl7apy raises a class per rule broken
        return f"{type(exc).__name__}: {str(exc)[:60]}"
    return ""


class His:
    """An MLLP listener that keeps each message and answers ``code`` (AA, AE, AR)."""

    def __init__(
        self, port: int, *, code: str = "AA", delay: float = 0.0, strict: bool = False
    ) -> None:
        self.messages: list[str] = []
        self.code = code
        self.delay = delay
        self.strict = strict  # validate with hl7apy in strict mode; AE with the reason
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                buffer = b""
                while b"\x1c\x0d" not in buffer:
                    chunk = self.request.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                text = buffer[buffer.index(b"\x0b") + 1 : buffer.index(b"\x1c")].decode("utf-8")
                outer.messages.append(text)
                time.sleep(outer.delay)
                control = text.split("\r")[0].split("|")[9]
                code, reason = outer.code, "patient unknown" if outer.code != "AA" else ""
                if outer.strict:
                    reason = strict_hl7apy_problem(text)
                    code = "AE" if reason else code
                ack = [
                    f"MSH|^~\\&|HIS|C1|RDC|LEAD|20261201120000||ACK^R01^ACK|A{control}|P|2.5.1",
                    f"MSA|{code}|{control}|{reason[:80].replace('|', ' ')}",
                ]
                if code != "AA":
                    ack.append("ERR|||204^Unknown key identifier^HL70357|E")
                self.request.sendall(b"\x0b" + "\r".join(ack).encode() + b"\r\x1c\x0d")

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def his_port() -> Iterator[int]:
    yield free_port()


def _delivery(report_id: str) -> ReportDelivery:
    with session_scope() as session:
        return session.execute(
            select(ReportDelivery).where(ReportDelivery.report_id == report_id)
        ).scalar_one()


def _control(message: str) -> str:
    return message.split("\r")[0].split("|")[9]


def _all_deliveries() -> list[ReportDelivery]:
    with session_scope() as session:
        return list(session.execute(select(ReportDelivery)).scalars())


def test_oru_reaches_the_his_after_it_was_down(
    reading: Reading,  # noqa: F811
    his_port: int,
) -> None:
    add_clinic_endpoint(
        channel="hl7", port=his_port, receiving_application="HIS", receiving_facility="C1"
    )
    set_patient_name(reading, "Wang^Fang^^Dr^III=王^芳")
    report_id = finalize(reading)
    t0 = utcnow()

    run = deliver_due_reports(now=t0, timeout=5)  # nobody listens yet
    assert run.failed and not run.delivered
    delivery = _delivery(report_id)
    assert delivery.state is DeliveryState.PENDING and delivery.attempts == 1
    assert delivery.next_attempt_at is not None and delivery.next_attempt_at > t0
    assert "Connection refused" in (delivery.last_error or "")

    his = His(his_port, code="AE")
    try:
        assert deliver_due_reports(now=t0, timeout=5).attempted == 0  # backing off
        t1 = t0 + timedelta(minutes=10)
        assert deliver_due_reports(now=t1, timeout=5).failed  # the HIS refuses: AE
        delivery = _delivery(report_id)
        assert delivery.state is DeliveryState.PENDING
        assert "AE" in (delivery.last_error or "") and "patient unknown" in delivery.last_error

        his.code = "AA"
        t2 = t1 + timedelta(hours=1)
        assert deliver_due_reports(now=t2, timeout=5).delivered == [delivery.id]
        assert deliver_due_reports(now=t2 + timedelta(hours=1), timeout=5).attempted == 0
    finally:
        his.stop()

    delivery = _delivery(report_id)
    assert delivery.state is DeliveryState.DELIVERED and delivery.acknowledged_at == t2
    assert delivery.detail["msa"] == "AA"
    with session_scope() as session:
        signed = get_signed_artifact(session, report_id=report_id, kind="pdf")
        outcomes = [
            a.outcome
            for a in session.execute(
                select(DeliveryAttempt)
                .where(DeliveryAttempt.delivery_id == delivery.id)
                .order_by(DeliveryAttempt.number)
            ).scalars()
        ]
    assert outcomes == ["failure", "failure", "success"]

    assert len(his.messages) == 2
    assert _control(his.messages[0]) == _control(his.messages[1])  # a retry: same MSH-10
    message = hl7.parse(his.messages[-1])
    msh = his.messages[-1].split("\r")[0].split("|")
    assert msh[8] == "ORU^R01^ORU_R01" and msh[11] == "2.5.1" and msh[17] == "UNICODE UTF-8"
    assert msh[4] == "HIS" and msh[5] == "C1"
    pid = message.segment("PID")
    assert str(pid[3]) == "P1^^^C1^PI"
    # XPN: family^given^middle^suffix^prefix^degree^type (0200: L legal)^representation
    # (4000: A alphabetic, I ideographic); one repetition per PN component group
    assert str(pid[5]) == "Wang^Fang^^III^Dr^^L^A~王^芳^^^^^L^I"
    assert str(pid[5][1][0]) == "王" and str(pid[5][1][1]) == "芳"
    obr = message.segment("OBR")
    assert str(obr[25]) == "F" and str(obr[24]) == "RAD"
    obx = message.segments("OBX")
    kinds = [str(o[2]) for o in obx]
    assert kinds == ["TX", "TX", "ED"]
    assert "Normal." in str(obx[1][5])
    ed = obx[2][5]
    assert str(ed[0][1]) == "AP" and str(ed[0][3]) == "Base64"
    assert base64.b64decode(str(ed[0][4])) == signed
    assert all(str(o[11]) == "F" for o in obx)


def test_corrected_version_is_status_c_and_concurrent_runs_send_once(
    reading: Reading,  # noqa: F811
    his_port: int,
) -> None:
    for app in ("HIS", "EMR", "RIS"):  # three receivers: three deliveries per version
        add_clinic_endpoint(
            channel="hl7", port=his_port, receiving_application=app, name=f"hl7-{app}"
        )
    set_patient_name(reading, "=张三")  # only the ideographic group
    first = finalize(reading)
    second = amend(reading, first, "右肺结节 | 需复查 ^ Nodule & follow-up")
    his = His(his_port, delay=0.2)
    try:
        now = utcnow()
        barrier = threading.Barrier(2)
        runs = []

        def run(worker: str) -> None:
            barrier.wait()
            runs.append(deliver_due_reports(now=now, worker=worker, timeout=5))

        threads = [threading.Thread(target=run, args=(w,)) for w in ("one", "two")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        his.stop()
    assert len(runs) == 2
    assert sum(len(r.delivered) for r in runs) == 6 and not any(r.failed for r in runs)
    assert len(his.messages) == 6
    controls = [_control(m) for m in his.messages]
    assert len(set(controls)) == 6  # no delivery sent twice
    with session_scope() as session:
        attempts = session.execute(select(DeliveryAttempt)).scalars().all()
    assert len(attempts) == 6 and {a.number for a in attempts} == {1}

    corrected = [hl7.parse(m) for m in his.messages if "Nodule" in m]
    assert len(corrected) == 3
    obr = corrected[0].segment("OBR")
    assert str(obr[25]) == "C"
    assert str(corrected[0].segment("PID")[5]) == "张三^^^^^^L^I"
    text = next(m for m in his.messages if "Nodule" in m)
    assert "右肺结节 \\F\\ 需复查 \\S\\ Nodule \\T\\ follow-up" in text
    assert {d.report_id for d in _all_deliveries()} == {first, second}


def test_a_linked_pdf_passes_a_strict_receiver_the_embedded_one_does_not(
    reading: Reading,  # noqa: F811
    his_port: int,
) -> None:
    embedded = add_clinic_endpoint(
        channel="hl7", port=his_port, receiving_application="HIS", name="hl7-embed"
    )
    linked = add_clinic_endpoint(
        channel="hl7",
        port=his_port,
        receiving_application="HIS",
        name="hl7-link",
        pdf_mode="link",
    )
    set_patient_name(reading, "Wang^Fang=王^芳")
    report_id = finalize(reading)
    his = His(his_port, strict=True)
    try:
        run = deliver_due_reports(now=utcnow(), timeout=5)
    finally:
        his.stop()
    with session_scope() as session:
        signed = get_signed_artifact(session, report_id=report_id, kind="pdf")
        by_target = {
            d.target: d
            for d in session.execute(
                select(ReportDelivery).where(ReportDelivery.report_id == report_id)
            ).scalars()
        }
    # The embedded PDF (Base64 in OBX-5) is longer than hl7apy's strict field lengths.
    assert by_target[embedded].state is not DeliveryState.DELIVERED
    assert "MaxLength" in (by_target[embedded].last_error or "")
    assert by_target[linked].state is DeliveryState.DELIVERED and len(run.delivered) == 1
    (message,) = [m for m in his.messages if "|RP|" in m]
    assert not strict_hl7apy_problem(message)
    obx = hl7.parse(message).segments("OBX")
    assert [str(o[2]) for o in obx] == ["TX", "TX", "RP", "ST"]
    pointer = obx[2][5][0]
    assert str(pointer[0]).endswith(f"/api/v1/reports/{report_id}/pdf")
    assert [str(pointer[i]) for i in (1, 2, 3)] == ["RDC", "AP", "PDF"]
    assert str(obx[3][5]) == hashlib.sha256(signed).hexdigest()
    assert len(signed) > 1000 and "Base64" not in message
