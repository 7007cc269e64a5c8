"""HL7 v2 lab result messages (ER7) → typed models.

Accepted: ORU^R01, OUL^R22 (specimen-oriented: SPM before its OBRs) and OUL^R24
(order-oriented, like ORU). Any other type raises :class:`UnsupportedMessageTypeError`
(the listener answers AR "unsupported message type"); a message that cannot be understood
raises :class:`MalformedMessageError` naming the reason (the listener answers AE). A batch
(FHS/BHS … BTS/FTS) is split into its messages.

Liberal in what it reads: segment terminators CR, LF or CRLF, a UTF-8 BOM, MLLP framing
bytes, blank lines, leading/trailing blanks in fields. Field splitting and unescaping are
python-hl7's; this module walks the segment groups and reads the fields the lab centre
uses. Timestamps (HL7 TS/DTM) carry their zone offset; a time without one is in ``tz``
(the caller passes ``RDC_TIMEZONE``). Times are returned in UTC. A value that cannot be
read (a 15-digit date, an impossible birth date) is kept as sent, the parsed value is
``None`` and a warning names the field: original values are kept, coerced ones recorded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from functools import lru_cache
from typing import Literal

import hl7
from pydantic import BaseModel, Field

__all__ = [
    "ACCEPTED_MESSAGE_TYPES",
    "DEFAULT_HIL_CODES",
    "Coded",
    "HierarchicDesignator",
    "HilIndices",
    "LabMessage",
    "LabParseError",
    "MalformedMessageError",
    "MessageHeader",
    "Observation",
    "Order",
    "Patient",
    "PatientIdentifier",
    "PerformingLab",
    "PersonName",
    "Specimen",
    "UnsupportedMessageTypeError",
    "parse_hl7_timestamp",
    "parse_message",
    "parse_messages",
    "split_messages",
]

ACCEPTED_MESSAGE_TYPES: frozenset[tuple[str, str]] = frozenset(
    {("ORU", "R01"), ("OUL", "R22"), ("OUL", "R24")}
)
#: OBX-3 codes of serum indices (haemolysis, icterus, lipaemia) as analysers send them; such
#: OBX are read into :class:`HilIndices`, not reported as results. Override per deployment.
DEFAULT_HIL_CODES: Mapping[str, Literal["H", "I", "L"]] = {
    "HIL-H": "H",
    "HIL-I": "I",
    "HIL-L": "L",
    "SI-H": "H",
    "SI-I": "I",
    "SI-L": "L",
    "HEM-INDEX": "H",
    "ICT-INDEX": "I",
    "LIP-INDEX": "L",
}
_BATCH_SEGMENTS = {"FHS", "BHS", "BTS", "FTS"}
_SEGMENT_ID = re.compile(r"^[A-Z][A-Z0-9]{2}$")
_TS = re.compile(
    r"^(?P<y>\d{4})(?:(?P<mo>\d{2})(?:(?P<d>\d{2})(?:(?P<h>\d{2})(?:(?P<mi>\d{2})"
    r"(?:(?P<s>\d{2})(?:\.(?P<f>\d{1,4}))?)?)?)?)?)?(?P<z>[+-]\d{4})?$"
)
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_COMPARATOR = re.compile(r"^(<=|>=|<>|<|>|=)\s*(.+)$")
_RANGE_SEPARATORS = (" to ", "_", " - ", "-", "～", "~", "—")


class LabParseError(Exception):
    """A message the lab intake cannot accept. ``ack_code`` is the HL7 acknowledgement code
    the listener answers (AE or AR); ``reason`` is the text for MSA-3/ERR-8;
    ``error_code`` the ERR-3 code (HL7 table 0357: 100 segment sequence error, 101 required
    field missing, 102 data type error, 200 unsupported message type); ``control_id`` the
    MSH-10 to echo in MSA-2 when it could be read."""

    ack_code: Literal["AE", "AR"] = "AE"

    def __init__(
        self, reason: str, *, control_id: str | None = None, error_code: str = "100"
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.control_id = control_id
        self.error_code = error_code


class MalformedMessageError(LabParseError):
    """The message cannot be understood (AE): the reason names the segment and field."""

    ack_code: Literal["AE", "AR"] = "AE"


class UnsupportedMessageTypeError(LabParseError):
    """A well-formed message of a type the lab intake does not take (AR)."""

    ack_code: Literal["AE", "AR"] = "AR"

    def __init__(self, message_type: str, *, control_id: str | None = None) -> None:
        super().__init__(
            f"unsupported message type {message_type}", control_id=control_id, error_code="200"
        )
        self.message_type = message_type


class Coded(BaseModel):
    """CE/CWE/CNE: the code, its text and coding system, and the alternate triplet."""

    code: str = ""
    text: str = ""
    system: str = ""
    alt_code: str = ""
    alt_text: str = ""
    alt_system: str = ""

    @property
    def identifier(self) -> str:
        """The primary code, else the alternate code."""
        return self.code or self.alt_code

    @property
    def display(self) -> str:
        return self.text or self.alt_text or self.identifier

    def pairs(self) -> list[tuple[str, str]]:
        """``(system, code)`` of the primary and the alternate coding, those present."""
        out = []
        if self.code:
            out.append((self.system, self.code))
        if self.alt_code:
            out.append((self.alt_system, self.alt_code))
        return out


class HierarchicDesignator(BaseModel):
    """HD: namespace ID, universal ID and its type (MSH-3/4/5/6)."""

    namespace_id: str = ""
    universal_id: str = ""
    universal_id_type: str = ""

    def matches(self, name: str) -> bool:
        """Whether ``name`` is this designator's namespace ID or universal ID."""
        return bool(name) and name in (self.namespace_id, self.universal_id)


