"""The QC API against a running ``rdc serve``: the constructed data set of
tests/worklist/qc_dataset.py is written into the server's database, then the indicators,
filters, breakdowns, drill-down, targets, CSV/XLSX exports (parsed back) and the monthly PDF
are read over HTTP, and everyone but QC staff and administrators is refused."""

from __future__ import annotations

import csv
import io
import subprocess
from pathlib import Path

import openpyxl

from rdc_core.db import dispose_engines, session_scope
from tests.helpers import HTTP_TIMEOUT, RdcServer, database_url
from tests.worklist import qc_dataset

MARCH = {"from": "2026-03-01", "to": "2026-03-31"}


def test_indicators_drill_down_targets_and_exports(
    server: RdcServer, rdc_env: dict[str, str], alliance: dict[str, str], tmp_path: Path
) -> None:
    url = database_url(rdc_env)
    with session_scope(url) as session:
        qc_dataset.build(session, with_orgs=False)
    dispose_engines()
    qc = server.client("qc", qc_dataset.PASSWORD)
    admin = server.client("admin", alliance["admin"])

    # Every indicator with the interface's fields; the hand-computed figures.
    body = qc.get("/api/v1/qc/indicators", params=MARCH).json()
    got = {i["code"]: i for i in body["indicators"]}
    for code, (num, den, rate) in qc_dataset.EXPECTED.items():
        assert (got[code]["numerator"], got[code]["denominator"], got[code]["rate"]) == (
            num,
            den,
            rate,
        ), code
    for item in body["indicators"]:
        assert {"code", "numerator", "denominator", "rate", "target", "status"} <= item.keys()
        assert {"name_zh", "name_en", "source", "direction", "change"} <= item.keys()
    assert got["ECG-01"]["status"] == "no_data" and got["ECG-01"]["value"] is None
    assert got["RRC-02"]["change"] == 75.0

    # Filters and a breakdown.
    b = qc.get("/api/v1/qc/indicators", params={**MARCH, "clinic": "CLINIC_B", "code": "RRC-02"})
    assert [(i["numerator"], i["denominator"]) for i in b.json()["indicators"]] == [(0, 1)]
    by_clinic = qc.get(
        "/api/v1/qc/indicators", params={**MARCH, "group_by": "clinic", "code": "IQ-01"}
    ).json()["indicators"][0]["groups"]
    assert {g["key"]: g["rate"] for g in by_clinic} == {"CLINIC_A": 50.0, "CLINIC_B": 100.0}
    emergency = qc.get(
        "/api/v1/qc/indicators",
        params={**MARCH, "priority": "emergency", "discipline": "imaging", "code": "IQ-01"},
    ).json()["indicators"][0]
    assert (emergency["numerator"], emergency["denominator"]) == (2, 4)

    # Drill-down: the exact cases with times and reasons.
    failing = qc.get(
        "/api/v1/qc/indicators/RRC-02/cases", params={**MARCH, "subset": "failing"}
    ).json()
    assert failing["total"] == 1 and failing["items"][0]["exam_id"] == "qc-E4"
    assert failing["items"][0]["reason"] == "over_120_min"
    assert failing["items"][0]["minutes"] == 121.0
    everything = qc.get("/api/v1/qc/indicators/rrc-02/cases", params=MARCH).json()
    assert {c["exam_id"] for c in everything["items"]} == {"qc-E1", "qc-E2", "qc-E3", "qc-E4"}
    page = qc.get("/api/v1/qc/indicators/RRC-02/cases", params={**MARCH, "limit": 2, "offset": 2})
    assert page.json()["total"] == 4 and len(page.json()["items"]) == 2
    hist = qc.get("/api/v1/qc/indicators/RCV-04/histogram", params=MARCH).json()
    assert hist["threshold"] == 10.0 and hist["n"] == 2

    # Bad input: named errors, nothing else happens.
    assert qc.get("/api/v1/qc/indicators/NOPE/cases", params=MARCH).status_code == 404
    assert qc.get("/api/v1/qc/indicators", params={"from": "2026-13-01"}).status_code == 422
    assert qc.get("/api/v1/qc/indicators", params={**MARCH, "group_by": "x"}).status_code == 422
    reversed_period = {"from": "2026-03-31", "to": "2026-03-01"}
    assert qc.get("/api/v1/qc/indicators", params=reversed_period).status_code == 422
    assert qc.get("/api/v1/qc/export.csv", params=MARCH).status_code == 422  # neither

    # Targets: versioned, audited, change the status.
    put = qc.put("/api/v1/qc/targets/RRC-02", json={"target": 70, "warn_margin": 5, "note": "n"})
    assert put.status_code == 200 and put.json()["version"] == 1
    assert admin.put("/api/v1/qc/targets/IQ-01", json={"target": 101}).status_code == 422
    after = qc.get("/api/v1/qc/indicators", params={**MARCH, "code": "RRC-02"}).json()
    assert after["indicators"][0]["status"] == "met" and after["indicators"][0]["target"] == 70
    history = admin.get("/api/v1/qc/targets/RRC-02").json()
    assert [(t["version"], t["changed_by"]) for t in history] == [(1, "qc")]
    assert {t["code"]: t["version"] for t in qc.get("/api/v1/qc/targets").json()}["IQ-01"] == 0
    with server.db() as db:
        row = db.execute(
            "SELECT actor, detail FROM audit_events WHERE action = 'set_qc_target'"
        ).fetchone()
        assert row is not None and row[0] == "user:qc"

    # Exports, parsed back.
    text = qc.get("/api/v1/qc/export.csv", params={**MARCH, "cases": "RRC-02"})
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(text.content.decode("utf-8-sig"))))
    assert sorted(r["exam_id"] for r in rows) == ["qc-E1", "qc-E2", "qc-E3", "qc-E4"]
    e3 = next(r for r in rows if r["exam_id"] == "qc-E3")
    assert e3["reason"] == "no_start_time" and e3["minutes"] == "110.0"
    assert e3["start_at"].endswith("+08:00")
    only_b = qc.get(
        "/api/v1/qc/export.csv", params={**MARCH, "cases": "RRC-02", "clinic": "CLINIC_B"}
    )
    assert [
        r["exam_id"] for r in csv.DictReader(io.StringIO(only_b.content.decode("utf-8-sig")))
    ] == ["qc-E4"]
    xlsx = qc.get(
        "/api/v1/qc/export.xlsx", params={**MARCH, "cases": "RWS-03", "subset": "failing"}
    )
    assert xlsx.status_code == 200
    sheet = openpyxl.load_workbook(io.BytesIO(xlsx.content), read_only=True).active
    values = list(sheet.iter_rows(values_only=True))
    header = list(values[0])
    reasons = {r[header.index("case_id")]: r[header.index("reason")] for r in values[1:]}
    assert reasons == {"r-E3-1": "placeholder", "r-E4-1": "unsigned", "r-E5-1": "laterality_left"}
    table = qc.get(
        "/api/v1/qc/export.xlsx", params={**MARCH, "indicator": "IQ-01", "group_by": "clinic"}
    )
    values = list(
        openpyxl.load_workbook(io.BytesIO(table.content), read_only=True).active.iter_rows(
            values_only=True
        )
    )
    header = list(values[0])
    groups = {r[header.index("group")]: r[header.index("rate")] for r in values[1:]}
    assert groups == {None: 60.0, "CLINIC_A": 50.0, "CLINIC_B": 100.0}  # None: the total
    every = qc.get("/api/v1/qc/export.csv", params={**MARCH, "indicator": "all"})
    codes = [r["code"] for r in csv.DictReader(io.StringIO(every.content.decode("utf-8-sig")))]
    assert "RRC-02" in codes and "ALL-06" in codes
    ecg = next(
        r
        for r in csv.DictReader(io.StringIO(every.content.decode("utf-8-sig")))
        if r["code"] == "ECG-03"
    )
    assert ecg["status"] == "no_data" and ecg["value"] == ""  # never 0

    # The monthly report.
    pdf = qc.get("/api/v1/qc/report.pdf", params={"month": "2026-03"})
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")
    path = tmp_path / "qc.pdf"
    path.write_bytes(pdf.content)
    words = subprocess.run(
        ["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True, check=True
    ).stdout
    assert "Monthly QC report" in words and "2026-03" in words and "RRC-02" in words
    assert "75.0 %" in words
    assert qc.get("/api/v1/qc/report.pdf", params={"month": "2026-3"}).status_code == 422

    # Nobody else: readers, clinic staff, no token.
    reader = server.client("reader", alliance["reader"])
    tech = server.client("tech_a", alliance["tech_a"])
    for client in (reader, tech):
        assert client.get("/api/v1/qc/indicators").status_code == 403
        assert client.get("/api/v1/qc/indicators/RRC-02/cases").status_code == 403
        assert client.get("/api/v1/qc/export.csv", params={"cases": "RRC-02"}).status_code == 403
        assert client.put("/api/v1/qc/targets/RRC-02", json={"target": 1}).status_code == 403
        assert client.get("/api/v1/qc/report.pdf", params={"month": "2026-03"}).status_code == 403
    import httpx

    assert httpx.get(f"{server.http}/api/v1/qc/indicators", timeout=HTTP_TIMEOUT).status_code == 401
    with server.db() as db:
        exports = db.execute(
            "SELECT count(*) FROM audit_events WHERE action = 'export' AND actor = 'user:qc'"
        ).fetchone()
        assert exports is not None and exports[0] >= 6
