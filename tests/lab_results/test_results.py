"""The lab result model through a running ``rdc serve``: messages over a real MLLP socket
become orders and results (GET /api/v1/lab/orders), auto-verified; a normal order is
released and signed automatically (自动审核), the stop switch holds it, a critical potassium
alerts the clinic at once, a correction (OBX-11 C) makes version 2 with history, a clinic
sees only its own orders, and enhanced mode answers CA (validated with hl7apy) and records
the application acknowledgement after processing.

One deployment serves the module; the messages are sent once (``sent``), the tests then
poll the API until processing (a background task) has caught up.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hl7
import httpx
import pytest

from tests.helpers import ack_fields, mllp_exchange
from tests.lab_results.conftest import CLINIC_B_FACILITY, LabDeployment
from tests.lab_results.test_intake import (
    EXPECTED,
    hl7_files,
    name_of,
    split_acks,
    validate_ack,
)

K, NA, CL, GLU = "2823-3", "2951-2", "2075-0", "14749-6"
DEADLINE = 180.0  # seconds: processing runs in the background on a loaded machine


def obx(n: int, code: str, value: str, unit: str, *, flags: str = "", status: str = "F") -> str:
    return f"OBX|{n}|NM|{code}^^LN||{value}|{unit}||{flags}|||{status}"


def oru(
    control_id: str,
    *,
    facility: str,
    patient: str,
    filler: str,
    results: list[str],
    enhanced: bool = False,
) -> bytes:
    ack_modes = "|||AL|AL" if enhanced else ""
    lines = [
        f"MSH|^~\\&|LIS|{facility}|RDC|LEAD|20261204090000+0800||ORU^R01^ORU_R01|{control_id}"
        f"|P|2.5.1{ack_modes}",
        f"PID|1||{patient}^^^{facility}^MR||ZHANG^SAN||19700101|M",
        f"OBR|1|PL-{filler}|{filler}|BMP^Basic panel^L|R||20261204070000+0800|||||||"
        f"20261204073000+0800||||||||20261204085000+0800|||F",
        *[line.replace("OBX|", "OBX|", 1) for line in results],
    ]
    return ("\r".join(lines) + "\r").encode()


NORMAL = [
    obx(1, K, "4.1", "mmol/L", flags="N"),
    obx(2, NA, "140", "mmol/L", flags="N"),
    obx(3, CL, "102", "mmol/L", flags="N"),
    obx(4, GLU, "5.0", "mmol/L", flags="N"),
]
MESSAGES: dict[str, bytes] = {
    # Clinic B: all normal, enhanced mode (CA, then the application ACK after processing)
    "normal": oru(
        "RES-NORMAL",
        facility=CLINIC_B_FACILITY,
        patient="B-001",
        filler="F-NORMAL",
        results=NORMAL,
        enhanced=True,
    ),
    # Clinic A: sodium above its reference range (not critical): held for the physician
    "held": oru(
        "RES-HELD",
        facility="ELAB-3",
        patient="A-002",
        filler="F-HELD",
        results=[obx(1, NA, "151", "mmol/L", flags="H"), obx(2, K, "4.0", "mmol/L")],
    ),
    # Clinic A: critical potassium
    "critical": oru(
        "RES-CRIT",
        facility="ELAB-3",
        patient="A-003",
        filler="F-CRIT",
        results=[obx(1, K, "6.8", "mmol/L", flags="HH"), obx(2, NA, "140", "mmol/L")],
    ),
    # Clinic A: a result, then its correction (OBX-11 C)
    "original": oru(
        "RES-ORIG",
        facility="ELAB-3",
        patient="A-004",
        filler="F-CORR",
        results=[obx(1, GLU, "5.0", "mmol/L"), obx(2, K, "4.2", "mmol/L")],
    ),
}
CORRECTION = oru(
    "RES-CORR",
    facility="ELAB-3",
    patient="A-004",
    filler="F-CORR",
    results=[obx(1, GLU, "5.4", "mmol/L", status="C")],
)
STOPPED = oru(
    "RES-STOPPED", facility=CLINIC_B_FACILITY, patient="B-005", filler="F-STOPPED", results=NORMAL
)


def poll(what: Callable[[], Any], *, message: str) -> Any:
    deadline = time.monotonic() + DEADLINE
    while True:
        value = what()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {message}")
        time.sleep(0.5)


def order_for(
    client: httpx.Client, patient_id: str, predicate: Callable[[dict[str, Any]], bool] | None = None
) -> dict[str, Any] | None:
    response = client.get("/api/v1/lab/orders", params={"patient_id": patient_id})
    response.raise_for_status()
    for summary in response.json():
        detail = client.get(f"/api/v1/lab/orders/{summary['id']}")
        detail.raise_for_status()
        order = detail.json()
        if predicate is None or predicate(order):
            return order
    return None


def wait_order(
    client: httpx.Client, patient_id: str, predicate: Callable[[dict[str, Any]], bool] | None = None
) -> dict[str, Any]:
    return poll(lambda: order_for(client, patient_id, predicate), message=f"order of {patient_id}")


@pytest.fixture(scope="module")
def sent(lab: LabDeployment, testdata: Path) -> dict[str, bytes]:
    """Every test-data message and this module's own, over one MLLP connection."""
    answers = {}
    with socket.create_connection(("127.0.0.1", lab.server.mllp_port), timeout=30) as sock:
        for path in hl7_files(testdata):
            answers[name_of(testdata, path)] = mllp_exchange(sock, path.read_bytes())
        for name, raw in MESSAGES.items():
            answers[name] = mllp_exchange(sock, raw)
    return answers