class MessageHeader(BaseModel):
    sending_application: HierarchicDesignator
    sending_facility: HierarchicDesignator
    receiving_application: HierarchicDesignator
    receiving_facility: HierarchicDesignator
    message_time: datetime | None
    message_type: str  # e.g. "ORU^R01"
    message_code: str
    trigger_event: str
    control_id: str
    processing_id: str
    version: str
    accept_ack_type: str = ""  # MSH-15 (AL/NE/ER/SU)
    application_ack_type: str = ""  # MSH-16
    character_set: str = ""  # MSH-18

    @property
    def facility_names(self) -> list[str]:
        """MSH-4's namespace ID and universal ID, those present: the names a clinic's
        registered HL7 facility is matched against."""
        hd = self.sending_facility
        return [n for n in (hd.namespace_id, hd.universal_id) if n]

    @property
    def enhanced_ack(self) -> bool:
        """Enhanced acknowledgement mode: MSH-15 or MSH-16 is set."""
        return bool(self.accept_ack_type or self.application_ack_type)


class PatientIdentifier(BaseModel):
    """PID-3 repetition (CX): the ID, its assigning authority and identifier type code
    (table 0203, e.g. MR, PI, and ``NNCHN`` for the Chinese resident identity card)."""

    value: str
    assigning_authority: str = ""
    type_code: str = ""


class PersonName(BaseModel):
    """PID-5 repetition (XPN). ``representation`` is XPN-8 (table 4000): A alphabetic,
    I ideographic (汉字), P phonetic."""

    family: str = ""
    given: str = ""
    middle: str = ""
    suffix: str = ""
    prefix: str = ""
    name_type: str = ""
    representation: str = ""

    @property
    def is_empty(self) -> bool:
        return not (self.family or self.given)


class Patient(BaseModel):
    identifiers: list[PatientIdentifier]
    names: list[PersonName]
    sex: str = ""
    birth_date: date | None = None
    birth_date_raw: str = ""

    @property
    def national_id(self) -> str | None:
        """The national ID (identifier type ``NNCHN``), if sent."""
        for ident in self.identifiers:
            if ident.type_code.upper() == "NNCHN":
                return ident.value
        return None

    @property
    def ideographic_name(self) -> PersonName | None:
        for name in self.names:
            if name.representation.upper() == "I":
                return name
        return None


class PerformingLab(BaseModel):
    name: str = ""
    identifier: str = ""


class HilIndices(BaseModel):
    """Serum indices: haemolysis, icterus, lipaemia (units as the analyser reports)."""

    hemolysis: float | None = None
    icterus: float | None = None
    lipemia: float | None = None

    def merged(self, other: HilIndices) -> HilIndices:
        return HilIndices(
            hemolysis=self.hemolysis if other.hemolysis is None else other.hemolysis,
            icterus=self.icterus if other.icterus is None else other.icterus,
            lipemia=self.lipemia if other.lipemia is None else other.lipemia,
        )


