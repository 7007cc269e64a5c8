"""Reading what the lab intake needs from an HL7 v2 message, and writing its acknowledgement.

The intake reads only the envelope: the MSH fields that say who sent what (MSH-3, -4, -9,
-10, -12, -15, -16, -18), and that the message names its patient (PID-3) and its order
(OBR-2/OBR-3 or ORC-2/ORC-3). The full message (observations, units, ranges) is read by
the result model later, from the stored bytes. This is hand-written on purpose: python-hl7's
``hl7.parse`` builds every field of every segment, which took 0.3-9 ms per message of the
shared test data; the envelope needs a split of the first segment and of a few others.

Liberal in what it accepts: a UTF-8 byte order mark, segments ended by CR, LF or CRLF,
blank lines, a missing final terminator, MSH-2 with a fifth (truncation) character, and
the character set named in MSH-18 (UTF-8 when none is given; GB 18030 when a message
without MSH-18 is not valid UTF-8).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

__all__ = [
    "ACCEPTED_TYPES",
    "Batch",
    "Envelope",
    "ErrorCode",
    "MessageRejected",
    "ack_message",
    "batch_ack",
    "check_acceptable",
    "new_control_id",
    "read_envelope",
    "split_batch",
]

# Message types the lab intake accepts (OUL carries specimen-oriented lab results).
ACCEPTED_TYPES = frozenset({("ORU", "R01"), ("OUL", "R22"), ("OUL", "R24")})

_SEGMENT_END = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"
_ENVELOPE_SEGMENTS = (b"FHS", b"BHS", b"BTS", b"FTS")
# MSH-18 values (HL7 table 0211) and their Python codecs
_CHARSETS = {
    "": "utf-8",
    "ASCII": "ascii",
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
    "8859/1": "latin-1",
    "8859/15": "iso8859-15",
    "GB 18030-2000": "gb18030",
    "GB18030": "gb18030",
    "GBK": "gbk",
    "BIG-5": "big5",
}


class ErrorCode:
    """HL7 table 0357 (message error condition codes) as used in ERR-3."""

    SEGMENT_SEQUENCE = ("100", "Segment sequence error")
    REQUIRED_FIELD = ("101", "Required field missing")
    DATA_TYPE = ("102", "Data type error")
    UNSUPPORTED_TYPE = ("200", "Unsupported message type")
    UNSUPPORTED_EVENT = ("201", "Unsupported event code")
    UNSUPPORTED_VERSION = ("203", "Unsupported version id")
    UNKNOWN_KEY = ("204", "Unknown key identifier")
    DUPLICATE_KEY = ("205", "Duplicate key identifier")
    INTERNAL = ("207", "Application internal error")


class MessageRejected(Exception):
    """The message cannot be accepted. ``reject`` (AR): sending it again will not help;
    otherwise AE. ``location`` is the ERR-2 location (segment^sequence^field)."""

    def __init__(
        self,
        reason: str,
        *,
        code: tuple[str, str],
        reject: bool = True,
        location: str = "",
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.reject = reject
        self.location = location


class Envelope(NamedTuple):
    """The MSH fields of one message (as sent, not unescaped) and its normalised text.

    A named tuple: read for every message received, and made faster than a frozen
    dataclass of as many fields (positional construction, no ``object.__setattr__`` each)."""

    segments: tuple[str, ...]  # every segment, without terminators
    field_separator: str
    encoding_characters: str  # MSH-2
    sending_application: str  # MSH-3
    sending_facility: str  # MSH-4
    receiving_application: str  # MSH-5
    receiving_facility: str  # MSH-6
    message_type: str  # MSH-9
    control_id: str  # MSH-10
    processing_id: str  # MSH-11
    version: str  # MSH-12
    accept_ack_type: str  # MSH-15
    application_ack_type: str  # MSH-16
    charset: str  # MSH-18
    codec: str  # the Python codec the bytes were read with
    # The names the sender may be registered under: MSH-4's namespace ID and universal ID;
    # when MSH-4 is empty, those of MSH-3 (some LIS leave MSH-4 out).
    facility_names: tuple[str, ...]

    @property
    def component_separator(self) -> str:
        return self.encoding_characters[:1] or "^"

    def components(self, value: str) -> list[str]:
        return value.split(self.component_separator)

    @property
    def message_code(self) -> str:
        return self.components(self.message_type)[0].strip()

    @property
    def trigger_event(self) -> str:
        parts = self.components(self.message_type)
        return parts[1].strip() if len(parts) > 1 else ""

    @property
    def enhanced_mode(self) -> bool:
        """Enhanced acknowledgement mode: MSH-15 or MSH-16 is valued."""
        return bool(self.accept_ack_type.strip() or self.application_ack_type.strip())

    @property
    def text(self) -> str:
        return "\r".join(self.segments)


def _facility_names(sending_application: str, sending_facility: str, comp: str) -> tuple[str, ...]:
    source = sending_facility if sending_facility.strip() else sending_application
    return tuple(p.strip() for p in source.split(comp)[:2] if p.strip())


def _segment_lines(raw: bytes) -> list[bytes]:
    if raw.startswith(_BOM):
        raw = raw[len(_BOM) :]
    # Segments end with CR; only a message with LF (LF or CRLF ends) needs the pattern.
    lines = _SEGMENT_END.split(raw) if b"\n" in raw else raw.split(b"\r")
    return [line for line in lines if line.strip(b" \t\x00")]


def _decode(raw: bytes, charset: str) -> tuple[str, str]:
    codec = _CHARSETS.get(charset.strip().upper())
    if codec is None:
        codec = "utf-8"
    try:
        return raw.decode(codec), codec
    except UnicodeDecodeError as exc:
        if not charset.strip():
            try:
                return raw.decode("gb18030"), "gb18030"
            except UnicodeDecodeError:
                pass
        raise MessageRejected(
            f"the message is not valid {charset.strip() or 'UTF-8'} text (byte {exc.start})",
            code=ErrorCode.DATA_TYPE,
        ) from exc


def read_envelope(raw: bytes) -> Envelope:
    """The envelope of one message; raises MessageRejected (AR) when it is not an HL7 v2
    message the lab intake can accept."""
    lines = _segment_lines(raw)
    first = lines[0].lstrip() if lines else b""
    if not first.startswith(b"MSH") or len(first) < 8:
        raise MessageRejected(
            "not an HL7 v2 message: it does not begin with an MSH segment",
            code=ErrorCode.SEGMENT_SEQUENCE,
            location="MSH",
        )
    lines[0] = first
    separator = first[3:4]
    head = first.split(separator, 18)
    charset = head[17].decode("ascii", "replace") if len(head) > 17 else ""
    text, codec = _decode(b"\r".join(lines), charset)
    segments = tuple(text.split("\r"))
    sep = separator.decode("ascii", "replace")
    # MSH-n is msh[n - 1] (MSH-1 is the separator itself); up to MSH-18, padded.
    msh = segments[0].split(sep, 18)[:18]
    if len(msh) < 18:
        msh += [""] * (18 - len(msh))
    encoding = msh[1]
    if len(encoding) < 4 or sep in encoding:
        raise MessageRejected(
            f"MSH-2 encoding characters {encoding!r} are incomplete",
            code=ErrorCode.DATA_TYPE,
            location="MSH^1^2",
        )
    return Envelope(
        segments,
        sep,
        encoding,
        msh[2],  # MSH-3
        msh[3],  # MSH-4
        msh[4],  # MSH-5
        msh[5],  # MSH-6
        msh[8],  # MSH-9
        msh[9],  # MSH-10
        msh[10],  # MSH-11
        msh[11],  # MSH-12
        msh[14],  # MSH-15
        msh[15],  # MSH-16
        charset,
        codec,
        _facility_names(msh[2], msh[3], encoding[0]),
    )


def check_acceptable(env: Envelope) -> None:
    """Raise MessageRejected unless the message is a lab result the intake accepts: its type,
    version, control ID, sender, patient and order."""
    if not env.control_id.strip():
        raise MessageRejected(
            "MSH-10 message control ID is missing",
            code=ErrorCode.REQUIRED_FIELD,
            location="MSH^1^10",
        )
    parts = env.message_type.split(env.encoding_characters[0])
    code = parts[0].strip().upper()
    event = parts[1].strip().upper() if len(parts) > 1 else ""
    if (code, event) not in ACCEPTED_TYPES:
        shown = f"{code}^{event}" if event else code or "(none)"
        accepted = ", ".join(f"{c}^{e}" for c, e in sorted(ACCEPTED_TYPES))
        raise MessageRejected(
            f"unsupported message type {shown}: the lab intake accepts {accepted}",
            code=ErrorCode.UNSUPPORTED_EVENT
            if code in {c for c, _ in ACCEPTED_TYPES}
            else ErrorCode.UNSUPPORTED_TYPE,
            location="MSH^1^9",
        )
    if not env.version.strip().startswith("2."):
        raise MessageRejected(
            f"unsupported HL7 version {env.version.strip() or '(none)'} in MSH-12: "
            "HL7 v2.x is accepted",
            code=ErrorCode.UNSUPPORTED_VERSION,
            location="MSH^1^12",
        )
    extra = next((i for i, seg in enumerate(env.segments[1:], 2) if seg[:3] == "MSH"), None)
    if extra is not None:
        raise MessageRejected(
            f"segment {extra} is a second MSH: send one message, or a batch (BHS ... BTS)",
            code=ErrorCode.SEGMENT_SEQUENCE,
            location="MSH^2",
        )
    if not env.facility_names:
        raise MessageRejected(
            "MSH-4 sending facility (and MSH-3 sending application) are empty: "
            "the sender cannot be identified",
            code=ErrorCode.REQUIRED_FIELD,
            location="MSH^1^4",
        )
    _check_patient_and_orders(env)


_ORDER_SEGMENTS = frozenset({"PID", "OBR", "ORC"})


def _check_patient_and_orders(env: Envelope) -> None:
    sep = env.field_separator
    pid_ids: list[str] = []
    orders: list[tuple[int, bool]] = []  # (OBR sequence, has its own order number)
    order_elsewhere = False  # an ORC with a placer or filler number
    obr_seen = 0
    for segment in env.segments[1:]:
        name = segment[:3]
        if name not in _ORDER_SEGMENTS:
            continue  # results (OBX), notes, specimens: nothing to check here
        fields = segment.split(sep, 4)
        if name == "PID":
            pid_ids.append(_entity(env, fields, 3))
        elif name == "OBR":
            obr_seen += 1
            orders.append((obr_seen, bool(_entity(env, fields, 2) or _entity(env, fields, 3))))
        elif name == "ORC" and (_entity(env, fields, 2) or _entity(env, fields, 3)):
            order_elsewhere = True
    if not pid_ids:
        raise MessageRejected(
            "no PID segment: the message does not name its patient",
            code=ErrorCode.SEGMENT_SEQUENCE,
            location="PID",
        )
    if not any(pid_ids):
        raise MessageRejected(
            "PID-3 patient identifier is empty",
            code=ErrorCode.REQUIRED_FIELD,
            location="PID^1^3",
        )
    if not orders:
        raise MessageRejected(
            "no OBR segment: the message carries no order",
            code=ErrorCode.SEGMENT_SEQUENCE,
            location="OBR",
        )
    for sequence, numbered in orders:
        if not numbered and not order_elsewhere:
            raise MessageRejected(
                f"OBR {sequence}: no placer (OBR-2) or filler (OBR-3) order number, "
                "and no ORC gives one",
                code=ErrorCode.REQUIRED_FIELD,
                location=f"OBR^{sequence}^3",
            )


def _entity(env: Envelope, fields: list[str], n: int) -> str:
    """The first component of field ``n`` (the identifier of a CX/EI), stripped."""
    if len(fields) <= n:
        return ""
    repetition = fields[n].split(env.encoding_characters[1:2] or "~")[0]
    return env.components(repetition)[0].strip()


@dataclass(frozen=True, slots=True)
class Batch:
    """A request body split into messages: each message's bytes as received, and the batch
    header segments (FHS, BHS) if it was a batch."""

    messages: tuple[bytes, ...]
    file_header: str | None
    batch_header: str | None

    @property
    def is_batch(self) -> bool:
        return self.file_header is not None or self.batch_header is not None


_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)?")


def split_batch(raw: bytes) -> Batch:
    """Split ``raw`` (one message, or an HL7 batch with FHS/BHS...BTS/FTS) into messages,
    each as the bytes it was received as. Anything that is not a batch is one message."""
    body = raw[len(_BOM) :] if raw.startswith(_BOM) else raw
    starts: list[int] = []
    ends: list[int] = []
    headers: dict[bytes, str] = {}
    for match in _LINE.finditer(body):
        line = match.group().lstrip()
        if not line:
            continue
        kind = line[:3]
        if kind == b"MSH":
            if starts and len(ends) < len(starts):
                ends.append(match.start())
            starts.append(match.start())
        elif kind in _ENVELOPE_SEGMENTS:
            if starts and len(ends) < len(starts):
                ends.append(match.start())
            if kind in (b"FHS", b"BHS"):
                headers[kind] = line.rstrip(b"\r\n").decode("utf-8", "replace")
    if len(ends) < len(starts):
        ends.append(len(body))
    if not headers or not starts:
        return Batch(messages=(raw,), file_header=None, batch_header=None)
    return Batch(
        messages=tuple(body[s:e] for s, e in zip(starts, ends, strict=True)),
        file_header=headers.get(b"FHS"),
        batch_header=headers.get(b"BHS"),
    )


def new_control_id() -> str:
    """A fresh control ID for an acknowledgement (MSH-10, at most 20 characters)."""
    return uuid.uuid4().hex[:20]


def _escape(text: str, env: Envelope | None) -> str:
    enc = env.encoding_characters if env else "^~\\&"
    fs = env.field_separator if env else "|"
    comp, rep, esc = enc[0], enc[1], enc[2]
    sub = enc[3] if len(enc) > 3 else "&"
    out = text.replace(esc, f"{esc}E{esc}")
    for char, code in ((fs, "F"), (comp, "S"), (sub, "T"), (rep, "R")):
        out = out.replace(char, f"{esc}{code}{esc}")
    return " ".join(out.split())  # no line breaks in a field


def _version_tuple(version: str) -> tuple[int, ...]:
    numbers = []
    for part in version.strip().split("."):
        if not part.isdigit():
            break
        numbers.append(int(part))
    return tuple(numbers)


_last_stamp: list[tuple[datetime, Any, str]] = []  # the last timestamp written


def _timestamp(now: datetime) -> str:
    """``now`` as an HL7 DTM to the second with its UTC offset (YYYYMMDDHHMMSS+ZZZZ). The
    last one is kept: an ACK a message, thousands a second, mostly within the same second."""
    second = now.replace(microsecond=0)
    last = _last_stamp[-1] if _last_stamp else None
    if last is not None and last[0] == second and last[1] is now.tzinfo:
        return last[2]
    stamp = second.strftime("%Y%m%d%H%M%S") + second.strftime("%z")
    _last_stamp[:] = [(second, now.tzinfo, stamp)]
    return stamp


def ack_message(
    env: Envelope | None,
    *,
    code: str,
    now: datetime,
    control_id: str,
    reason: str = "",
    error: tuple[str, str] | None = None,
    location: str = "",
) -> str:
    """The acknowledgement (ACK) of ``env``: MSH answering the sender, MSA with ``code``
    (AA/AE/AR, or CA/CE/CR in enhanced mode) echoing MSH-10, and for an error MSA-3 and an
    ERR segment with the table 0357 ``error`` code and ``reason``. Without an envelope (no
    readable MSH) the ACK is addressed to nobody and MSA-2 is empty. Segments end with CR."""
    if env is not None and not reason and error is None:
        # A positive ACK, one per message accepted: the text around the timestamp and the
        # control IDs is the same for every message of a sender's stream; made once.
        key = env[1:8] + env[9:14]  # from the field separator to MSH-18, less MSH-10
        parts = _positive_acks.get(key)
        if parts is None:
            mark = "\x00"  # in no field of an HL7 message we accept
            text = _ack_text(
                env._replace(control_id=mark), code=mark, now=now, control_id=mark, stamp=mark
            )
            parts = tuple(text.split(mark))
            if len(parts) != 5:  # a field held it after all: not kept
                return _ack_text(env, code=code, now=now, control_id=control_id)
            if len(_positive_acks) > 1000:
                _positive_acks.clear()
            _positive_acks[key] = parts
        head, middle, tail, echo, end = parts
        stamp = _timestamp(now)
        return f"{head}{stamp}{middle}{control_id}{tail}{code}{echo}{env.control_id}{end}"
    return _ack_text(
        env,
        code=code,
        now=now,
        control_id=control_id,
        reason=reason,
        error=error,
        location=location,
    )


# Positive ACKs by their envelope's fields: the texts before the timestamp, between it and
# the ACK's control ID, between that and MSA-1, between MSA-1 and MSA-2, after MSA-2.
_positive_acks: dict[tuple[Any, ...], tuple[str, ...]] = {}


def _ack_text(
    env: Envelope | None,
    *,
    code: str,
    now: datetime,
    control_id: str,
    reason: str = "",
    error: tuple[str, str] | None = None,
    location: str = "",
    stamp: str | None = None,
) -> str:
    fs = env.field_separator if env else "|"
    # Four encoding characters: the truncation character (v2.7) is not needed in an ACK
    enc = env.encoding_characters[:4] if env else "^~\\&"
    comp = enc[0]
    version = (env.version.split(comp)[0].strip() if env else "") or "2.5.1"
    vt = _version_tuple(version)
    trigger = env.trigger_event if env else ""
    if vt >= (2, 3, 1):
        msg_type = comp.join(["ACK", trigger, "ACK"]) if trigger else comp.join(["ACK", "", "ACK"])
    else:
        msg_type = comp.join(["ACK", trigger]) if trigger else "ACK"
    msh = [
        "MSH",
        enc,
        (env.receiving_application if env else "") or "RDC",
        (env.receiving_facility if env else "") or "RDC",
        env.sending_application if env else "",
        env.sending_facility if env else "",
        _timestamp(now) if stamp is None else stamp,
        "",
        msg_type,
        control_id,
        (env.processing_id if env else "") or "P",
        version,
    ]
    if env and env.charset.strip():
        msh += ["", "", "", "", "", env.charset]
    segments = [fs.join(msh)]
    msa = ["MSA", code, env.control_id if env else ""]
    if reason and vt < (2, 7):  # MSA-3 was withdrawn in v2.7; ERR-8 carries the text
        msa.append(_escape(reason, env))
    segments.append(fs.join(msa))
    if error is not None:
        err_code = comp.join([error[0], _escape(error[1], env), "HL70357"])
        if vt >= (2, 5):
            # ERR-2 location, ERR-3 HL7 error code, ERR-4 severity, ERR-8 user message
            location_value = location.replace("^", comp)
            err = ["ERR", "", location_value, err_code, "E", "", "", "", _escape(reason, env)]
        else:
            # ERR-1 error code and location (ELD): segment^sequence^field^code&text&table
            sub = enc[3] if len(enc) > 3 else "&"
            parts = [*location.split("^"), "", "", ""][:3]
            eld = comp.join([*parts, sub.join([error[0], _escape(error[1], env), "HL70357"])])
            err = ["ERR", eld]
        segments.append(fs.join(err))
    return "\r".join(segments) + "\r"


def batch_ack(batch: Batch, acks: list[str], *, now: datetime, control_id: str) -> str:
    """The acknowledgement of a batch: the ACKs of its messages inside BHS/BTS (and FHS/FTS
    when the batch came in a file), each header answering the one received (BHS-12 and
    FHS-12 reference the received batch and file control IDs)."""
    stamp = now.strftime("%Y%m%d%H%M%S") + now.strftime("%z")

    def header(kind: str, received: str | None) -> str:
        fields = (received or f"{kind}|^~\\&").split("|")
        fields += [""] * (13 - len(fields))
        sender_app, sender_fac = fields[2], fields[3]
        ours_app, ours_fac = fields[4] or "RDC", fields[5] or "RDC"
        out = [kind, fields[1] or "^~\\&", ours_app, ours_fac, sender_app, sender_fac, stamp]
        out += ["", "", "", control_id, fields[10]]
        return "|".join(out)

    segments: list[str] = []
    if batch.file_header is not None:
        segments.append(header("FHS", batch.file_header))
    segments.append(header("BHS", batch.batch_header))
    body = "".join(acks)
    trailer = [f"BTS|{len(acks)}"]
    if batch.file_header is not None:
        trailer.append("FTS|1")
    return "\r".join(segments) + "\r" + body + "\r".join(trailer) + "\r"