@pytest.fixture(scope="module")
def admin(lab: LabDeployment) -> httpx.Client:
    return lab.client("admin")


UNPROCESSABLE = "1932"  # MSH-10 of non_oru/msfhirconv_OUL-R22-01.hl7


def _accepted_orders(testdata: Path) -> list[tuple[str, str, str]]:
    """(file, PID-3 ID, order number) of every order in an accepted test-data message."""
    out = []
    for name, expected in EXPECTED.items():
        if name == "non_oru/msfhirconv_OUL-R22-01.hl7":
            continue
        raw = (testdata / "hl7" / name).read_bytes().decode("utf-8-sig")
        text = raw.replace("\r\n", "\r").replace("\n", "\r")
        chunks = ["MSH" + c for c in text.split("\rMSH")[1:]] if not text.startswith("MSH") else []
        messages = [text] if text.startswith("MSH") else chunks
        for (code, _), message in zip(expected, messages, strict=False):
            if code not in ("AA", "CA"):
                continue
            parsed = hl7.parse(message.split("\rBTS")[0].split("\rFTS")[0])
            pid = parsed.segment("PID")
            patient_id = str(pid[3]).split("~")[0].split("^")[0]
            for obr in parsed.segments("OBR"):
                filler, placer = (str(obr[n]).split("^")[0] for n in (3, 2))
                number = filler or placer
                out.append((name, patient_id, number))
    return out


def test_every_accepted_test_message_becomes_indexed_orders(
    lab: LabDeployment, sent: dict[str, bytes], admin: httpx.Client, testdata: Path
) -> None:
    expected = _accepted_orders(testdata)
    assert len(expected) >= 8
    with lab.server.db() as db:
        accepted = db.execute("SELECT count(*) FROM lab_messages").fetchone()[0]

    def all_processed() -> bool:
        with lab.server.db() as db:
            rows = db.execute("SELECT status, error FROM lab_messages").fetchall()
        return bool(rows) and all(r[0] != "received" for r in rows)

    poll(all_processed, message="every accepted message processed")
    with lab.server.db() as db:
        failed = db.execute(
            "SELECT control_id, error FROM lab_messages WHERE status <> 'processed'"
        ).fetchall()
    # The IHE pathology OUL^R22 is accepted (CA: stored) but cannot become results: its
    # slide-scan OBX has no identifier. Its application ACK (MSH-16 AL) says so (AE).
    assert [r[0] for r in failed] == [UNPROCESSABLE], failed
    assert "OBX-3" in failed[0][1]
    with lab.server.db() as db:
        code, app_ack = db.execute(
            "SELECT app_ack_code, app_ack FROM lab_messages WHERE control_id = ?", (UNPROCESSABLE,)
        ).fetchone()
    assert code == "AE"
    validate_ack(bytes(app_ack))
    assert ack_fields(bytes(app_ack))["MSA"][2] == UNPROCESSABLE
    assert accepted >= len(MESSAGES)
    for name, patient_id, number in expected:
        listed = admin.get("/api/v1/lab/orders", params={"patient_id": patient_id}).json()
        assert any(number in (o["filler_number"], o["placer_number"]) for o in listed), (
            name,
            patient_id,
            number,
            listed,
        )
    # Every order is a lab exam in the worklist's index, and has results with LOINC where
    # the catalogue knows the code.
    orders = admin.get("/api/v1/lab/orders", params={"limit": 500}).json()
    for summary in orders:
        detail = admin.get(f"/api/v1/lab/orders/{summary['id']}").json()
        assert admin.get(f"/api/v1/exams/{summary['exam_id']}").status_code == 200
        with lab.server.db() as db:
            (discipline,) = db.execute(
                "SELECT discipline FROM exams WHERE id = ?", (summary["exam_id"],)
            ).fetchone()
        assert discipline == "lab"
        for result in detail["results"]:
            assert result["autoverification"], (summary["id"], result)
            for key in ("code", "loinc", "value", "unit", "reference_range", "flags", "status"):
                assert key in result