class Observation(BaseModel):
    """One OBX. ``value`` is OBX-5 as text (components joined with ``^``, repetitions with
    ``~``, unescaped); ``numeric`` is its number for NM/SN (and numeric-looking ST/FN), with
    ``comparator`` (``<``, ``>``, ``<=``, ``>=``) when the value is censored."""

    set_id: str = ""
    value_type: str = ""
    code: Coded
    sub_id: str = ""
    value: str = ""
    value_coded: Coded | None = None
    numeric: float | None = None
    comparator: str = ""
    unit: str = ""
    unit_text: str = ""
    unit_system: str = ""
    reference_range: str = ""
    reference_low: float | None = None
    reference_high: float | None = None
    flags: list[str] = Field(default_factory=list)
    status: str = ""
    observed_at: datetime | None = None
    analysed_at: datetime | None = None
    method: Coded | None = None
    performing_lab: PerformingLab | None = None
    notes: list[str] = Field(default_factory=list)


class Specimen(BaseModel):
    set_id: str = ""
    specimen_id: str = ""
    type: Coded | None = None
    collected_at: datetime | None = None
    received_at: datetime | None = None
    condition: list[Coded] = Field(default_factory=list)  # SPM-24 (table 0493: HEM, CLOT…)
    hil: HilIndices = Field(default_factory=HilIndices)
    observations: list[Observation] = Field(default_factory=list)


class Order(BaseModel):
    set_id: str = ""
    placer_number: str = ""
    placer_namespace: str = ""
    filler_number: str = ""
    filler_namespace: str = ""
    service: Coded
    priority: str = ""  # OBR-5, else TQ1-9, else ORC-7/OBR-27 component 6 (S, A, R, …)
    collected_at: datetime | None = None  # OBR-7
    received_at: datetime | None = None  # OBR-14, else SPM-18
    reported_at: datetime | None = None  # OBR-22
    result_status: str = ""  # OBR-25
    observations: list[Observation] = Field(default_factory=list)
    specimens: list[Specimen] = Field(default_factory=list)
    hil: HilIndices = Field(default_factory=HilIndices)
    notes: list[str] = Field(default_factory=list)

    @property
    def key(self) -> str:
        """The order's natural key within its sender: filler number, else placer number."""
        return self.filler_number or self.placer_number

    @property
    def urgent(self) -> bool:
        return self.priority.upper() in {"S", "A", "C", "T"}


class LabMessage(BaseModel):
    header: MessageHeader
    patient: Patient
    orders: list[Order]
    unattached_observations: list[Observation] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)


# --- timestamps ------------------------------------------------------------------------


def parse_hl7_timestamp(value: str, tz: tzinfo) -> datetime | None:
    """HL7 TS/DTM ``YYYY[MM[DD[HH[MM[SS[.S…]]]]]][+/-ZZZZ]`` → aware datetime in UTC.

    Without an offset the time is in ``tz``. Empty → ``None``; unreadable → ``ValueError``.
    """
    value = value.strip()
    if not value:
        return None
    m = _TS.match(value)
    if m is None:
        raise ValueError(f"{value!r} is not an HL7 timestamp")
    fraction = m["f"] or ""
    zone: tzinfo = tz
    if m["z"]:
        sign = -1 if m["z"][0] == "-" else 1
        hours, minutes = int(m["z"][1:3]), int(m["z"][3:5])
        if hours > 23 or minutes > 59:
            raise ValueError(f"{value!r} has an impossible zone offset")
        zone = timezone(sign * timedelta(hours=hours, minutes=minutes))
    local = datetime(
        int(m["y"]),
        int(m["mo"] or 1),
        int(m["d"] or 1),
        int(m["h"] or 0),
        int(m["mi"] or 0),
        int(m["s"] or 0),
        int((fraction + "000000")[:6]),
    )
    return local.replace(tzinfo=zone).astimezone(UTC)


def _parse_date(value: str) -> date:
    value = value.strip()
    m = _TS.match(value)
    if m is None or not m["d"]:
        raise ValueError(f"{value!r} is not an HL7 date")
    return date(int(m["y"]), int(m["mo"]), int(m["d"]))


# --- splitting -------------------------------------------------------------------------


