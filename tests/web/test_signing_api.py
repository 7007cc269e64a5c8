"""Signed reports over HTTP: sign end to end, validate the PDF with pyHanko against the
alliance CA, tamper detection through the public verify endpoint, versions and scoping."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import httpx
from asn1crypto import pem as asn1_pem
from asn1crypto import x509 as asn1_x509
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign.validation import validate_pdf_signature
from pyhanko_certvalidator import ValidationContext

from tests.helpers import RdcServer, rdc_cli, read_object, storescu, worklist_items


def _flip(data: bytes, offset: int) -> bytes:
    changed = bytearray(data)
    changed[offset] ^= 0x01
    return bytes(changed)


def test_sign_verify_amend_over_http(
    server: RdcServer, alliance: dict[str, str], testdata: Path, dcmtk: Path
) -> None:
    sent = storescu(
        dcmtk,
        [testdata / "dicom" / "CT_small.dcm"],
        port=server.dicom_port,
        calling_ae="CLINIC_A_CT",
    )
    assert all(r.returncode == 0 for r in sent)
    reader = server.client("reader", alliance["reader"])
    senior = server.client("senior", alliance["senior"])
    tech_a = server.client("tech_a", alliance["tech_a"])
    tech_b = server.client("tech_b", alliance["tech_b"])
    item = worklist_items(reader)[0]
    exam_id = item["exam_id"]
    assert reader.post(f"/api/v1/worklist/{item['id']}/claim").status_code == 200
    sop = reader.get(f"/api/v1/exams/{exam_id}").json()["instances"][0]["sop_instance_uid"]
    draft = reader.put(
        f"/api/v1/exams/{exam_id}/report",
        json={
            "findings": "两肺纹理清晰，未见结节。",
            "impression": "胸部CT未见异常",
            "quality_grade": "甲",
            "key_images": [{"sop_instance_uid": sop, "frame": 1}],
        },
    )
    assert draft.status_code == 200, draft.text
    assert draft.json()["key_images"] == [{"sop_instance_uid": sop, "frame": 1}]
    bad = reader.put(
        f"/api/v1/exams/{exam_id}/report", json={"key_images": [{"sop_instance_uid": "1.2.3"}]}
    )
    assert bad.status_code == 422
    # Numbers JSON (RFC 8785) cannot carry are refused, not a 500 at signing.
    for number in ("NaN", "Infinity", "9007199254740993"):
        refused = reader.put(
            f"/api/v1/exams/{exam_id}/report",
            content=f'{{"structured": {{"size": {number}}}}}',
            headers={"content-type": "application/json"},
        )
        assert refused.status_code == 422, (number, refused.text)
    v1 = reader.post(f"/api/v1/exams/{exam_id}/report/submit", json=reader.signing).json()
    assert v1["status"] == "preliminary"
    detail = reader.get(f"/api/v1/reports/{v1['id']}").json()
    assert (
        detail["signature"]["stage"] == "preliminary" and detail["signature"]["signer"] == "reader"
    )

    verified = senior.post(f"/api/v1/reports/{v1['id']}/verify-by-senior", json=senior.signing)
    assert verified.status_code == 200, verified.text
    check = senior.get(f"/api/v1/reports/{v1['id']}/verify").json()
    assert check["valid"] is True, check["reasons"]
    assert check["stage"] == "final" and check["signer"]["username"] == "senior"
    assert check["document"]["valid"] and check["pdf"]["valid"]

    # The PDF, validated by pyHanko itself against the exported alliance CA.
    ca_pem = rdc_cli(server.env, "ca", "export").stdout.encode()
    _, _, ca_der = asn1_pem.unarmor(ca_pem)
    pdf = read_object(server.env, f"reports/{v1['id']}/final.pdf")
    document = read_object(server.env, f"reports/{v1['id']}/final.json")
    signature = PdfFileReader(io.BytesIO(pdf)).embedded_signatures[0]
    status = validate_pdf_signature(
        signature, ValidationContext(trust_roots=[asn1_x509.Certificate.load(ca_der)])
    )
    assert status.intact and status.valid and status.trusted, status.pretty_print_details()
    assert b"/Subtype /Image" in pdf  # the key image, rendered from the DICOM frame

    # Anyone can verify a file; a changed byte fails.
    public = httpx.Client(base_url=server.http, timeout=30)
    assert public.post("/api/v1/verify", content=pdf).json()["valid"] is True
    upload = public.post("/api/v1/verify", files={"file": ("r.json", document)}).json()
    assert upload["valid"] is True and upload["kind"] == "document"
    assert upload["report"]["id"] == v1["id"]
    # Chunked bodies (no content-length) are capped as they stream: 413, raw or multipart.
    limit = 32 * 1024 * 1024

    def chunks(total: int, head: bytes = b"%PDF-", tail: bytes = b"") -> Any:
        yield head
        sent = len(head) + len(tail)
        block = b"0" * (1024 * 1024)
        while sent < total:
            piece = block[: total - sent]
            sent += len(piece)
            yield piece
        yield tail

    too_big = public.post("/api/v1/verify", content=chunks(limit + 1))
    assert too_big.status_code == 413, too_big.text
    assert too_big.headers["content-type"].startswith("application/problem+json")
    boundary = "rdcboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="r.pdf"\r\n'
        "Content-Type: application/pdf\r\n\r\n%PDF-"
    ).encode()
    too_big = public.post(
        "/api/v1/verify",
        content=chunks(limit + len(head) + 64, head, f"\r\n--{boundary}--\r\n".encode()),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert too_big.status_code == 413, too_big.text
    for data in (pdf, document):
        for offset in (len(data) // 3, len(data) // 2, len(data) - 10):
            answer = public.post("/api/v1/verify", content=_flip(data, offset)).json()
            assert answer["valid"] is False and answer["reasons"], offset

    # Versions: amend, both versions stay verifiable, the newest is current.
    assert (
        reader.post(
            f"/api/v1/reports/{v1['id']}/amend",
            json={"kind": "corrected", "reason": "x", "impression": "y", **reader.signing},
        ).status_code
        == 403
    )
    amended = senior.post(
        f"/api/v1/reports/{v1['id']}/amend",
        json={
            "kind": "corrected",
            "reason": "左肺下叶小结节漏报",
            "impression": "左肺下叶小结节，建议随访",
            **senior.signing,
        },
    )
    assert amended.status_code == 200, amended.text
    v2 = amended.json()
    assert v2["version"] == 2 and v2["previous_id"] == v1["id"] and v2["status"] == "final"
    history = tech_a.get(f"/api/v1/reports/{v1['id']}").json()
    assert history["current_id"] == v2["id"]
    assert [(v["version"], v["current"]) for v in history["versions"]] == [(1, False), (2, True)]
    assert history["versions"][1]["kind"] == "corrected"
    assert tech_a.get(f"/api/v1/exams/{exam_id}/report").json()["id"] == v2["id"]
    assert tech_b.get(f"/api/v1/reports/{v2['id']}").status_code == 404
    assert tech_b.get(f"/api/v1/reports/{v2['id']}/verify").status_code == 404
    for report_id in (v1["id"], v2["id"]):
        assert senior.get(f"/api/v1/reports/{report_id}/verify").json()["valid"] is True
    assert tech_a.get(f"/api/v1/reports/{v2['id']}/verify").json()["valid"] is True

    # Two amendments of the same version at once: exactly one wins.
    codes: list[int] = []
    barrier = threading.Barrier(2)

    def amend(n: int) -> None:
        barrier.wait()
        codes.append(
            senior.post(
                f"/api/v1/reports/{v2['id']}/amend",
                json={
                    "kind": "appended",
                    "reason": f"补充 {n}",
                    "recommendation": f"随访 {n}",
                    **senior.signing,
                },
            ).status_code
        )

    threads = [threading.Thread(target=amend, args=(n,)) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(codes) == [200, 409]
    with server.db() as db:
        audited = db.execute(
            "SELECT count(*) FROM audit_events WHERE action = 'view' AND object_type = 'report'"
        ).fetchone()
    assert audited is not None and audited[0] >= 2
