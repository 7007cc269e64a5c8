"""The association PDU codec against pynetdicom's encoder and decoder, byte for byte."""

from __future__ import annotations

import struct

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import build_context
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    Verification,
)

from dicom_gateway.acse_pdus import (
    AcceptedContext,
    PDUError,
    RoleSelection,
    decode_associate_rq,
    encode_associate_ac,
    encode_associate_rj,
)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"


def _request_pdu(*, max_length: int = 16_384, extras: bool = True) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = "CLINIC_A_CT"
    primitive.called_ae_title = "RDC"
    contexts = [
        build_context(CTImageStorage, [JPEG2000Lossless, ExplicitVRLittleEndian]),
        build_context(MRImageStorage),
        build_context(Verification, [ImplicitVRLittleEndian]),
    ]
    for number, context in enumerate(contexts):
        context.context_id = 2 * number + 1
    primitive.presentation_context_definition_list = contexts
    user_information: list[object] = []
    length = MaximumLengthNotification()
    length.maximum_length_received = max_length
    class_uid = ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = "1.2.276.0.7230010.3.0.3.6.7"
    user_information += [length, class_uid]
    if extras:  # items an acceptor of storage skips
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = "OFFIS_DCMTK_367"
        window = AsynchronousOperationsWindowNegotiation()
        window.maximum_number_operations_invoked = 5
        window.maximum_number_operations_performed = 5
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = CTImageStorage
        role.scu_role, role.scp_role = True, False
        identity = UserIdentityNegotiation()
        identity.user_identity_type = 2
        identity.primary_field = b"tech"
        identity.secondary_field = b"secret"
        user_information += [version, window, role, identity]
    primitive.user_information = user_information
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def test_a_request_decodes_to_what_pynetdicom_encoded() -> None:
    request = decode_associate_rq(_request_pdu()[6:])

    assert request.calling_ae_title == "CLINIC_A_CT"
    assert request.called_ae.rstrip() == b"RDC"
    assert request.application_context == APPLICATION_CONTEXT
    assert request.max_pdu == 16_384
    assert [(c.context_id, c.abstract_syntax) for c in request.contexts] == [
        (1, CTImageStorage),
        (3, MRImageStorage),
        (5, Verification),
    ]
    assert request.contexts[0].transfer_syntaxes == (JPEG2000Lossless, ExplicitVRLittleEndian)
    assert len(request.contexts[1].transfer_syntaxes) == 4  # pynetdicom's defaults
    assert request.contexts[2].transfer_syntaxes == (ImplicitVRLittleEndian,)


def test_an_answer_decodes_in_pynetdicom_to_what_was_encoded() -> None:
    request = decode_associate_rq(_request_pdu()[6:])
    answer = encode_associate_ac(
        request,
        [
            AcceptedContext(1, 0x00, JPEG2000Lossless),
            AcceptedContext(3, 0x04, ImplicitVRLittleEndian),
            AcceptedContext(5, 0x03, ImplicitVRLittleEndian),
        ],
        max_pdu=262_144,
        implementation_class_uid="1.2.826.0.1.3680043.10.1450.1",
        implementation_version="RDC_0_1",
    )

    pdu = A_ASSOCIATE_AC()
    pdu.decode(answer)
    assert len(answer) == pdu.pdu_length + 6
    primitive = pdu.to_primitive()
    assert primitive.result == 0x00
    assert primitive.application_context_name == APPLICATION_CONTEXT
    assert primitive.called_ae_title == "RDC"
    assert primitive.calling_ae_title == "CLINIC_A_CT"
    results = [
        (cx.context_id, cx.result, cx.transfer_syntax[0])
        for cx in primitive.presentation_context_definition_results_list
    ]
    assert results == [
        (1, 0x00, JPEG2000Lossless),
        (3, 0x04, ImplicitVRLittleEndian),
        (5, 0x03, ImplicitVRLittleEndian),
    ]
    info = {type(item).__name__: item for item in primitive.user_information}
    assert info["MaximumLengthNotification"].maximum_length_received == 262_144
    assert (
        info["ImplementationClassUIDNotification"].implementation_class_uid
        == "1.2.826.0.1.3680043.10.1450.1"
    )
    assert info["ImplementationVersionNameNotification"].implementation_version_name == "RDC_0_1"


