"""The association PDUs an acceptor reads and writes: A-ASSOCIATE-RQ in, -AC and -RJ out.

Encoded and decoded here (PS3.8 9.3.2-9.3.4) rather than with pynetdicom's PDU classes,
which the gateway used before: those build and validate a pydicom ``UID`` for every abstract
and transfer syntax several times over. A request from dcmtk's ``storescu`` proposes about
120 presentation contexts and cost some 25 ms of CPU to decode and answer; a modality that
opens one association per image (CR, DX, ultrasound, ECG carts) paid it for every image.
The formats are fixed-layout items; tests/dicom_gateway/test_acse_pdus.py checks both
directions against pynetdicom's encoder and decoder.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "AcceptedContext",
    "AssociateRequest",
    "PDUError",
    "ProposedContext",
    "RoleSelection",
    "decode_associate_rq",
    "encode_associate_ac",
    "encode_associate_rj",
]

_ASSOCIATE_AC, _ASSOCIATE_RJ = 0x02, 0x03
# Item types (PS3.8 9.3.2.1-9.3.2.3, D.3.3)
_APPLICATION_CONTEXT = 0x10
_PRESENTATION_CONTEXT_RQ, _PRESENTATION_CONTEXT_AC = 0x20, 0x21
_ABSTRACT_SYNTAX, _TRANSFER_SYNTAX = 0x30, 0x40
_USER_INFORMATION = 0x50
_MAXIMUM_LENGTH, _IMPLEMENTATION_CLASS_UID, _IMPLEMENTATION_VERSION = 0x51, 0x52, 0x55
_ROLE_SELECTION = 0x54

_FIXED = struct.Struct(">HH16s16s32x")  # protocol version, reserved, called AE, calling AE
_ITEM = struct.Struct(">BxH")
_PDU = struct.Struct(">BxI")


class PDUError(ValueError):
    """An association PDU that does not follow PS3.8 (the acceptor aborts)."""


@dataclass(frozen=True, slots=True)
class ProposedContext:
    """One presentation context of a request: its ID, abstract syntax, transfer syntaxes."""

    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AcceptedContext:
    """The acceptor's answer to one proposed context (result 0 accepts ``transfer_syntax``)."""

    context_id: int
    result: int
    transfer_syntax: str


@dataclass(frozen=True, slots=True)
class RoleSelection:
    """An SCP/SCU Role Selection sub-item (PS3.7 D.3.3.4): the roles the requestor proposes
    for itself on one SOP class (a C-GET SCU asks for the SCP role of storage classes)."""

    sop_class_uid: str
    scu_role: bool
    scp_role: bool


@dataclass(frozen=True, slots=True)
class AssociateRequest:
    """What an acceptor needs from an A-ASSOCIATE-RQ."""

    called_ae: bytes  # the 16 bytes as sent; the answer echoes them
    calling_ae: bytes
    application_context: str
    contexts: tuple[ProposedContext, ...]
    max_pdu: int  # the requestor's maximum PDU length; 0: not given or unlimited
    roles: tuple[RoleSelection, ...] = ()

    @property
    def calling_ae_title(self) -> str:
        """The calling AE title without its padding."""
        return self.calling_ae.decode("ascii", "replace").strip(" \x00")


def _uid(value: bytes | memoryview) -> str:
    try:
        # UIDs in PDUs are unpadded, but some implementations pad them as in data sets.
        return bytes(value).decode("ascii").rstrip("\x00 ")
    except UnicodeDecodeError as exc:
        raise PDUError("a UID in the association request is not ASCII") from exc


def _items(data: memoryview, where: str) -> list[tuple[int, memoryview]]:
    items: list[tuple[int, memoryview]] = []
    offset, end = 0, len(data)
    while offset < end:
        if offset + _ITEM.size > end:
            raise PDUError(f"truncated item header in {where}")
        item_type, length = _ITEM.unpack_from(data, offset)
        offset += _ITEM.size
        if offset + length > end:
            raise PDUError(f"item 0x{item_type:02X} in {where} runs past its end")
        items.append((item_type, data[offset : offset + length]))
        offset += length
    return items


def _presentation_context(value: memoryview) -> ProposedContext:
    if len(value) < 4:
        raise PDUError("presentation context item shorter than 4 bytes")
    abstract: list[str] = []
    syntaxes: list[str] = []
    for sub_type, sub_value in _items(value[4:], "a presentation context"):
        if sub_type == _ABSTRACT_SYNTAX:
            abstract.append(_uid(sub_value))
        elif sub_type == _TRANSFER_SYNTAX:
            syntaxes.append(_uid(sub_value))
    if len(abstract) != 1:
        raise PDUError(f"presentation context {value[0]} has {len(abstract)} abstract syntaxes")
    return ProposedContext(value[0], abstract[0], tuple(syntaxes))