#: HL7 table 0211 character sets (MSH-18) → Python codecs.
_CHARSETS = {
    "": None,
    "ASCII": "ascii",
    "ISO IR6": "ascii",
    "UNICODE UTF-8": "utf-8",
    "UNICODE": "utf-8",
    "8859/1": "latin-1",
    "ISO IR100": "latin-1",
    "8859/2": "iso8859-2",
    "8859/5": "iso8859-5",
    "8859/7": "iso8859-7",
    "8859/15": "iso8859-15",
    "GB 18030-2000": "gb18030",
    "GB18030": "gb18030",
    "BIG-5": "big5",
    "KS X 1001": "euc-kr",
}


def _declared_charset(data: bytes) -> str:
    """MSH-18 of the first MSH in ``data`` (read before decoding; its fields are ASCII)."""
    start = data.find(b"MSH")
    if start < 0 or len(data) < start + 4:
        return ""
    line = re.split(rb"[\r\n]", data[start:], maxsplit=1)[0]
    fields = line.split(data[start + 3 : start + 4])
    return fields[17].split(b"^")[0].decode("ascii", "replace").strip() if len(fields) > 17 else ""


def _decode(data: bytes | str, encoding: str | None) -> str:
    if isinstance(data, str):
        return data
    declared = _declared_charset(data)
    if declared.upper() not in _CHARSETS:
        raise MalformedMessageError(
            f"MSH-18 character set {declared!r} is not supported", error_code="102"
        )
    codec = _CHARSETS[declared.upper()] or encoding or "utf-8"
    try:
        return data.decode(codec)
    except UnicodeDecodeError as exc:
        source = f"MSH-18 {declared}" if declared else f"the sender's default {codec}"
        raise MalformedMessageError(
            f"message is not valid {codec} ({source}): byte {exc.start}", error_code="102"
        ) from exc


def _normalise(data: bytes | str, encoding: str | None = None) -> list[str]:
    text = _decode(data, encoding)
    text = text.lstrip("\ufeff\x0b").rstrip("\x1c\r\n\x00 ")
    text = text.replace("\r\n", "\r").replace("\n", "\r")
    return [seg for seg in (s.lstrip("\ufeff") for s in text.split("\r")) if seg.strip()]


def split_messages(data: bytes | str, *, encoding: str | None = None) -> list[str]:
    """The messages of ``data`` (one message or an FHS/BHS batch), each as CR-separated
    ER7 without the batch envelope. Raises :class:`MalformedMessageError` when there is no
    MSH or text comes before the first MSH."""
    messages: list[list[str]] = []
    for seg in _normalise(data, encoding):
        seg_id = seg[:3]
        if seg_id in _BATCH_SEGMENTS:
            continue
        if seg_id == "MSH":
            messages.append([seg])
        elif not messages:
            raise MalformedMessageError(f"segment {seg_id!r} before the first MSH")
        else:
            messages[-1].append(seg)
    if not messages:
        raise MalformedMessageError("no MSH segment: not an HL7 v2 message")
    return ["\r".join(m) for m in messages]


def parse_messages(
    data: bytes | str,
    *,
    tz: tzinfo,
    hil_codes: Mapping[str, str] = DEFAULT_HIL_CODES,
    encoding: str | None = None,
) -> list[LabMessage]:
    """Every message of a single message or a batch; the first bad one raises. To answer
    each message of a batch on its own, use :func:`split_messages` and
    :func:`parse_message`."""
    return [
        parse_message(m, tz=tz, hil_codes=hil_codes)
        for m in split_messages(data, encoding=encoding)
    ]


# --- field access ----------------------------------------------------------------------

_Reps = list[list[list[str]]]  # repetitions → components → subcomponents


class _Encoding:
    """The message's delimiters (MSH-1, MSH-2) and python-hl7's unescaping for them."""

    def __init__(self, field: str, chars: str) -> None:
        defaults = "^~\\&"
        chars = chars + defaults[len(chars) :] if len(chars) < 4 else chars
        self.field, self.component, self.repetition, self.escape, self.sub = (
            field,
            chars[0],
            chars[1],
            chars[2],
            chars[3],
        )
        self._unescape = _unescaper(field, chars[:4]).unescape

    def unescape(self, value: str) -> str:
        return self._unescape(value) if self.escape in value else value


@lru_cache(maxsize=16)
def _unescaper(field: str, chars: str) -> hl7.Message:
    return hl7.parse(f"MSH{field}{chars}{field}")