def test_normal_order_is_released_and_signed_automatically(
    lab: LabDeployment, sent: dict[str, bytes]
) -> None:
    tech_b = lab.client("tech_b")
    order = wait_order(tech_b, "B-001", lambda o: o["released_at"] is not None)
    assert order["verdict"] == "release"
    assert order["auto_released"] is True and order["autoverified_mark"] == "自动审核"
    assert order["released_by"] == "senior"
    assert order["exam_state"] == "FINAL"
    assert {r["loinc"] for r in order["results"]} == {K, NA, CL, GLU}
    potassium = next(r for r in order["results"] if r["loinc"] == K)
    assert potassium["value"] == "4.1" and potassium["unit"] == "mmol/L"
    assert potassium["verdict"] == "pass"
    rules = {t["rule_id"] for t in potassium["autoverification"]}
    assert {"reference_range", "reportable_range", "critical_limits"} <= rules or len(rules) >= 4
    assert all(t["version"] for t in potassium["autoverification"])
    # The signed report: final, signed under the configured lab physician, marked 自动审核.
    report = tech_b.get(f"/api/v1/exams/{order['exam_id']}/report")
    report.raise_for_status()
    body = report.json()
    assert body["status"] == "final"
    assert "自动审核" in body["impression"]
    assert body["structured"]["autoverified"] is True
    assert order["report_id"] == body["id"]
    verified = tech_b.get(f"/api/v1/reports/{order['report_id']}/verify")
    assert verified.status_code == 200, verified.text
    assert verified.json()["valid"] is True, verified.json()
    assert verified.json()["signer"]["username"] == "senior" or "senior" in str(verified.json())


def test_enhanced_mode_ca_then_application_ack_after_processing(
    lab: LabDeployment, sent: dict[str, bytes]
) -> None:
    (ack,) = split_acks(sent["normal"])
    validate_ack(ack)
    fields = ack_fields(ack)
    assert fields["MSA"][1] == "CA"
    assert fields["MSA"][2] == "RES-NORMAL"  # MSA-2 echoes MSH-10

    def app_ack() -> bytes | None:
        with lab.server.db() as db:
            row = db.execute(
                "SELECT app_ack_code, app_ack FROM lab_messages WHERE control_id = ?",
                ("RES-NORMAL",),
            ).fetchone()
        return bytes(row[1]) if row and row[1] else None

    answer = poll(app_ack, message="the application acknowledgement")
    validate_ack(answer)
    app = ack_fields(answer)
    assert app["MSA"][1] == "AA" and app["MSA"][2] == "RES-NORMAL"


def test_held_order_enters_the_lab_worklist(lab: LabDeployment, sent: dict[str, bytes]) -> None:
    reader = lab.client("reader")
    order = wait_order(reader, "A-002")
    assert order["verdict"] == "hold" and order["released_at"] is None
    sodium = next(r for r in order["results"] if r["loinc"] == NA)
    assert sodium["verdict"] == "hold"
    held = [t for t in sodium["autoverification"] if t["verdict"] == "hold"]
    assert any(t["rule_id"] == "reference_range" for t in held), sodium
    page = reader.get("/api/v1/worklist", params={"discipline": "lab"}).json()
    items = page["items"] if isinstance(page, dict) else page
    assert any(i["exam_id"] == order["exam_id"] for i in items), items
    assert all(i["discipline"] == "lab" for i in items)