def test_role_selection_is_read_and_answered_as_pynetdicom_expects() -> None:
    request = decode_associate_rq(_request_pdu()[6:])
    assert request.roles == (RoleSelection(CTImageStorage, True, False),)
    answer = encode_associate_ac(
        request,
        [AcceptedContext(1, 0x00, ExplicitVRLittleEndian)],
        max_pdu=16_384,
        implementation_class_uid="1.2.826.0.1.3680043.10.1450.1",
        implementation_version="RDC_0_1",
        roles=(RoleSelection(CTImageStorage, False, True),),  # a C-GET SCU's Storage SCP role
    )
    pdu = A_ASSOCIATE_AC()
    pdu.decode(answer)
    assert len(answer) == pdu.pdu_length + 6
    roles = [
        item
        for item in pdu.to_primitive().user_information
        if isinstance(item, SCP_SCU_RoleSelectionNegotiation)
    ]
    assert [(r.sop_class_uid, r.scu_role, r.scp_role) for r in roles] == [
        (CTImageStorage, False, True)
    ]


def test_a_malformed_role_selection_is_a_named_error() -> None:
    pdu = _request_pdu()
    start = pdu.index(b"\x54\x00")  # the role selection sub-item
    length = struct.unpack(">H", pdu[start + 2 : start + 4])[0]
    broken = pdu[: start + 4] + struct.pack(">H", length + 7) + pdu[start + 6 :]
    with pytest.raises(PDUError, match="role selection"):
        decode_associate_rq(broken[6:])


def test_an_answer_to_a_minimal_request_round_trips() -> None:
    request = decode_associate_rq(_request_pdu(max_length=0, extras=False)[6:])
    assert request.max_pdu == 0  # no limit
    answer = encode_associate_ac(
        request, [], max_pdu=1, implementation_class_uid="1.2.3", implementation_version="V"
    )
    pdu = A_ASSOCIATE_AC()
    pdu.decode(answer)
    assert pdu.to_primitive().presentation_context_definition_results_list == []


@pytest.mark.parametrize(("result", "source", "reason"), [(1, 1, 3), (2, 3, 2), (1, 1, 2)])
def test_a_rejection_decodes_in_pynetdicom(result: int, source: int, reason: int) -> None:
    pdu = A_ASSOCIATE_RJ()
    pdu.decode(encode_associate_rj(result, source, reason))
    assert (pdu.result, pdu.source, pdu.reason_diagnostic) == (result, source, reason)


def _corrupt(pdu: bytes, offset: int, value: bytes) -> bytes:
    return pdu[:offset] + value + pdu[offset + len(value) :]


def test_malformed_requests_are_named_errors() -> None:
    body = _request_pdu()[6:]
    first_item = 68  # after the fixed part
    with pytest.raises(PDUError, match="shorter than its fixed part"):
        decode_associate_rq(body[:40])
    with pytest.raises(PDUError, match="runs past its end"):
        decode_associate_rq(_corrupt(body, first_item + 2, struct.pack(">H", 60_000)))
    with pytest.raises(PDUError, match="truncated item header"):
        decode_associate_rq(body + b"\x50\x00")
    no_abstract = body + bytes([0x20, 0, 0, 8, 7, 0, 0, 0, 0x40, 0, 0, 0])
    with pytest.raises(PDUError, match="0 abstract syntaxes"):
        decode_associate_rq(no_abstract)
    not_ascii = body + bytes([0x20, 0, 0, 9, 9, 0, 0, 0, 0x30, 0, 0, 1, 0xFF])
    with pytest.raises(PDUError, match="not ASCII"):
        decode_associate_rq(not_ascii)