class _Seg:
    """One segment with 1-based HL7 field numbering (MSH-1 is the field separator).

    Splitting is ``str.split`` on the message's delimiters (python-hl7 builds a container
    object for every component, about ten times slower on a 28-result message); escape
    sequences are undone by python-hl7's ``unescape``. Fields are split on first use."""

    def __init__(self, raw: str, enc: _Encoding, index: int) -> None:
        fields = raw.split(enc.field)
        self.id = fields[0]
        if self.id == "MSH":
            fields = [fields[0], enc.field, *fields[1:]]
        self.index = index
        self._fields = fields
        self._enc = enc
        self._cache: dict[int, _Reps] = {}

    def reps(self, n: int) -> _Reps:
        cached = self._cache.get(n)
        if cached is not None:
            return cached
        if n >= len(self._fields) or not self._fields[n]:
            reps: _Reps = []
        elif self.id == "MSH" and n in (1, 2):
            reps = [[[self._fields[n]]]]
        else:
            enc = self._enc
            reps = [
                [
                    [enc.unescape(sub).strip() for sub in comp.split(enc.sub)]
                    for comp in rep.split(enc.component)
                ]
                for rep in self._fields[n].split(enc.repetition)
            ]
        self._cache[n] = reps
        return reps

    def get(self, n: int, comp: int = 1, sub: int = 1, rep: int = 1) -> str:
        reps = self.reps(n)
        try:
            return reps[rep - 1][comp - 1][sub - 1]
        except IndexError:
            return ""

    def text(self, n: int) -> str:
        """The whole field as text: components joined with ``^``, repetitions with ``~``."""
        return "~".join(
            "^".join("&".join(c) for c in rep).rstrip("^") for rep in self.reps(n)
        ).strip("~")

    def coded(self, n: int, rep: int = 1) -> Coded | None:
        reps = self.reps(n)
        if len(reps) < rep:
            return None
        return _coded(reps[rep - 1])

    def coded_all(self, n: int) -> list[Coded]:
        return [c for c in (_coded(r) for r in self.reps(n)) if c.identifier or c.text]


def _coded(rep: list[list[str]]) -> Coded:
    def comp(i: int) -> str:
        return rep[i - 1][0] if len(rep) >= i else ""

    return Coded(
        code=comp(1),
        text=comp(2),
        system=comp(3),
        alt_code=comp(4),
        alt_text=comp(5),
        alt_system=comp(6),
    )


def _hd(seg: _Seg, n: int) -> HierarchicDesignator:
    return HierarchicDesignator(
        namespace_id=seg.get(n, 1), universal_id=seg.get(n, 2), universal_id_type=seg.get(n, 3)
    )


# --- the message -----------------------------------------------------------------------


