"""A constructed QC data set with exact stage times, and the figures computed by hand.

Period under test: March 2026 (Asia/Shanghai). T0 = 2026-03-10 02:00 UTC. Exams E1..E7 in
March, E8 in February (the previous period). Rows are inserted in one session so the times
are exact; the service under test only reads them.

Hand-computed expectations (see EXPECTED):
- RRC-02 (emergency imaging, exam start → first final ≤ 120 min): E1 exactly 120 min (met),
  E2 100 min (its amendment at 200 min does not count), E3 has no start time (measured from
  arrival: 110 min, met, flagged), E4 121 min (not met) → 3 / 4 = 75 %.
- SLA-01: E1 ok, E2 late (v1 at +100 > due +90), E3 ok, E4 ok, E5 ok, E6 overdue and not
  reported, E7 (re-scan, unreported) not counted → 4 / 6.
- RCV-04: A1 read back after exactly 10 min (met), A2 after 11 min, A3 never; A4 withdrawn
  (not counted) → 1 / 3.
- RWS-03 (all signed imaging report versions): E1, E2 v1, E2 v2 compliant; E3 placeholder;
  E4 unsigned; E5 left/right mismatch → 3 / 6.
- IQ-01: grades 甲 乙 废 甲 甲 → 3 / 5 = 60 %; IQ-02: 1 / 5 = 20 %.
- TAT-07 (arrival → first final): 115, 95, 110, 116, 295 min → P50 115, P90 223.4
  (percentile_cont: 116 + 0.6 × 179); 5 of the 7 exams that arrived in March have both times.
- ALL-02: 7 member-clinic exams arrived in March, 5 have a final report.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from sqlalchemy.orm import Session

from worklist.audit import record_event
from worklist.critical_values.models import AlertState, CriticalAlert
from worklist.directory import add_organization, add_user
from worklist.models import (
    Discipline,
    Exam,
    ExamKeyKind,
    ExamState,
    OrgKind,
    Patient,
    Priority,
    QualityGrade,
    ReaderLevel,
    Report,
    ReportStatus,
    Role,
    WorkItem,
    WorkItemState,
)
from worklist.recognition.models import DeclineReason, RecognitionDecision, RecognitionDecline
from worklist.signing.models import SignedArtifact, SigningStage

T0 = datetime(2026, 3, 10, 2, 0, tzinfo=UTC)
MARCH = (date(2026, 3, 1), date(2026, 3, 31))
APRIL = datetime(2026, 4, 10, 2, 0, tzinfo=UTC)
# The ECG and lab exams of April (local days).
APRIL_DAYS = (date(2026, 4, 1), date(2026, 4, 30))
EXPECTED_APRIL = {
    # code: {discipline filter: (numerator, denominator, rate)}
    "ECG-01": (1, 2, 50.0),
    "ECG-02": (1, 1, 100.0),
    "CL-14": (1, 2, 50.0),
    "CL-15": (0, 2, 0.0),
    "SLA-01": (2, 4, 50.0),
}
# TAT-07 (arrival -> first final) by discipline: (p50, p90) in minutes.
EXPECTED_APRIL_TAT = {"ecg": (19.5, 26.3), "lab": (220.0, 348.0)}
PASSWORD = "pw-qc-dataset-1"


def _m(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


EXPECTED = {
    "RRC-02": (3, 4, 75.0),
    "SLA-01": (4, 6, 66.67),
    "RCV-04": (1, 3, 33.33),
    "RWS-03": (3, 6, 50.0),
    "IQ-01": (3, 5, 60.0),
    "IQ-02": (1, 5, 20.0),
    "ALL-02": (5, 7, 71.43),
}


def build(session: Session, *, with_orgs: bool = True) -> dict[str, str]:
    """Insert the data set; returns exam IDs by name (E1..E8)."""
    if with_orgs:
        add_organization(session, code="LEAD", name="Lead", kind=OrgKind.LEAD)
        add_organization(session, code="C1", name="Clinic 1", kind=OrgKind.CLINIC)
        add_organization(session, code="C2", name="Clinic 2", kind=OrgKind.CLINIC)
        for name, role, org, level in (
            ("attending", Role.READER, "LEAD", ReaderLevel.ATTENDING),
            ("resident", Role.READER, "LEAD", ReaderLevel.RESIDENT),
            ("qc", Role.QC, "LEAD", None),
            ("admin", Role.ADMIN, "LEAD", None),
            ("tech", Role.TECHNICIAN, "C1", None),
        ):
            add_user(
                session, username=name, password=PASSWORD, role=role, org_code=org, level=level
            )
        session.flush()
    else:  # the alliance of tests/helpers.py: add a QC user
        add_user(session, username="qc", password=PASSWORD, role=Role.QC, org_code="LEAD")
        session.flush()
    from sqlalchemy import select

    from worklist.models import Organization, User

    orgs = {o.code: o for o in session.execute(select(Organization)).scalars()}
    users = {u.username: u for u in session.execute(select(User)).scalars()}
    c1, c2 = orgs.get("C1") or orgs["CLINIC_A"], orgs.get("C2") or orgs["CLINIC_B"]
    reader = users.get("attending") or users["senior"]
    patient = Patient(id="qc-p1", org_id=c1.id, issuer="", patient_id="QC1", name="QC^One")
    patient2 = Patient(id="qc-p2", org_id=c2.id, issuer="", patient_id="QC2", name="QC^Two")
    session.add_all([patient, patient2])
    session.flush()
    ids: dict[str, str] = {}

    def exam(
        name: str,
        *,
        org: object,
        modality: str,
        priority: Priority,
        performed: float | None,
        received: float,
        final: float | None,
        due: float,
        grade: QualityGrade | None = None,
        findings: str = "两肺纹理清晰。Lungs clear.",
        impression: str = "未见异常。No abnormality.",
        signed: bool = True,
        state: ExamState = ExamState.FINAL,
        base: datetime = T0,
        discipline: Discipline = Discipline.IMAGING,
    ) -> Exam:
        def at(minutes: float | None) -> datetime | None:
            return None if minutes is None else base + timedelta(minutes=minutes)

        exam_id = f"qc-{name}"
        ids[name] = exam_id
        org_id = org.id  # type: ignore[attr-defined]
        e = Exam(
            id=exam_id,
            study_instance_uid=f"1.2.826.0.1.99.{len(ids)}",
            natural_key=f"1.2.826.0.1.99.{len(ids)}",
            key_kind=ExamKeyKind.STUDY_UID,
            org_id=org_id,
            patient_ref=patient.id if org is c1 else patient2.id,
            accession_number=f"ACC-{name}",
            discipline=discipline,
            modality=modality,
            modalities=modality,
            priority=priority,
            state=state,
            performed_at=at(performed),
            first_received_at=at(received),
            last_received_at=at(received),
            ready_at=at(received + 1),
            claimed_at=at(received + 5) if final is not None else None,
            final_at=at(final),
            created_at=at(received),
        )
        session.add(e)
        session.flush()
        session.add(
            WorkItem(
                id=f"wi-{name}",
                exam_id=exam_id,
                org_id=org_id,
                state=WorkItemState.DONE if final is not None else WorkItemState.OPEN,
                pool="imaging",
                priority=priority,
                priority_rank=priority.rank,
                due_at=at(due),
                discipline=discipline,
                modality=modality,
            )
        )
        if final is not None:
            report = Report(
                id=f"r-{name}-1",
                exam_id=exam_id,
                version=1,
                status=ReportStatus.FINAL,
                findings=findings,
                impression=impression,
                quality_grade=grade,
                author_id=reader.id,
                author_level=ReaderLevel.ATTENDING,
                created_at=at(received + 6),
                updated_at=at(final),
                submitted_at=at(final),
                final_at=at(final),
            )
            session.add(report)
            session.flush()
            if signed:
                _sign(session, report.id, reader.id, at(final))  # type: ignore[arg-type]
        return e

    exam(
        "E1",
        org=c1,
        modality="CT",
        priority=Priority.EMERGENCY,
        performed=0,
        received=5,
        final=120,
        due=130,
        grade=QualityGrade.A,
    )
    e2 = exam(
        "E2",
        org=c1,
        modality="CT",
        priority=Priority.EMERGENCY,
        performed=0,
        received=5,
        final=100,
        due=90,
        grade=QualityGrade.B,
    )
    # E2 amended after the 2-hour deadline: the exam's final_at moves, the indicator does not.
    e2.final_at = _m(200)
    v2 = Report(
        id="r-E2-2",
        exam_id=e2.id,
        version=2,
        previous_id="r-E2-1",
        status=ReportStatus.FINAL,
        findings="两肺纹理清晰。Lungs clear.",
        impression="未见异常（补充）。Addendum.",
        quality_grade=QualityGrade.B,
        author_id=reader.id,
        amendment_kind="appended",
        amendment_reason="addendum",
        created_at=_m(190),
        updated_at=_m(200),
        submitted_at=_m(200),
        final_at=_m(200),
    )
    session.add(v2)
    session.flush()
    _sign(session, v2.id, reader.id, _m(200))
    exam(
        "E3",
        org=c1,
        modality="DX",
        priority=Priority.EMERGENCY,
        performed=None,
        received=30,
        final=140,
        due=200,
        grade=QualityGrade.REJECT,
        findings="右下肺见片状影，大小约____cm。",
    )
    exam(
        "E4",
        org=c2,
        modality="CT",
        priority=Priority.EMERGENCY,
        performed=0,
        received=5,
        final=121,
        due=200,
        grade=QualityGrade.A,
        signed=False,
    )
    exam(
        "E5",
        org=c1,
        modality="US",
        priority=Priority.ROUTINE,
        performed=None,
        received=5,
        final=300,
        due=24 * 60,
        grade=QualityGrade.A,
        findings="右肾见一强回声，大小约5mm。",
        impression="左肾结石。Left renal calculus.",
    )
    exam(
        "E6",
        org=c1,
        modality="CT",
        priority=Priority.ROUTINE,
        performed=0,
        received=10,
        final=None,
        due=60,
        state=ExamState.READY,
    )
    e7 = exam(
        "E7",
        org=c2,
        modality="DX",
        priority=Priority.ROUTINE,
        performed=0,
        received=20,
        final=None,
        due=30,
        state=ExamState.RESCAN_REQUESTED,
    )
    e7.rescan_requested_at = _m(50)
    e7.rescan_reason = "motion artefact 运动伪影"
    # February: an emergency report after 150 minutes (the previous period's RRC-02: 0 %).
    exam(
        "E8",
        org=c1,
        modality="CT",
        priority=Priority.EMERGENCY,
        performed=0,
        received=5,
        final=150,
        due=40,
        grade=QualityGrade.A,
        base=datetime(2026, 2, 20, 2, 0, tzinfo=UTC),
    )
    session.flush()

    # April: ECG and lab exams (outside every period of the imaging figures above).
    for name, discipline, org, priority, performed, received, final, due in (
        ("G1", Discipline.ECG, c1, Priority.EMERGENCY, 0, 1, 12, 15),
        ("G2", Discipline.ECG, c2, Priority.EMERGENCY, 0, 2, 30, 17),
        ("L1", Discipline.LAB, c1, Priority.ROUTINE, 0, 10, 70, 240),
        ("L2", Discipline.LAB, c2, Priority.URGENT, None, 20, 400, 240),
    ):
        exam(
            name,
            org=org,
            modality="ECG" if discipline is Discipline.ECG else "LAB",
            priority=priority,
            performed=performed,
            received=received,
            final=final,
            due=due,
            findings="窦性心律。Sinus rhythm." if discipline is Discipline.ECG else "K 6.8",
            impression="心电图异常。Abnormal ECG." if discipline is Discipline.ECG else "高钾",
            base=APRIL,
            discipline=discipline,
        )
    session.flush()

    def alert(
        name: str,
        exam_name: str,
        raised: float,
        ack: float | None,
        state: AlertState,
        base: datetime = T0,
    ) -> None:
        e = session.get(Exam, ids[exam_name])
        assert e is not None

        def _m(minutes: float) -> datetime:
            return base + timedelta(minutes=minutes)

        session.add(
            CriticalAlert(
                id=f"a-{name}",
                report_id=f"r-{exam_name}-1",
                exam_id=e.id,
                org_id=e.org_id,
                patient_ref=e.patient_ref,
                finding="critical",
                raised_by=reader.id,
                raised_at=_m(raised),
                deadline_at=_m(raised + 10),
                notified_at=_m(raised),
                state=state,
                acknowledged_at=None if ack is None else _m(ack),
                receiver_name=None if ack is None else "Dr. C",
                read_back=None if ack is None else "read back",
            )
        )

    alert("A1", "E1", 120, 130, AlertState.ACKNOWLEDGED)
    alert("A2", "E4", 121, 132, AlertState.ACKNOWLEDGED)
    alert("A3", "E3", 140, None, AlertState.OPEN)
    alert("A4", "E2", 100, None, AlertState.WITHDRAWN)
    alert("G1", "G1", 12, 20, AlertState.ACKNOWLEDGED, APRIL)  # 8 min
    alert("L1", "L1", 70, 85, AlertState.ACKNOWLEDGED, APRIL)  # 15 min: notified, late
    alert("L2", "L2", 400, None, AlertState.OPEN, APRIL)
    granted = RecognitionDecision(
        id="d-1",
        report_id="r-E1-1",
        exam_id=ids["E1"],
        patient_ref=patient.id,
        org_id=c1.id,
        granted=True,
        item_code="CT-CHEST",
        catalog_version=1,
        mark="HR",
        exam_date=date(2026, 3, 10),
        valid_until=date(2026, 6, 8),
        signer_id=reader.id,
        decided_at=_m(120),
    )
    refused = RecognitionDecision(
        id="d-2",
        report_id="r-E5-1",
        exam_id=ids["E5"],
        patient_ref=patient.id,
        org_id=c1.id,
        granted=False,
        exam_date=date(2026, 3, 10),
        signer_id=reader.id,
        decided_at=_m(300),
    )
    session.add_all([granted, refused])
    session.flush()
    tech = users.get("tech") or users["tech_b"]
    session.add(
        RecognitionDecline(
            id="x-1",
            decision_id="d-1",
            org_id=c2.id,
            user_id=tech.id,
            reason=DeclineReason.EMERGENCY,
            patient_informed=True,
            declined_at=_m(400),
        )
    )
    session.flush()
    record_event(
        session,
        actor="user:tech",
        action="lookup",
        object_type="recognized_result",
        object_id="*",
        org_id=c2.id,
        detail={},
    )
    return ids


def _sign(session: Session, report_id: str, signer_id: str, at: datetime) -> None:
    session.add(
        SignedArtifact(
            report_id=report_id,
            stage=SigningStage.FINAL,
            document_key=f"reports/{report_id}/final.json",
            document_sha256="0" * 64,
            pdf_key=f"reports/{report_id}/final.pdf",
            pdf_sha256="0" * 64,
            signer_id=signer_id,
            signer_username="attending",
            signer_name="",
            certificate_serial="1",
            certificate_issuer="CA",
            signed_at=at,
        )
    )