def test_critical_potassium_alerts_the_clinic(lab: LabDeployment, sent: dict[str, bytes]) -> None:
    tech_a = lab.client("tech_a")
    order = wait_order(tech_a, "A-003")
    assert order["critical"] is True and order["released_at"] is None
    potassium = next(r for r in order["results"] if r["loinc"] == K)
    assert potassium["critical"] is True and potassium["verdict"] == "critical"

    def alert() -> dict[str, Any] | None:
        page = tech_a.get("/api/v1/critical-alerts").json()
        return next((a for a in page["items"] if a["exam_id"] == order["exam_id"]), None)

    found = poll(alert, message="the critical-value alert")
    assert found["state"] == "open"
    assert "6.8" in found["finding"] and "6.2" in found["finding"], found
    assert "K" in found["finding"]
    # The other clinic does not see it.
    tech_b = lab.client("tech_b")
    other = tech_b.get("/api/v1/critical-alerts").json()["items"]
    assert all(a["exam_id"] != order["exam_id"] for a in other)


def test_correction_makes_version_2_with_history(
    lab: LabDeployment, sent: dict[str, bytes]
) -> None:
    reader = lab.client("reader")
    first = wait_order(reader, "A-004")
    assert first["version"] == 1
    with socket.create_connection(("127.0.0.1", lab.server.mllp_port), timeout=30) as sock:
        assert ack_fields(mllp_exchange(sock, CORRECTION))["MSA"][1] == "AA"
    order = wait_order(reader, "A-004", lambda o: o["version"] == 2)
    assert order["id"] == first["id"]
    glucose = next(r for r in order["results"] if r["loinc"] == GLU)
    assert glucose["value"] == "5.4" and glucose["status"] == "C" and glucose["version"] == 2
    assert [(h["version"], h["value"], h["status"]) for h in glucose["history"]] == [
        (1, "5.0", "F")
    ]
    potassium = next(r for r in order["results"] if r["loinc"] == K)
    assert potassium["value"] == "4.2" and potassium["version"] == 1 and not potassium["history"]


def test_clinic_sees_only_its_own_orders(lab: LabDeployment, sent: dict[str, bytes]) -> None:
    tech_a, tech_b = lab.client("tech_a"), lab.client("tech_b")
    mine = wait_order(tech_b, "B-001")
    assert mine["clinic"] == "CLINIC_B"
    assert tech_a.get(f"/api/v1/lab/orders/{mine['id']}").status_code == 404
    assert all(o["clinic"] == "CLINIC_A" for o in tech_a.get("/api/v1/lab/orders").json())
    assert tech_a.get("/api/v1/lab/orders", params={"clinic": "CLINIC_B"}).json() == []
    assert tech_a.get("/api/v1/lab/mapping-queue").status_code == 403
    # Reads are audited.
    with lab.server.db() as db:
        rows = db.execute(
            "SELECT count(*) FROM audit_events WHERE object_type = 'lab_order' AND object_id = ?",
            (mine["id"],),
        ).fetchone()
    assert rows[0] >= 1


def test_stop_switch_holds_a_normal_order(
    lab: LabDeployment, sent: dict[str, bytes], admin: httpx.Client
) -> None:
    stopped = admin.put("/api/v1/lab/autorelease", json={"enabled": False, "reason": "audit"})
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["enabled"] is False
    try:
        with socket.create_connection(("127.0.0.1", lab.server.mllp_port), timeout=30) as sock:
            assert ack_fields(mllp_exchange(sock, STOPPED))["MSA"][1] == "AA"
        order = wait_order(admin, "B-005")
        assert order["verdict"] == "hold" and order["released_at"] is None
        stop = next(t for t in order["order_trace"] if t["rule_id"] == "stop_switch")
        assert stop["verdict"] == "hold"
        assert all(r["verdict"] == "pass" for r in order["results"])  # only the switch held it
    finally:
        resumed = admin.put("/api/v1/lab/autorelease", json={"enabled": True})
        assert resumed.json()["enabled"] is True


def test_unmapped_codes_wait_in_the_mapping_queue(
    sent: dict[str, bytes], admin: httpx.Client
) -> None:
    queue = poll(lambda: admin.get("/api/v1/lab/mapping-queue").json(), message="the mapping queue")
    assert all(e["code"] and e["reason"] for e in queue)
    assert all(e["occurrences"] >= 1 for e in queue)


