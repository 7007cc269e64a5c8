"""A demo alliance so a newcomer sees a working worklist: one lead hospital, two clinics,
their users, and small synthetic studies pushed through the real ingest service.

Everything is derived from fixed names, so running the demo twice changes nothing.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from dicom_gateway.ingest import ingest_dicom_file
from lab_results.intake import LabIntake
from lab_results.processing import process_message
from rdc_core.db import session_scope, utcnow
from rdc_core.settings import Settings
from rdc_core.storage import ObjectStore
from worklist.claims import claim_item
from worklist.critical_values.contacts import add_duty, set_contact
from worklist.critical_values.schemas import ContactIn
from worklist.directory import (
    add_organization,
    add_user,
    get_organization,
    org_ref,
    principal_for_user,
)
from worklist.models import OrgKind, QualityGrade, ReaderLevel, Role, User, WorkItem, WorkItemState
from worklist.readiness import mark_stable_exams_ready
from worklist.recognition.catalog import load_accreditations, load_catalog
from worklist.reports import save_draft, submit_report
from worklist.schemas import ReportIn

__all__ = ["DEMO_PASSWORD", "DEMO_USERS", "seed_demo"]

DEMO_PASSWORD = "rdc-demo"

LEAD = ("LEAD", "联盟牵头医院 Alliance Lead Hospital")
CLINICS = [
    (
        "CLINIC_A",
        "城东社区卫生服务中心 East Community Health Centre",
        ["CLINIC_A_CT", "CLINIC_A_DR"],
    ),
    ("CLINIC_B", "河口镇卫生院 Hekou Township Hospital", ["CLINIC_B_MR", "CLINIC_B_US"]),
]
# The clinics' analysers / LIS, by their HL7 sending facility (MSH-4).
HL7_FACILITIES = {"CLINIC_A": "CLINIC_A_LIS", "CLINIC_B": "CLINIC_B_LIS"}
# The lab physician under whom auto-verified demo orders are signed (自动审核).
DEMO_LAB_SIGNER = "senior"


def _oru(control_id: str, clinic: str, patient: str, name: str, filler: str, obx: str) -> bytes:
    facility = HL7_FACILITIES[clinic]
    lines = [
        f"MSH|^~\\&|LIS|{facility}|RDC|LEAD|20261204080000+0800||ORU^R01^ORU_R01|{control_id}"
        "|P|2.5.1",
        # The clinic's own patient ID (issuer: the clinic), as its DICOM studies carry it.
        f"PID|1||{patient}^^^{clinic}^MR||{name}||19600101|M",
        f"OBR|1|PL-{filler}|{filler}|BMP^基础代谢组合 Basic metabolic panel^L|R||"
        "20261204070000+0800|||||||20261204072000+0800||||||||20261204075000+0800|||F",
        *[
            f"OBX|{n}|NM|{code}^^LN||{value}|mmol/L||{flag}|||F"
            for n, (code, value, flag) in enumerate(
                (tuple(item.split(":")) for item in obx.split()), start=1
            )
        ],
    ]
    return ("\r".join(lines) + "\r").encode()


# Lab results sent through the real HL7 intake: one all-normal order of clinic A (released
# automatically), and two of clinic B on the lab worklist: one held for the lab physician
# (sodium above its reference range), one critical potassium (clinic B alerted at once).
_LAB_MESSAGES = [
    _oru(
        "DEMO-LAB-1",
        "CLINIC_A",
        "A0002",
        "Li^Qiang~李^强^^^^^^I",
        "LAB-0001",
        "2823-3:4.2:N 2951-2:141:N 2075-0:103:N 14749-6:5.1:N",
    ),
    _oru("DEMO-LAB-2", "CLINIC_B", "B0002", "Chen^Jun", "LAB-0002", "2951-2:151:H 2823-3:4.0:N"),
    _oru("DEMO-LAB-3", "CLINIC_B", "B0001", "Zhao^Min", "LAB-0003", "2823-3:6.9:HH 2951-2:139:N"),
]


@dataclass(frozen=True)
class DemoUser:
    username: str
    role: Role
    org: str
    name: str  # the person's name, shown instead of the login
    level: ReaderLevel | None = None


DEMO_USERS = [
    DemoUser("admin", Role.ADMIN, "LEAD", "孙伟 Sun Wei"),
    DemoUser("reader", Role.READER, "LEAD", "刘洋 Liu Yang", ReaderLevel.RESIDENT),
    DemoUser("senior", Role.SENIOR_READER, "LEAD", "陈静 Chen Jing", ReaderLevel.CHIEF),
    DemoUser("qc", Role.QC, "LEAD", "周敏 Zhou Min"),
    DemoUser("tech_a", Role.TECHNICIAN, "CLINIC_A", "王磊 Wang Lei"),
    DemoUser("doctor_a", Role.CLINICIAN, "CLINIC_A", "李娜 Li Na"),
    DemoUser("tech_b", Role.TECHNICIAN, "CLINIC_B", "张强 Zhang Qiang"),
]

# (clinic AE, patient id, name, sex, birth, modality, body part, description, priority, images)
_STUDIES = [
    (
        "CLINIC_A_CT",
        "A0001",
        "Wang^Fang=王^芳",
        "F",
        "19580312",
        "CT",
        "CHEST",
        "胸部CT平扫 Chest CT",
        "STAT",
        3,
    ),
    (
        "CLINIC_A_DR",
        "A0002",
        "Li^Qiang=李^强",
        "M",
        "19760705",
        "DX",
        "CHEST",
        "胸部正位片 Chest X-ray",
        "ROUTINE",
        1,
    ),
    (
        "CLINIC_B_MR",
        "B0001",
        "Zhao^Min=赵^敏",
        "F",
        "19650921",
        "MR",
        "HEAD",
        "头颅MR Brain MRI",
        "HIGH",
        2,
    ),
    (
        "CLINIC_B_US",
        "B0002",
        "Chen^Jun=陈^军",
        "M",
        "19890130",
        "US",
        "ABDOMEN",
        "腹部超声 Abdominal US",
        "ROUTINE",
        1,
    ),
]

# ECGs from the clinics' carts, synthetic 12-lead records uploaded through the ECG intake:
# the patient and the synthesis parameters below. The long QTc pre-screens as
# a suspected critical ECG and tops the worklist with its reason.
_ECGS: list[tuple[str, str, str, str, str, float, float | None, float, int]] = [
    # (clinic, patient id, name, sex, birth, heart rate, QT ms (None: normal), PR ms, seed)
    ("CLINIC_A", "A0003", "Zhou^Li=周^丽", "F", "1971-04-18", 68, None, 160, 101),
    ("CLINIC_B", "B0003", "Sun^Wei=孙^伟", "M", "1949-11-02", 64, 560, 160, 102),
    ("CLINIC_A", "A0004", "Wu^Gang=吴^刚", "M", "1958-08-09", 58, None, 240, 103),
]

# Earlier exams of demo patients, already reported, so the reading page has priors to show:
# (index into _STUDIES of the patient's current exam, days before today, findings, impression)
_PRIORS = [
    (
        0,
        180,
        "右肺上叶见一直径约4 mm实性小结节，边界清。\nA 4 mm solid nodule in the right upper lobe.",
        "右肺上叶小结节，建议6-12个月复查。\nSmall RUL nodule; follow-up CT in 6-12 months.",
    ),
]

# The alliance's recognised items (a small part of a real 互认 catalogue) and the clinics'
# accreditations: clinic A passed imaging QC this year, clinic B has not, so the demo shows
# a result with the HR mark and one without.
_CATALOG_CSV = """\
code,discipline,name_zh,name_en,scope_mark,scope_note,valid_days,min_grade,modality,body_part
CT-CHEST,imaging,胸部CT平扫,Chest CT,HR,,365,乙,CT,CHEST
DR-CHEST,imaging,胸部X线摄影,Chest radiograph,HR,,180,乙,DX,CHEST
MR-HEAD,imaging,头颅MR平扫,Brain MRI,皖HR,,365,乙,MR,HEAD
US-ABD,imaging,腹部超声,Abdominal ultrasound,★,仅限同一医联体内互认,30,乙,US,ABDOMEN
ECG-12,ecg,常规十二导联心电图,Resting 12-lead ECG,HR,,30,,,
"""


_CRITICAL_CONTACTS = {
    "CLINIC_A": ContactIn(
        primary_name="张医生 Dr Zhang",
        primary_phone="0551-0000001",
        primary_username="doctor_a",
        secondary_name="城东中心值班室 Duty office",
        secondary_phone="0551-0000002",
    ),
    "CLINIC_B": ContactIn(
        primary_name="河口镇卫生院值班室 Duty office", primary_phone="0551-0000003"
    ),
}


def _accreditations_csv(year: int) -> str:
    return (
        "org,discipline,item_code,valid_from,valid_to,note\n"
        f"CLINIC_A,imaging,,{year - 1}-01-01,{year + 1}-12-31,省影像质控中心室间质评 EQA\n"
        f"CLINIC_A,ecg,,{year}-01-01,{year}-12-31,心电质控 EQA\n"
    )


_SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
}


def _phantom(size: int, slice_index: int) -> np.ndarray:
    # A disc with an off-centre "lesion", enough to try window/level on.
    y, x = np.mgrid[0:size, 0:size]
    centre = size / 2
    image = np.where((x - centre) ** 2 + (y - centre) ** 2 < (size * 0.4) ** 2, 1040, 0)
    lesion = (x - centre * 1.3) ** 2 + (y - centre * 0.8) ** 2 < (size * 0.06 + slice_index) ** 2
    image = np.where(lesion, 1300, image)
    return image.astype(np.uint16)


def _make_instance(study: tuple, index: int, folder: Path, days_ago: int = 0) -> Path:
    ae, pid, name, sex, birth, modality, body, desc, priority, _ = study
    root = ["rdc-demo", ae, pid] + ([f"prior-{days_ago}"] if days_ago else [])
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = _SOP_CLASS[modality]
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[*root, "instance", str(index)])
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[*root, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[*root, "series"])
    ds.PatientName = name
    ds.PatientID = pid
    ds.PatientSex = sex
    ds.PatientBirthDate = birth
    ds.AccessionNumber = f"DEMO{pid}"
    ds.StudyDate = (utcnow() - timedelta(days=days_ago)).strftime("%Y%m%d")
    ds.StudyTime = "083000"
    ds.Modality = modality
    ds.BodyPartExamined = body
    ds.StudyDescription = desc
    ds.RequestedProcedurePriority = "ROUTINE" if days_ago else priority
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    pixels = _phantom(128, index)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 1040
    ds.WindowWidth = 400
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def seed_demo(*, settings: Settings, store: ObjectStore) -> int:
    """Create the demo alliance and push its studies; returns instances stored now."""
    if settings.env == "production":
        raise RuntimeError("the demo alliance is for development only")
    with session_scope() as session:
        add_organization(session, code=LEAD[0], name=LEAD[1], kind=OrgKind.LEAD)
        for code, name, aes in CLINICS:
            add_organization(
                session,
                code=code,
                name=name,
                kind=OrgKind.CLINIC,
                ae_titles=aes,
                hl7_facilities=[HL7_FACILITIES[code]],
            )
        for user in DEMO_USERS:
            add_user(
                session,
                username=user.username,
                password=DEMO_PASSWORD,
                role=user.role,
                org_code=user.org,
                level=user.level,
                display_name=user.name,
            )
    with session_scope() as session:
        now = utcnow()
        load_catalog(session, text=_CATALOG_CSV, fmt="csv", source="demo", principal=None, now=now)
        load_accreditations(
            session, text=_accreditations_csv(now.year), fmt="csv", principal=None, now=now
        )
        # Who hears about critical values: each clinic's contacts, the centre's duty reader.
        for code, contact in _CRITICAL_CONTACTS.items():
            set_contact(session, principal=None, org_code=code, data=contact, now=now)
        add_duty(session, principal=None, username="senior", now=now)
    # Demo studies are presented as already complete, so the worklist fills at the first
    # stable-study scan instead of after the stable age.
    received_at = utcnow() - timedelta(seconds=settings.stable_age_seconds + 1)
    stored = 0
    prior_exams: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="rdc-demo-") as tmp:
        batches = [(study, 0) for study in _STUDIES]
        batches += [(_STUDIES[i], days) for i, days, *_ in _PRIORS]
        for study, days_ago in batches:
            for index in range(study[-1]):
                path = _make_instance(study, index, Path(tmp), days_ago)
                with session_scope() as session:
                    org_code = next(c for c, _, aes in CLINICS if study[0] in aes)
                    result = ingest_dicom_file(
                        session,
                        store=store,
                        source=path,
                        calling_ae=study[0],
                        zone=settings.zone,
                        organization=org_ref(get_organization(session, code=org_code)),
                        received_at=received_at,
                    )
                stored += result.outcome.value == "stored"
            if days_ago:
                prior = next(p for p in _PRIORS if p[1] == days_ago)
                prior_exams.append((result.exam_id, prior[2], prior[3]))
    _report_priors(prior_exams)
    _upload_ecgs(store)
    _send_lab_results(settings=settings, store=store)
    return stored


def _upload_ecgs(store: ObjectStore) -> int:
    """The demo ECGs, through the ECG upload's intake (measured, pre-screened, queued);
    returns how many were new."""
    from ecg_service import PatientIdentity, synthesize_ecg
    from ecg_service.service import EcgForm, ingest_ecg, prepare_ecg
    from ecg_service.writers import wfdb_files

    new = 0
    for clinic, patient_id, name, sex, birth, rate, qt_ms, pr_ms, seed in _ECGS:
        record, _ = synthesize_ecg(heart_rate_bpm=rate, qt_ms=qt_ms, pr_ms=pr_ms, seed=seed)
        # The cart wrote the patient's sex in the header; the rest comes with the upload.
        record = replace(record, patient=PatientIdentity(sex=sex))
        prepared = prepare_ecg(wfdb_files(record, name=f"demo-{patient_id}"))
        with session_scope() as session:
            result = ingest_ecg(
                session,
                store=store,
                prepared=prepared,
                org=org_ref(get_organization(session, code=clinic)),
                form=EcgForm(patient_id=patient_id, patient_name=name, sex=sex, birth_date=birth),
                source="demo",
            )
        new += not result.duplicate
    return new


def _send_lab_results(*, settings: Settings, store: ObjectStore) -> None:
    """The demo's lab messages through the real HL7 intake, processed at once (a re-run
    gets the stored ACKs and processes nothing twice)."""
    accepted: list[str] = []
    intake = LabIntake(store=store, zone=settings.zone, on_accepted=accepted.append)
    for raw in _LAB_MESSAGES:
        answer = intake.receive(raw, channel="demo")
        if not answer.positive:
            raise RuntimeError(f"demo lab message refused: {answer.reason}")
    lab_settings = settings.model_copy(
        update={"lab_autorelease_signer": settings.lab_autorelease_signer or DEMO_LAB_SIGNER}
    )
    for message_id in accepted:
        with session_scope() as session:
            process_message(
                session, message_id=message_id, store=store, settings=lab_settings, now=utcnow()
            )


def _report_priors(priors: list[tuple[str, str, str]]) -> None:
    # The priors go through the real reading workflow: ready, claimed, written, signed.
    with session_scope() as session:
        mark_stable_exams_ready(session, now=utcnow(), stable_age_seconds=0)
    with session_scope() as session:
        senior = principal_for_user(
            session.execute(select(User).where(User.username == "senior")).scalar_one()
        )
    for exam_id, findings, impression in priors:
        with session_scope() as session:
            item = session.execute(select(WorkItem).where(WorkItem.exam_id == exam_id)).scalar_one()
            if item.state is not WorkItemState.OPEN:
                continue  # reported by an earlier run of the demo
            now = utcnow()
            claim_item(session, principal=senior, item_id=item.id, now=now, lease_seconds=60)
            save_draft(
                session,
                principal=senior,
                exam_id=exam_id,
                data=ReportIn(
                    template_code="CT_CHEST",
                    findings=findings,
                    impression=impression,
                    quality_grade=QualityGrade.A,
                ),
                now=now,
            )
            submit_report(session, principal=senior, exam_id=exam_id, now=now)