class _Reader:
    def __init__(self, tz: tzinfo, hil_codes: Mapping[str, str], control_id: str) -> None:
        self.tz = tz
        self.hil_codes = {k.upper(): v for k, v in hil_codes.items()}
        self.control_id = control_id
        self.warnings: list[str] = []

    def fail(self, reason: str, error_code: str = "101") -> MalformedMessageError:
        return MalformedMessageError(
            reason, control_id=self.control_id or None, error_code=error_code
        )

    def ts(self, seg: _Seg, n: int, comp: int = 1) -> datetime | None:
        raw = seg.get(n, comp)
        try:
            return parse_hl7_timestamp(raw, self.tz)
        except ValueError:
            self.warnings.append(
                f"{seg.id}-{n} {raw!r} (segment {seg.index}) is not a valid HL7 timestamp; kept"
                " as sent, read as empty"
            )
            return None

    def header(self, msh: _Seg) -> MessageHeader:
        return MessageHeader(
            sending_application=_hd(msh, 3),
            sending_facility=_hd(msh, 4),
            receiving_application=_hd(msh, 5),
            receiving_facility=_hd(msh, 6),
            message_time=self.ts(msh, 7),
            message_type=f"{msh.get(9, 1)}^{msh.get(9, 2)}",
            message_code=msh.get(9, 1),
            trigger_event=msh.get(9, 2),
            control_id=msh.get(10),
            processing_id=msh.get(11),
            version=msh.get(12),
            accept_ack_type=msh.get(15),
            application_ack_type=msh.get(16),
            character_set=msh.get(18),
        )

    def patient(self, pid: _Seg) -> Patient:
        identifiers = [
            PatientIdentifier(
                value=rep[0][0],
                assigning_authority=next((s for s in (rep[3] if len(rep) > 3 else []) if s), ""),
                type_code=rep[4][0] if len(rep) > 4 else "",
            )
            for rep in pid.reps(3)
            if rep and rep[0] and rep[0][0]
        ]
        names = []
        for rep in pid.reps(5):

            def comp(i: int, rep: list[list[str]] = rep) -> str:
                return rep[i - 1][0] if len(rep) >= i else ""

            name = PersonName(
                family=comp(1),
                given=comp(2),
                middle=comp(3),
                suffix=comp(4),
                prefix=comp(5),
                name_type=comp(7),
                representation=comp(8),
            )
            if not name.is_empty:
                names.append(name)
        raw_birth = pid.get(7)
        birth: date | None = None
        if raw_birth:
            try:
                birth = _parse_date(raw_birth[:8])
            except ValueError:
                self.warnings.append(f"PID-7 birth date {raw_birth!r} is not a valid date")
        if not identifiers:
            raise self.fail("PID-3 (patient identifier list) is empty")
        if not names:
            raise self.fail("PID-5 (patient name) is empty")
        return Patient(
            identifiers=identifiers,
            names=names,
            sex=pid.get(8),
            birth_date=birth,
            birth_date_raw=raw_birth,
        )

    def observation(self, obx: _Seg) -> Observation:
        code = obx.coded(3) or Coded()
        if not code.identifier:
            raise self.fail(f"OBX-3 (observation identifier) is empty in segment {obx.index}")
        status = obx.get(11)
        if not status:
            raise self.fail(
                f"OBX-11 (result status) is empty in segment {obx.index} ({code.identifier})"
            )
        value_type = obx.get(2).upper()
        value_reps = obx.reps(5)
        value = obx.text(5)
        value_coded: Coded | None = None
        numeric: float | None = None
        comparator = ""
        if value_type in {"CE", "CWE", "CNE", "CF"} and value_reps:
            value_coded = _coded(value_reps[0])
        elif value_type in {"SN", "FN"} and value_reps:
            comps = [c[0] for c in value_reps[0]]
            comps += [""] * (4 - len(comps))
            if not comps[2] and _NUMBER.match(comps[1]):
                numeric = float(comps[1])
                comparator = comps[0] if comps[0] in {"<", ">", "<=", ">=", "="} else ""
                comparator = "" if comparator == "=" else comparator
        if numeric is None and value_type in {"NM", "ST", "SN", "FN", ""}:
            numeric, comparator = _read_number(value)
        low, high = _read_range(obx.get(7) if obx.reps(7) else "")
        flags = [rep[0][0] for rep in obx.reps(8) if rep and rep[0] and rep[0][0]]
        lab: PerformingLab | None = None
        if obx.get(23, 1) or obx.get(23, 10):
            lab = PerformingLab(name=obx.get(23, 1), identifier=obx.get(23, 10))
        elif obx.get(15, 1):
            lab = PerformingLab(name=obx.get(15, 2), identifier=obx.get(15, 1))
        method = obx.coded(17)
        return Observation(
            set_id=obx.get(1),
            value_type=value_type,
            code=code,
            sub_id=obx.get(4),
            value=value,
            value_coded=value_coded,
            numeric=numeric,
            comparator=comparator,
            unit=obx.get(6, 1),
            unit_text=obx.get(6, 2),
            unit_system=obx.get(6, 3),
            reference_range=obx.text(7),
            reference_low=low,
            reference_high=high,
            flags=flags,
            status=status.upper(),
            observed_at=self.ts(obx, 14),
            analysed_at=self.ts(obx, 19),
            method=method if method and (method.identifier or method.text) else None,
            performing_lab=lab,
        )

    def specimen(self, spm: _Seg) -> Specimen:
        specimen_type = spm.coded(4)
        return Specimen(
            set_id=spm.get(1),
            specimen_id=spm.get(2, 1, 1) or spm.get(2, 2, 1),
            type=specimen_type if specimen_type and specimen_type.identifier else None,
            collected_at=self.ts(spm, 17),
            received_at=self.ts(spm, 18),
            condition=spm.coded_all(24),
        )

    def hil_letter(self, obs: Observation) -> str | None:
        for _, code in obs.code.pairs():
            letter = self.hil_codes.get(code.upper())
            if letter:
                return letter
        return None