# --- mapping-queue resolution ----------------------------------------------------------------

LOCAL_K = oru(
    "RES-LOCAL-K",
    facility="ELAB-3",
    patient="A-MAP-1",
    filler="F-LOCAL-K",
    results=["OBX|1|NM|LK88^钾 (local)^L||4.2|mmol/L|3.5-5.3|N|||F"],
)


def send_messages(lab: LabDeployment, *messages: bytes) -> None:
    with socket.create_connection(("127.0.0.1", lab.server.mllp_port), timeout=30) as sock:
        for raw in messages:
            assert ack_fields(mllp_exchange(sock, raw))["MSA"][1] in ("AA", "CA")


def test_resolving_a_held_code_maps_it_and_verifies_the_held_order_again(
    lab: LabDeployment, sent: dict[str, bytes], admin: httpx.Client
) -> None:
    send_messages(lab, LOCAL_K)
    held = wait_order(admin, "A-MAP-1")
    assert held["verdict"] == "hold" and held["released_at"] is None
    (result,) = held["results"]
    assert result["loinc"] is None
    entry = poll(
        lambda: next(
            (e for e in admin.get("/api/v1/lab/mapping-queue").json() if e["code"] == "LK88"), None
        ),
        message="the queue entry of LK88",
    )
    # The reason in both languages (the admin console shows the one of its UI).
    assert entry["reason"].startswith("local code LK88 of ") and entry["reason"].endswith(
        " has no mapping"
    )
    assert "本地代码 LK88 尚无映射" in entry["reason_zh"]
    path = f"/api/v1/lab/mapping-queue/{entry['id']}/resolve"
    # Only administrators; only catalogue codes.
    assert lab.client("reader").post(path, json={"loinc": K}).status_code == 403
    assert admin.post(path, json={"loinc": "99999-9"}).status_code == 422
    resolved = admin.post(path, json={"loinc": K})
    assert resolved.status_code == 200, resolved.text
    body = resolved.json()
    assert body["created"] is True and body["facility"] == "ELAB-3" and body["analyte"] == "K"
    assert body["reverified"] == [held["id"]] and body["released"] == [held["id"]]
    order = wait_order(admin, "A-MAP-1")
    (result,) = order["results"]
    assert result["loinc"] == K and result["analyte"] == "K" and result["verdict"] == "pass"
    assert result["version"] == 1  # verified again, not a new version
    assert order["verdict"] == "release" and order["released_at"] is not None
    assert order["exam_state"] == "FINAL" and order["report_id"]
    # Idempotent: the same answer again re-verifies nothing; another LOINC is a conflict.
    again = admin.post(path, json={"loinc": K})
    assert again.status_code == 200 and again.json()["created"] is False
    assert again.json()["reverified"] == []
    assert admin.post(path, json={"loinc": NA}).status_code == 409
    queue = admin.get("/api/v1/lab/mapping-queue", params={"include_resolved": True}).json()
    done = next(e for e in queue if e["id"] == entry["id"])
    assert done["resolved_loinc"] == K and done["resolved_at"]
    assert all(e["id"] != entry["id"] for e in admin.get("/api/v1/lab/mapping-queue").json())
    # A later message with the code maps at once.
    send_messages(
        lab,
        oru(
            "RES-LOCAL-K2",
            facility="ELAB-3",
            patient="A-MAP-2",
            filler="F-LOCAL-K2",
            results=["OBX|1|NM|LK88^钾 (local)^L||4.0|mmol/L|3.5-5.3|N|||F"],
        ),
    )
    later = wait_order(admin, "A-MAP-2", lambda o: o["results"][0]["loinc"] == K)
    assert later["released_at"] is not None
    # Audited once, with the state before and after.
    with lab.server.db() as db:
        rows = db.execute(
            "SELECT detail FROM audit_events"
            " WHERE action = 'lab.mapping.resolve' AND object_id = ?",
            (entry["id"],),
        ).fetchall()
    assert len(rows) == 1
    detail = rows[0][0] if isinstance(rows[0][0], dict) else json.loads(rows[0][0])
    assert detail["before"]["resolved_loinc"] is None and detail["before"]["mapping"] is None
    assert detail["after"]["resolved_loinc"] == K
    assert detail["after"]["mapping"] == {"facility": "ELAB-3", "local_code": "LK88", "loinc": K}
    assert detail["reverified"] == [held["id"]]


