"""Push of signed reports to a clinic's HIS as HL7 v2.5.1 ORU^R01 over MLLP.

The message: MSH (UTF-8, MSH-18 ``UNICODE UTF-8``), PID (patient ID within its issuer; the
name as one PID-5 repetition per DICOM component group: the alphabetic name first, then the
ideographic (Chinese) one, told apart by XPN-8, table 4000),
OBR (accession as placer, study as filler, discipline, result status), OBX TX lines for
findings and conclusion, an OBX ST line with the HR mark when granted, and an OBX ED
line carrying the signed PDF in Base64 (endpoints with ``pdf_mode`` ``link``: an OBX RP
line with the PDF's URL and an OBX ST line with its SHA-256 instead). Result status:
F final, C a later version that replaces a final one (amended, corrected, appended),
P preliminary.

A retry sends the same message control ID (original-mode acknowledgement: the receiver
can recognise a repeat). Only MSA-1 ``AA`` (or ``CA``) counts as delivered; ``AE``/``AR``
and anything else are failures recorded with the MSA/ERR text and retried.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import socket
import ssl
import uuid
from datetime import datetime
from typing import Any

import hl7

from rdc_core.settings import get_settings
from rdc_core.tls import client_context
from worklist.delivery.senders import (
    DeliveryFailedError,
    EndpointSpec,
    ReportPush,
    person_name_groups,
    register_sender,
)

__all__ = [
    "build_oru",
    "escape",
    "parse_ack",
    "patient_xpn",
    "pdf_url",
    "send_mllp",
    "send_oru",
]

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
_ACCEPTED = ("AA", "CA")
_SECTION = {"imaging": "RAD", "ecg": "EC", "lab": "LAB"}
_MAX_ACK_BYTES = 1 << 20
# XPN-8 name representation code (HL7 table 4000) of each DICOM PN component group
_REPRESENTATION = {"alphabetic": "A", "ideographic": "I", "phonetic": "P"}
_LEGAL_NAME = "L"  # XPN-7 name type code (HL7 table 0200)


def escape(text: str) -> str:
    """``text`` with HL7's delimiters escaped (default encoding characters) and line breaks
    as ``\\.br\\``."""
    out = text.replace("\\", "\\E\\")
    for char, seq in (("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        out = out.replace(char, seq)
    out = out.replace("\r\n", "\n").replace("\r", "\n")
    return out.replace("\n", "\\.br\\")


def _ts(value: datetime | None) -> str:
    if value is None:
        return ""
    return value.astimezone(get_settings().zone).strftime("%Y%m%d%H%M%S%z")


def control_id(push: ReportPush) -> str:
    """MSH-10: the same for every attempt of one delivery (at most 20 characters)."""
    return uuid.UUID(push.delivery_id).hex[:20]


def _segment(name: str, fields: dict[int, str]) -> str:
    width = max(fields)
    return "|".join([name, *(fields.get(i, "") for i in range(1, width + 1))])


def patient_xpn(name: str) -> str:
    """PID-5 of a DICOM PN value: one XPN repetition per component group, e.g.
    ``Wang^Fang^^^^^L^A~王^芳^^^^^L^I`` for ``Wang^Fang=王^芳``."""
    repetitions = []
    for group in person_name_groups(name):
        # DICOM orders family^given^middle^prefix^suffix; XPN has suffix (4) before
        # prefix (5), then degree (6), name type (7) and representation (8).
        components = [group.family, group.given, group.middle, group.suffix, group.prefix, ""]
        components += [_LEGAL_NAME, _REPRESENTATION[group.representation]]
        repetitions.append("^".join(escape(c) for c in components))
    return "~".join(repetitions)


def pdf_url(push: ReportPush) -> str:
    """Where the receiver fetches the signed PDF of a linked push: the API's PDF route under
    ``RDC_PUBLIC_URL`` (else this server's own address)."""
    settings = get_settings()
    base = settings.public_url or f"http://{settings.http_host}:{settings.http_port}"
    return f"{base.rstrip('/')}/api/v1/reports/{push.report_id}/pdf"


_TEXT_TYPES = frozenset({"ST", "TX", "FT"})
_CODED_TYPES = frozenset({"CWE", "CE", "CNE"})


def _observation_value(item: dict[str, Any], code: str) -> tuple[str, str, str]:
    """(OBX-2 value type, OBX-3, OBX-5) of a signed observation: a number as NM, a text
    result with its own type (ST, TX, FT), a coded one as CWE (CE/CNE kept as sent)."""
    kind = str(item.get("value_type") or "").upper()
    coding = item.get("value_coding")
    if isinstance(coding, dict):
        system = str(coding.get("system") or "")
        system = {"http://loinc.org": "LN", "http://snomed.info/sct": "SCT"}.get(system, system)
        triplet = [coding.get("code") or "", coding.get("display") or "", system]
        value = "^".join(escape(str(c)) for c in triplet)
        return (kind if kind in _CODED_TYPES else "CWE", code, value)
    if item.get("value") is None:
        return (
            kind if kind in _TEXT_TYPES else "ST",
            code,
            escape(str(item.get("value_string") or "")),
        )
    return ("NM", code, f"{float(item['value']):g}")


def build_oru(push: ReportPush, endpoint: EndpointSpec, *, now: datetime) -> str:
    """The ORU^R01 message of a report version, segments separated by CR."""
    status = push.result_status
    xpn = patient_xpn(push.patient_name)
    msh = "MSH|" + "|".join(
        [
            "^~\\&",
            "RDC",
            escape(push.sender_code),
            escape(endpoint.receiving_application or ""),
            escape(endpoint.receiving_facility or push.clinic_code),
            _ts(now),
            "",
            "ORU^R01^ORU_R01",
            control_id(push),
            "P",
            "2.5.1",
            "",
            "",
            "",
            "",
            "CHN",
            "UNICODE UTF-8",
        ]
    )
    pid = _segment(
        "PID",
        {
            1: "1",
            3: f"{escape(push.patient_id)}^^^{escape(push.issuer)}^PI",
            5: xpn,
            7: push.birth_date or "",
            8: push.sex or "",
        },
    )
    service = f"{escape(push.modality or push.discipline.upper())}^{escape(push.description)}^L"
    obr = _segment(
        "OBR",
        {
            1: "1",
            2: escape(push.accession_number or ""),
            3: f"{escape(push.study_instance_uid)}^RDC",
            4: service,
            7: _ts(push.performed_at),
            22: _ts(push.signed_at),
            24: _SECTION.get(push.discipline, "OTH"),
            25: status,
            32: f"&{escape(push.signer)}",
        },
    )
    segments = [msh, pid, obr]
    observations: list[tuple[str, str, str]] = []
    if push.findings.strip() and push.discipline != "lab":  # lab: one OBX per result below
        observations.append(("TX", "FINDINGS^所见 Findings^L", escape(push.findings.strip())))
    conclusion = push.impression.strip()
    if push.recommendation.strip():
        conclusion = f"{conclusion}\n{push.recommendation.strip()}".strip()
    if conclusion:
        observations.append(("TX", "IMP^结论 Conclusion^L", escape(conclusion)))
    hr = push.recognition or {}
    if hr.get("granted"):
        parts = [str(hr.get("mark") or "HR")]
        if hr.get("scope_note"):
            parts.append(str(hr["scope_note"]))
        if hr.get("recognizable_until"):
            parts.append(f"互认有效期至 valid until {str(hr['recognizable_until'])[:10]}")
        observations.append(("ST", "HR^互认 Mutual recognition^L", escape(" ".join(parts))))
    units: dict[int, str] = {}
    ranges: dict[int, str] = {}
    flags: dict[int, str] = {}
    for item in push.extra.get("observations") or []:
        # The signed report's coded results (an ECG's intervals and axes): OBX NM lines
        # with their LOINC (LN) or local (L) code and UCUM units in OBX-6.
        system = "LN" if item.get("system") == "http://loinc.org" else "L"
        code = f"{escape(str(item['code']))}^{escape(str(item.get('display') or ''))}^{system}"
        observations.append(_observation_value(item, code))
        if item.get("value") is not None or item.get("unit"):
            units[len(observations)] = f"{escape(str(item.get('unit') or ''))}^^UCUM"
        # Lab results also carry their reference range (OBX-7) and flags (OBX-8).
        if item.get("reference_text"):
            ranges[len(observations)] = escape(str(item["reference_text"]))
        if item.get("interpretation"):
            flags[len(observations)] = "~".join(escape(str(f)) for f in item["interpretation"])
    if endpoint.pdf_mode == "link":
        # A reference pointer (RP) to the PDF and the PDF's SHA-256 instead of the PDF: a
        # Base64 PDF of 75 KB is over python-hl7's 64 KiB frame and hl7apy's strict
        # field lengths.
        url = pdf_url(push)
        observations.append(("RP", "PDF^签名报告 Signed report^L", f"{escape(url)}^RDC^AP^PDF"))
        digest = hashlib.sha256(push.pdf).hexdigest()
        observations.append(("ST", "PDFSHA256^签名报告 SHA-256 Signed report SHA-256^L", digest))
    else:
        pdf = base64.b64encode(push.pdf).decode("ascii")  # A-Z a-z 0-9 + / =: no delimiters
        observations.append(("ED", "PDF^签名报告 Signed report^L", f"RDC^AP^PDF^Base64^{pdf}"))
    for number, (kind, code, value) in enumerate(observations, start=1):
        fields = {1: str(number), 2: kind, 3: code, 5: value, 11: status}
        if number in units:
            fields[6] = units[number]
        if number in ranges:
            fields[7] = ranges[number]
        if number in flags:
            fields[8] = flags[number]
        segments.append(_segment("OBX", fields))
    return "\r".join(segments) + "\r"


def parse_ack(raw: bytes) -> tuple[str, str, str]:
    """(MSA-1 code, MSA-2 control ID, text from MSA-3 and ERR) of an ACK message."""
    text = raw.decode("utf-8", errors="replace").strip("\x0b\x1c\r\n")
    try:
        message = hl7.parse(text)
        msa = message.segment("MSA")
    except (KeyError, ValueError, IndexError) as exc:
        raise DeliveryFailedError(f"unreadable acknowledgement: {text[:200]!r}") from exc
    code = str(msa[1]) if len(msa) > 1 else ""
    acked = str(msa[2]) if len(msa) > 2 else ""
    notes = [str(msa[3])] if len(msa) > 3 and str(msa[3]) else []
    with contextlib.suppress(KeyError):
        notes += [str(err) for err in message.segments("ERR")]
    return code, acked, "; ".join(notes)


def send_mllp(
    host: str, port: int, payload: bytes, *, timeout: float, tls: ssl.SSLContext | None = None
) -> bytes:
    """Send one MLLP-framed message and return the framed answer's content; with ``tls``
    over TLS (the peer's certificate and host name verified)."""
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(socket.create_connection((host, port), timeout=timeout))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            sock = stack.enter_context(tls.wrap_socket(sock, server_hostname=host))
        sock.settimeout(timeout)
        sock.sendall(START_BLOCK + payload + END_BLOCK)
        buffer = b""
        while END_BLOCK not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                raise DeliveryFailedError("the receiver closed the connection without an ACK")
            buffer += chunk
            if len(buffer) > _MAX_ACK_BYTES:
                raise DeliveryFailedError("the acknowledgement is too large")
    start = buffer.find(START_BLOCK)
    return buffer[start + 1 if start >= 0 else 0 : buffer.find(END_BLOCK)]


def send_oru(push: ReportPush, endpoint: EndpointSpec, timeout: float) -> dict[str, Any]:
    """Send the report's ORU^R01 to ``endpoint`` over MLLP; returns the ACK's content.
    Raises DeliveryFailedError unless MSA-1 is AA (or CA)."""
    from rdc_core.db import utcnow

    message = build_oru(push, endpoint, now=utcnow())
    peer = f"{endpoint.host}:{endpoint.port}"
    tls = client_context(get_settings()) if endpoint.tls else None
    answer = send_mllp(
        endpoint.host, endpoint.port, message.encode("utf-8"), timeout=timeout, tls=tls
    )
    code, acked, text = parse_ack(answer)
    detail = {"peer": peer, "msa": code, "control_id": control_id(push), "text": text}
    if acked and acked != control_id(push):
        raise DeliveryFailedError(f"{peer} acknowledged another message ({acked})", detail)
    if code not in _ACCEPTED:
        raise DeliveryFailedError(
            f"{peer} answered {code or 'no MSA code'}" + (f": {text}" if text else ""), detail
        )
    return detail


register_sender("hl7", send_oru)