def decode_associate_rq(body: bytes | memoryview) -> AssociateRequest:
    """Decode the body (everything after the 6-byte PDU header) of an A-ASSOCIATE-RQ.

    Role selection sub-items are read (C-GET needs them). Items the acceptor does not answer
    (extended negotiation, asynchronous operations, user identity) are skipped, which
    PS3.7 D.3.3 allows: the defaults then apply. Raises PDUError for a malformed request.
    """
    data = memoryview(body)
    if len(data) < _FIXED.size:
        raise PDUError(f"A-ASSOCIATE-RQ of {len(data)} bytes is shorter than its fixed part")
    _version, _reserved, called, calling = _FIXED.unpack_from(data)
    application_context = ""
    contexts: list[ProposedContext] = []
    max_pdu = 0
    roles: list[RoleSelection] = []
    for item_type, value in _items(data[_FIXED.size :], "the A-ASSOCIATE-RQ"):
        if item_type == _APPLICATION_CONTEXT:
            application_context = _uid(value)
        elif item_type == _PRESENTATION_CONTEXT_RQ:
            contexts.append(_presentation_context(value))
        elif item_type == _USER_INFORMATION:
            for sub_type, sub_value in _items(value, "the user information"):
                if sub_type == _MAXIMUM_LENGTH:
                    if len(sub_value) != 4:
                        raise PDUError("maximum length sub-item is not 4 bytes")
                    max_pdu = int.from_bytes(sub_value, "big")
                elif sub_type == _ROLE_SELECTION:
                    roles.append(_role_selection(sub_value))
    return AssociateRequest(
        called, calling, application_context, tuple(contexts), max_pdu, tuple(roles)
    )


def _role_selection(value: memoryview) -> RoleSelection:
    if len(value) < 2:
        raise PDUError("role selection sub-item shorter than 2 bytes")
    length = int.from_bytes(value[:2], "big")
    if len(value) != 2 + length + 2:
        raise PDUError("role selection sub-item length is inconsistent")
    uid = _uid(value[2 : 2 + length])
    return RoleSelection(uid, bool(value[2 + length]), bool(value[3 + length]))


def _item(item_type: int, value: bytes) -> bytes:
    return _ITEM.pack(item_type, len(value)) + value


def encode_associate_ac(
    request: AssociateRequest,
    contexts: list[AcceptedContext],
    *,
    max_pdu: int,
    implementation_class_uid: str,
    implementation_version: str,
    roles: tuple[RoleSelection, ...] = (),
) -> bytes:
    """The A-ASSOCIATE-AC PDU answering ``request`` with one result per proposed context
    and the role selections accepted (``roles``)."""
    items = [_item(_APPLICATION_CONTEXT, request.application_context.encode("ascii"))]
    for context in contexts:
        syntax = _item(_TRANSFER_SYNTAX, context.transfer_syntax.encode("ascii"))
        head = bytes((context.context_id, 0, context.result, 0))
        items.append(_item(_PRESENTATION_CONTEXT_AC, head + syntax))
    user_information = b"".join(
        (
            _item(_MAXIMUM_LENGTH, max_pdu.to_bytes(4, "big")),
            _item(_IMPLEMENTATION_CLASS_UID, implementation_class_uid.encode("ascii")),
            _item(_IMPLEMENTATION_VERSION, implementation_version.encode("ascii")),
            *(_role_item(role) for role in roles),
        )
    )
    items.append(_item(_USER_INFORMATION, user_information))
    body = _FIXED.pack(1, 0, request.called_ae, request.calling_ae) + b"".join(items)
    return _PDU.pack(_ASSOCIATE_AC, len(body)) + body


def _role_item(role: RoleSelection) -> bytes:
    uid = role.sop_class_uid.encode("ascii")
    value = len(uid).to_bytes(2, "big") + uid + bytes((role.scu_role, role.scp_role))
    return _item(_ROLE_SELECTION, value)


def encode_associate_rj(result: int, source: int, reason: int) -> bytes:
    """The A-ASSOCIATE-RJ PDU (PS3.8 9.3.4): result 1 permanent / 2 transient, its source
    and reason."""
    return _PDU.pack(_ASSOCIATE_RJ, 4) + bytes((0, result, source, reason))