# --- delta checks over the person's results from every clinic ----------------------------------


def _k_order(control: str, *, facility: str, patient: str, value: str, collected: str) -> bytes:
    raw = oru(
        control,
        facility=facility,
        patient=patient,
        filler=f"F-{control}",
        results=[obx(1, K, value, "mmol/L", flags="N")],
    )
    return raw.replace(b"20261204070000+0800", collected.encode())


# (case, prior clinic facility, prior patient, current facility, current patient, linked,
#  delta verdict, reason fragment). Prior K 3.6 two days before, current K 5.0 (+39 %,
# RCV 13.9 %): within the reference range, only the delta check can hold it.
DELTA_CASES = [
    ("linked_other_clinic", "ELAB-3", "DL-A1", CLINIC_B_FACILITY, "DL-B1", True, "hold", "exceeds"),
    (
        "unlinked_other_clinic",
        "ELAB-3",
        "DL-A2",
        CLINIC_B_FACILITY,
        "DL-B2",
        False,
        "pass",
        "no prior",
    ),
    ("same_clinic_patient", "ELAB-3", "DL-A3", "ELAB-3", "DL-A3", False, "hold", "exceeds"),
]


@pytest.fixture(scope="module")
def delta_orders(
    lab: LabDeployment, sent: dict[str, bytes], admin: httpx.Client
) -> dict[str, dict[str, Any]]:
    """Each case's prior, the link (through the patient-index API), then the current order."""
    priors, currents = [], []
    for case, prior_fac, prior_pid, fac, pid, linked, _, _ in DELTA_CASES:
        priors.append(
            _k_order(
                f"DP-{case}",
                facility=prior_fac,
                patient=prior_pid,
                value="3.6",
                collected="20261202070000+0800",
            )
        )
        if linked:  # the current clinic's patient must exist before it can be linked
            priors.append(
                oru(
                    f"DX-{case}",
                    facility=fac,
                    patient=pid,
                    filler=f"F-DX-{case}",
                    results=[obx(1, NA, "140", "mmol/L")],
                )
            )
    send_messages(lab, *priors)
    for case, prior_fac, prior_pid, fac, pid, linked, _, _ in DELTA_CASES:
        wait_order(admin, prior_pid)
        if linked:
            wait_order(admin, pid)
            response = admin.post(
                "/api/v1/patients/link",
                json={
                    "identifiers": [f"{prior_fac}|{prior_pid}", f"{fac}|{pid}"],
                    "reason": "same ID card",
                },
            )
            assert response.status_code == 200, response.text
        currents.append(
            _k_order(
                f"DC-{case}",
                facility=fac,
                patient=pid,
                value="5.0",
                collected="20261204070000+0800",
            )
        )
    send_messages(lab, *currents)
    out = {}
    for case, _, _, _, pid, _, _, _ in DELTA_CASES:
        out[case] = wait_order(admin, pid, lambda o, c=case: o["filler_number"] == f"F-DC-{c}")
    return out


@pytest.mark.parametrize(
    ("case", "verdict", "reason"),
    [(c[0], c[6], c[7]) for c in DELTA_CASES],
    ids=[c[0] for c in DELTA_CASES],
)
def test_delta_check_looks_back_over_the_persons_results_in_every_clinic(
    delta_orders: dict[str, dict[str, Any]], case: str, verdict: str, reason: str
) -> None:
    (potassium,) = delta_orders[case]["results"]
    delta = next(t for t in potassium["autoverification"] if t["rule_id"] == "delta_check")
    assert delta["verdict"] == verdict, delta
    assert reason in delta["reason"], delta
    if verdict == "hold":
        assert "3.6" in delta["reason"] and delta_orders[case]["released_at"] is None
    else:
        assert delta_orders[case]["released_at"] is not None


# --- text results, push-back with the clinic's ACK, display names -------------------------------

