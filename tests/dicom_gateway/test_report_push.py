"""Push of a signed report to the clinic's own AE: a pynetdicom Storage SCP plays the clinic's
PACS and receives an Encapsulated PDF holding the signed PDF byte for byte, filed in the
exam's study, with the patient's full (Chinese) name; nothing is sent while the endpoint is
disabled; a failure status is retried with the same instance; a warning status is delivered."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from sqlalchemy import select

import dicom_gateway.report_push  # noqa: F401  (registers the "dicom" sender)
from dicom_gateway.report_push import report_instance_uids
from dicom_gateway.statuses import StoreStatus
from rdc_core.db import session_scope, utcnow
from tests.worklist.conftest import Reading, reading  # noqa: F401  (fixture)
from tests.worklist.test_delivery import (
    STUDY,
    add_clinic_endpoint,
    amend,
    finalize,
    set_patient_name,
)
from worklist.delivery.models import DeliveryAttempt, DeliveryState, ReportDelivery
from worklist.delivery.service import set_endpoint_enabled
from worklist.delivery.tasks import deliver_due_reports
from worklist.models import Exam
from worklist.signing.service import get_signed_artifact


class ClinicPacs:
    """A Storage SCP on 127.0.0.1 (a free port) that keeps what it receives."""

    def __init__(self) -> None:
        self.received: list[Dataset] = []
        self.calling: list[str] = []
        self.status = int(StoreStatus.SUCCESS)
        self._lock = threading.Lock()
        ae = AE(ae_title="CLINIC_PACS")
        ae.add_supported_context(
            EncapsulatedPDFStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        )
        self.server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        self.port = int(self.server.server_address[1])

    def _store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received.append(ds)
            self.calling.append(event.assoc.requestor.ae_title)
        return self.status

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def pacs() -> Iterator[ClinicPacs]:
    server = ClinicPacs()
    try:
        yield server
    finally:
        server.stop()


def test_encapsulated_pdf_reaches_the_clinic_pacs_and_is_retried(
    reading: Reading,  # noqa: F811
    pacs: ClinicPacs,
) -> None:
    endpoint_id = add_clinic_endpoint(ae_title="CLINIC_PACS", port=pacs.port, enabled=False)
    set_patient_name(reading, "Wang^Fang=王^芳")
    report_id = finalize(reading)
    t0 = utcnow()
    assert deliver_due_reports(now=t0).attempted == 0  # disabled: the push waits
    assert pacs.received == []
    with session_scope() as session:
        set_endpoint_enabled(
            session, principal=None, endpoint=endpoint_id, enabled=True, now=utcnow()
        )

    pacs.status = 0xA700  # out of resources: the clinic's PACS is full
    run = deliver_due_reports(now=t0)
    assert run.failed and not run.delivered
    with session_scope() as session:
        delivery = session.execute(
            select(ReportDelivery).where(ReportDelivery.report_id == report_id)
        ).scalar_one()
        assert delivery.state is DeliveryState.PENDING
        assert delivery.next_attempt_at is not None and delivery.next_attempt_at > t0
        assert "0xA700" in (delivery.last_error or "")
    assert deliver_due_reports(now=t0).attempted == 0  # not due yet

    pacs.status = 0xB000  # warning (coercion of data elements): stored, so delivered
    later = t0 + timedelta(hours=1)
    run = deliver_due_reports(now=later)
    assert run.delivered == [delivery.id]
    assert deliver_due_reports(now=later + timedelta(hours=1)).attempted == 0

    assert len(pacs.received) == 2 and pacs.calling == ["RDC", "RDC"]
    series_uid, sop_uid = report_instance_uids(report_id)
    assert [ds.SOPInstanceUID for ds in pacs.received] == [sop_uid, sop_uid]  # same instance
    ds = pacs.received[-1]
    with session_scope() as session:
        signed = get_signed_artifact(session, report_id=report_id, kind="pdf")
        exam = session.get(Exam, reading.exams[STUDY])
        assert exam is not None
        study_uid, exam_delivered = exam.study_instance_uid, exam.delivered_at
        attempts = session.execute(
            select(DeliveryAttempt)
            .where(DeliveryAttempt.delivery_id == delivery.id)
            .order_by(DeliveryAttempt.number)
        ).scalars()
        outcomes = [(a.outcome, a.detail.get("status")) for a in attempts]
    assert ds.SOPClassUID == EncapsulatedPDFStorage
    assert ds.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert ds.StudyInstanceUID == study_uid and ds.SeriesInstanceUID == series_uid
    assert ds.PatientID == "P1" and ds.IssuerOfPatientID == "C1"
    assert ds.Modality == "DOC" and ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert "v1" in ds.DocumentTitle and ds.ConceptNameCodeSequence[0].CodeValue == "18748-4"
    document = bytes(ds.EncapsulatedDocument)[: int(ds.EncapsulatedDocumentLength)]
    assert document == signed and signed.startswith(b"%PDF")
    assert outcomes == [("failure", 0xA700), ("success", 0xB000)]
    assert exam_delivered == later
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "Wang^Fang=王^芳"
    assert ds.PatientName.family_name == "Wang" and ds.PatientName.ideographic == "王^芳"
    with session_scope() as session:
        kept = session.get(ReportDelivery, delivery.id)
        assert kept is not None and kept.state is DeliveryState.DELIVERED
        assert kept.detail["status"] == 0xB000 and "0xB000" in kept.detail["warning"]

    # a name that is only ideographic survives too; 0x0001 is a warning as well
    set_patient_name(reading, "=张三")
    second = amend(reading, report_id, "右肺结节。Nodule, right lung.")
    pacs.status = 0x0001
    run = deliver_due_reports(now=later + timedelta(hours=2))
    assert len(run.delivered) == 1 and not run.failed
    ds = pacs.received[-1]
    assert ds.SOPInstanceUID == report_instance_uids(second)[1]
    assert str(ds.PatientName) == "=张三" and ds.PatientName.ideographic == "张三"