def _read_number(value: str) -> tuple[float | None, str]:
    text = value.strip()
    comparator = ""
    m = _COMPARATOR.match(text)
    if m:
        comparator, text = m.group(1), m.group(2).strip()
    if _NUMBER.match(text):
        return float(text), ("" if comparator == "=" else comparator)
    return None, ""


def _read_range(text: str) -> tuple[float | None, float | None]:
    text = text.strip()
    if not text:
        return None, None
    m = _COMPARATOR.match(text)
    if m and _NUMBER.match(m.group(2).strip()):
        bound = float(m.group(2))
        return (None, bound) if m.group(1).startswith("<") else (bound, None)
    for sep in _RANGE_SEPARATORS:
        head, found, tail = text.partition(sep)
        if found and head.strip() and _NUMBER.match(head.strip()) and _NUMBER.match(tail.strip()):
            return float(head), float(tail)
    return None, None


def _with_hil(hil: HilIndices, letter: str, value: float | None) -> HilIndices:
    field = {"H": "hemolysis", "I": "icterus", "L": "lipemia"}[letter]
    return hil.model_copy(update={field: value})


def parse_message(
    data: bytes | str,
    *,
    tz: tzinfo,
    hil_codes: Mapping[str, str] = DEFAULT_HIL_CODES,
    encoding: str | None = None,
) -> LabMessage:
    """One ER7 message → :class:`LabMessage`.

    Bytes are decoded in MSH-18's character set (``UNICODE UTF-8``, ``GB 18030-2000``,
    ``8859/1``…), else in ``encoding`` (a sender's configured default, e.g. ``gb18030`` for
    an LIS that sends GB 18030 without saying so), else UTF-8.

    Raises :class:`UnsupportedMessageTypeError` (AR) for a type other than ORU^R01,
    OUL^R22, OUL^R24 and :class:`MalformedMessageError` (AE) with the reason otherwise.
    """
    segments = _normalise(data, encoding)
    if any(s[:3] in _BATCH_SEGMENTS for s in segments):
        raise MalformedMessageError("a batch (FHS/BHS) where one message was expected")
    if not segments or not segments[0].startswith("MSH"):
        raise MalformedMessageError("message does not start with an MSH segment")
    if len(segments[0]) < 8:
        raise MalformedMessageError("MSH segment is too short to carry its encoding characters")
    for i, seg in enumerate(segments, start=1):
        if not _SEGMENT_ID.match(seg[:3]) or (len(seg) > 3 and seg[3] != segments[0][3]):
            raise MalformedMessageError(f"segment {i} ({seg[:12]!r}) is not an HL7 segment")
    first = segments[0]
    enc = _Encoding(first[3], first[4:].split(first[3], 1)[0])
    if len({enc.field, enc.component, enc.repetition, enc.escape, enc.sub}) != 5:
        raise MalformedMessageError(f"MSH-1/MSH-2 delimiters {first[3:8]!r} are not distinct")
    segs = [_Seg(seg, enc, i) for i, seg in enumerate(segments, start=1)]
    msh = segs[0]
    control_id = msh.get(10)
    if not msh.get(9, 1):
        raise MalformedMessageError(
            "MSH-9 (message type) is empty", control_id=control_id or None, error_code="101"
        )
    kind = (msh.get(9, 1).upper(), msh.get(9, 2).upper())
    if kind not in ACCEPTED_MESSAGE_TYPES:
        raise UnsupportedMessageTypeError("^".join(kind), control_id=control_id or None)
    reader = _Reader(tz, hil_codes, control_id)
    if not control_id:
        raise reader.fail("MSH-10 (message control ID) is empty")
    if not (msh.get(3) or msh.get(3, 2) or msh.get(4) or msh.get(4, 2)):
        raise reader.fail("MSH-3/MSH-4 (sending application and facility) are empty")
    if not msh.get(11):
        raise reader.fail("MSH-11 (processing ID) is empty")
    if not msh.get(12):
        raise reader.fail("MSH-12 (version ID) is empty")
    header = reader.header(msh)
    return _walk(
        segs[1:],
        header,
        reader,
        specimen_first=kind == ("OUL", "R22"),
        orc_after_obr=kind[0] == "OUL",
        results_after_spm=kind == ("OUL", "R24"),
    )