U_PRO, U_GLU, BCX = "20454-5", "25428-4", "600-7"
TEXT_RESULTS = oru(
    "RES-TEXT",
    facility="CLINIC_C_LIS",
    patient="C-TXT-1",
    filler="F-TEXT",
    results=[
        obx(1, K, "4.1", "mmol/L", flags="N"),
        f"OBX|2|CWE|{U_PRO}^^LN||260385009^Negative^SCT||||||F",
        f"OBX|3|FT|{U_GLU}^^LN||阴性||||||F",
        f"OBX|4|ST|{BCX}^^LN||not detected||||||F",
    ],
)


def _obx_by_code(message: str) -> dict[str, list[str]]:
    segments = [s.split("|") for s in message.split("\r") if s.startswith("OBX|")]
    return {fields[3].split("^")[0]: fields for fields in segments}


def test_text_results_in_the_pdf_fhir_and_the_oru_push_back_acknowledged_by_the_clinic(
    lab: LabDeployment, sent: dict[str, bytes], admin: httpx.Client, tmp_path: Path
) -> None:
    from tests.helpers import free_port, rdc_cli
    from tests.lab_results.test_report_push import His

    rdc_cli(lab.env, "user", "edit", "senior", "--name", "李检验 Li Jianyan")
    rdc_cli(
        lab.env,
        "clinic",
        "add",
        "--code",
        "CLINIC_C",
        "--name",
        "Clinic C",
        "--hl7-facility",
        "CLINIC_C_LIS",
    )
    port = free_port()
    his = His(port, code="AR")  # the HIS refuses first: "patient unknown"
    try:
        rdc_cli(
            lab.env,
            "delivery",
            "endpoint",
            "add",
            "--clinic",
            "CLINIC_C",
            "--channel",
            "hl7",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--app",
            "HIS",
            "--facility",
            "C3",
            "--pdf",
            "link",
        )
        send_messages(lab, TEXT_RESULTS)
        order = wait_order(admin, "C-TXT-1", lambda o: o["released_at"] is not None)
        # Kept as sent, with their value types.
        by_loinc = {r["loinc"]: r for r in order["results"]}
        assert by_loinc[U_PRO]["value_type"] == "CWE"
        assert by_loinc[U_PRO]["value"].startswith("260385009^Negative")
        assert (by_loinc[U_GLU]["value_type"], by_loinc[U_GLU]["value"]) == ("FT", "阴性")
        assert (by_loinc[BCX]["value_type"], by_loinc[BCX]["value"]) == ("ST", "not detected")
        assert order["released_by_name"] == "李检验 Li Jianyan"
        report_id = order["report_id"]
        report = admin.get(f"/api/v1/exams/{order['exam_id']}/report").json()
        assert report["author"] == "senior" and report["author_name"] == "李检验 Li Jianyan"
        # The lab page's data: the coded result read by its text.
        page = admin.get(f"/api/v1/lab/exams/{order['exam_id']}/reading").json()
        shown = {r["loinc"]: r["display_value"] for r in page["results"]}
        assert shown[U_PRO] == "Negative" and shown[U_GLU] == "阴性" and shown[K] == "4.1"
        # FHIR: valueCodeableConcept, valueString, valueQuantity.
        fhir = admin.get(f"/api/v1/reports/{report_id}/fhir").json()
        observations = {
            o["code"]["coding"][0]["code"]: o
            for o in fhir["contained"]
            if o["resourceType"] == "Observation"
        }
        assert U_PRO in observations, fhir
        assert observations[U_PRO]["valueCodeableConcept"]["coding"][0] == {
            "system": "http://snomed.info/sct",
            "code": "260385009",
            "display": "Negative",
        }
        assert observations[U_GLU]["valueString"] == "阴性"
        assert observations[BCX]["valueString"] == "not detected"
        assert observations[K]["valueQuantity"]["value"] == 4.1
        # The PDF: the text results and the physician's display name, not the login.
        pdf = admin.get(f"/api/v1/reports/{report_id}/pdf")
        assert pdf.status_code == 200
        (tmp_path / "text.pdf").write_bytes(pdf.content)
        text = subprocess.run(
            ["pdftotext", "-layout", str(tmp_path / "text.pdf"), "-"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "Negative" in text and "阴性" in text and "not detected" in text
        assert "李检验" in text

        # The push-back: AR is a failure with the HIS's reason, retried...
        def refused() -> dict[str, Any] | None:
            rows = admin.get(f"/api/v1/reports/{report_id}/deliveries").json()
            hl7_rows = [d for d in rows if d["channel"] == "hl7"]
            return next((d for d in hl7_rows if d["attempts"] >= 2), None)

        failed = poll(refused, message="two refused attempts")
        assert failed["state"] in ("pending", "failing") and failed["delivered_at"] is None
        assert "AR" in failed["last_error"] and "patient unknown" in failed["last_error"]
        # ... until the clinic answers AA: delivered.
        his.code = "AA"

        def delivered() -> dict[str, Any] | None:
            rows = admin.get(f"/api/v1/reports/{report_id}/deliveries").json()
            return next(
                (d for d in rows if d["channel"] == "hl7" and d["state"] == "delivered"), None
            )

        done = poll(delivered, message="the delivery acknowledged with AA")
        assert done["attempts"] >= 3 and done["delivered_at"]
        messages = [m for m in his.messages if "C-TXT-1" in m]
        assert len({_control(m) for m in messages}) == 1  # every attempt: one control ID
        obx_lines = _obx_by_code(messages[-1])
        assert obx_lines[U_PRO][2] == "CWE" and obx_lines[U_PRO][5] == "260385009^Negative^SCT"
        assert obx_lines[U_GLU][2] == "FT" and obx_lines[U_GLU][5] == "阴性"
        assert obx_lines[BCX][2] == "ST" and obx_lines[BCX][5] == "not detected"
        assert obx_lines[K][2] == "NM" and obx_lines[K][5] == "4.1"
        obr = next(s for s in messages[-1].split("\r") if s.startswith("OBR|"))
        assert "李检验 Li Jianyan" in obr.split("|")[32]
    finally:
        his.stop()


def _control(message: str) -> str:
    return message.split("\r")[0].split("|")[9]


# --- a national ID as the clinic's patient ID: shown masked, stored as received ---------------


def national_id(first17: str) -> str:
    """17 digits and their GB 11643 check character (ISO 7064 MOD 11-2)."""
    total = sum(int(c) * pow(2, 17 - i, 11) for i, c in enumerate(first17))
    return first17 + "10X98765432"[total % 11]


def test_a_national_id_patient_id_is_shown_masked_and_stored_as_received(
    lab: LabDeployment, sent: dict[str, bytes], admin: httpx.Client
) -> None:
    raw_id = national_id("11010519800101123")
    masked = raw_id[:6] + "*" * 8 + raw_id[-4:]
    raw = oru("RES-NATID", facility="ELAB-3", patient=raw_id, filler="F-NATID", results=NORMAL)
    answer = lab.client("tech_a").post(
        "/api/v1/lab/messages", content=raw, headers={"content-type": "text/plain"}
    )
    assert answer.status_code == 200 and "MSA|AA|RES-NATID" in answer.text, answer.text
    # The filter finds the order by the ID as received; every payload shows it masked.
    order = wait_order(admin, raw_id)
    assert order["patient_id"] == masked and order["patient_id_masked"] is True
    listed = admin.get("/api/v1/lab/orders", params={"patient_id": raw_id, "issuer": "ELAB-3"})
    assert [o["patient_id"] for o in listed.json()] == [masked], listed.text
    page = admin.get(f"/api/v1/lab/exams/{order['exam_id']}/reading")
    assert page.status_code == 200 and page.json()["exam"]["patient"]["patient_id"] == masked
    for response in (listed, page, admin.get(f"/api/v1/lab/orders/{order['id']}")):
        assert raw_id not in response.text
    # Stored as received: the message's bytes and the patient's ID.
    with lab.server.db() as db:
        (key,) = db.execute(
            "SELECT object_key FROM lab_messages WHERE control_id = ?", ("RES-NATID",)
        ).fetchone()
        (stored_id,) = db.execute(
            "SELECT p.patient_id FROM patients p JOIN exams e ON e.patient_ref = p.id"
            " WHERE e.id = ?",
            (order["exam_id"],),
        ).fetchone()
    assert lab.server.object_file(key).read_bytes() == raw
    assert stored_id == raw_id
    # The audit trail of the search masks it too.
    with lab.server.db() as db:
        details = db.execute(
            "SELECT detail FROM audit_events WHERE object_type = 'lab_order' AND action = 'list'"
        ).fetchall()
    assert all(raw_id not in (d if isinstance(d, str) else json.dumps(d)) for (d,) in details)