def _walk(
    segs: Sequence[_Seg],
    header: MessageHeader,
    reader: _Reader,
    *,
    specimen_first: bool,
    orc_after_obr: bool,
    results_after_spm: bool,
) -> LabMessage:
    """The segment groups: ORU^R01 and OUL^R24 are order-first (OBR, OBX…, SPM, OBX…);
    OUL^R22 is specimen-first (SPM, OBX…, OBR, ORC, OBX…). OBX after an SPM describe the
    specimen, except in OUL^R24, where the specimen group comes before the order's results.
    OBX outside any group are kept as unattached."""
    patient: Patient | None = None
    orders: list[Order] = []
    unattached: list[Observation] = []
    message_notes: list[str] = []
    order: Order | None = None
    order_orc: set[int] = set()  # ids of orders that already took an ORC
    pending_orc: _Seg | None = None
    specimen: Specimen | None = None
    context: Literal["none", "order", "specimen"] = "none"
    last_obs: Observation | None = None

    for seg in segs:
        if seg.id == "PID":
            if patient is not None:
                raise reader.fail("more than one PID (patient) in one message", "100")
            patient = reader.patient(seg)
            context, last_obs = "none", None
        elif seg.id == "ORC":
            if (
                orc_after_obr
                and order is not None
                and id(order) not in order_orc
                and context == "order"
                and not order.observations
            ):
                _apply_orc(order, seg)
                order_orc.add(id(order))
            else:
                pending_orc = seg
        elif seg.id == "OBR":
            order = _order(seg, reader)
            orders.append(order)
            if pending_orc is not None:
                _apply_orc(order, pending_orc)
                order_orc.add(id(order))
                pending_orc = None
            if specimen_first and specimen is not None:
                order.specimens.append(specimen)
            context, last_obs = "order", None
        elif seg.id == "TQ1":
            if order is not None and not order.priority:
                priority = seg.get(9)
                if priority:
                    order.priority = priority
        elif seg.id == "SPM":
            specimen = reader.specimen(seg)
            if not specimen_first and order is not None:
                order.specimens.append(specimen)
            context, last_obs = "specimen", None
        elif seg.id == "OBX":
            obs = reader.observation(seg)
            letter = reader.hil_letter(obs)
            if letter and context == "specimen" and specimen is not None and not results_after_spm:
                specimen.hil = _with_hil(specimen.hil, letter, obs.numeric)
            elif letter and order is not None:
                order.hil = _with_hil(order.hil, letter, obs.numeric)
            elif context == "specimen" and specimen is not None and not results_after_spm:
                specimen.observations.append(obs)
            elif order is not None and (results_after_spm or context == "order"):
                order.observations.append(obs)
            else:
                unattached.append(obs)
            last_obs = obs
        elif seg.id == "NTE":
            text = seg.text(3)
            if last_obs is not None:
                last_obs.notes.append(text)
            elif order is not None and context == "order":
                order.notes.append(text)
            else:
                message_notes.append(text)
    if patient is None:
        raise reader.fail("no PID segment (patient)", "100")
    if not orders:
        raise reader.fail("no OBR segment (order)", "100")
    for o in orders:
        if o.received_at is None:
            o.received_at = next((s.received_at for s in o.specimens if s.received_at), None)
        if o.collected_at is None:
            o.collected_at = next((s.collected_at for s in o.specimens if s.collected_at), None)
        for s in o.specimens:
            o.hil = s.hil.merged(o.hil)
    return LabMessage(
        header=header,
        patient=patient,
        orders=orders,
        unattached_observations=unattached,
        notes=message_notes,
        warnings=reader.warnings,
    )


def _order(obr: _Seg, reader: _Reader) -> Order:
    service = obr.coded(4) or Coded()
    priority = obr.get(5) or obr.get(27, 6)
    return Order(
        set_id=obr.get(1),
        placer_number=obr.get(2, 1),
        placer_namespace=obr.get(2, 2),
        filler_number=obr.get(3, 1),
        filler_namespace=obr.get(3, 2),
        service=service,
        priority=priority,
        collected_at=reader.ts(obr, 7),
        received_at=reader.ts(obr, 14),
        reported_at=reader.ts(obr, 22),
        result_status=obr.get(25),
    )


def _apply_orc(order: Order, orc: _Seg) -> None:
    if not order.placer_number:
        order.placer_number, order.placer_namespace = orc.get(2, 1), orc.get(2, 2)
    if not order.filler_number:
        order.filler_number, order.filler_namespace = orc.get(3, 1), orc.get(3, 2)
    if not order.priority:
        order.priority = orc.get(7, 6)
