"""Mutual recognition: catalogue and accreditation loading, the HR rules at signing (table
tested), recorded reasons, the lookup's validity window and current versions, declines."""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import pytest
import sqlalchemy
import sqlalchemy.pool
from sqlalchemy import func, select

from dicom_gateway.records import InstanceHeader, record_instance
from rdc_core.db import dispose_engines, session_scope, stable_id, utcnow
from rdc_core.errors import InvalidInputError, NotFoundError, PermissionDeniedError
from rdc_core.migrate import upgrade_database
from rdc_core.settings import reset_settings
from tests.worklist.conftest import STUDIES, Reading
from worklist.access import Principal
from worklist.directory import add_organization, add_user, get_organization, principal_for_user
from worklist.models import (
    Discipline,
    Exam,
    OrgKind,
    QualityGrade,
    ReaderLevel,
    Report,
    ReportStatus,
    Role,
)
from worklist.recognition.catalog import load_accreditations, load_catalog
from worklist.recognition.models import (
    Accreditation,
    CatalogItem,
    CatalogVersion,
    RecognitionDecision,
)
from worklist.recognition.service import (
    decline_result,
    evaluate_report,
    exam_local_date,
    list_declines,
    recognition_for_report,
    recognized_results,
)
from worklist.reports import save_draft, submit_report
from worklist.schemas import ReportIn

CT_CHEST, CT_HEAD, DX_CHEST, US_ABDOMEN = "1.2.9.1", "1.2.9.2", "1.2.9.3", "1.2.9.4"

CATALOG_CSV = """\
code,discipline,name_zh,name_en,scope_mark,scope_note,valid_days,min_grade,modality,body_part,test_codes
CT-CHEST,imaging,胸部CT平扫,Chest CT,HR,,180,乙,CT,CHEST,
CT-HEAD,imaging,头颅CT平扫,Head CT,皖HR,,90,乙,CT,HEAD,
DX-CHEST,imaging,胸部正位片,Chest X-ray,全国HR,,30,丙,DX,CHEST,
ECG-12,ecg,常规十二导联心电图,12-lead ECG,★,限本医联体内门诊,30,,,,
LAB-GLU,lab,空腹血糖,Fasting glucose,HR,,7,,,,2345-7;GLU
"""


def _load_catalog(text: str = CATALOG_CSV, fmt: str = "csv") -> Any:
    with session_scope() as session:
        return load_catalog(
            session, text=text, fmt=fmt, source="test", principal=None, now=utcnow()
        )


def _accredit(rows: list[tuple[str, str, str, date, date]]) -> None:
    lines = ["org,item_code,discipline,valid_from,valid_to,note"]
    lines += [f"{o},{i},{d},{f.isoformat()},{t.isoformat()},EQA 2026" for o, i, d, f, t in rows]
    with session_scope() as session:
        load_accreditations(session, text="\n".join(lines), fmt="csv", principal=None, now=utcnow())


def _exam_date(exam_id: str) -> date:
    with session_scope() as session:
        exam = session.get(Exam, exam_id)
        assert exam is not None
        return exam_local_date(exam)


def _final_report(
    exam_id: str, signer: Principal, grade: QualityGrade | None, version: int = 1
) -> dict[str, Any]:
    """A final report version written straight into the table, evaluated as the finalization
    hook does (the HR rules alone, without signing)."""
    with session_scope() as session:
        exam = session.get(Exam, exam_id)
        assert exam is not None
        report = Report(
            id=stable_id("report", exam_id, str(version)),
            exam_id=exam_id,
            version=version,
            previous_id=stable_id("report", exam_id, str(version - 1)) if version > 1 else None,
            status=ReportStatus.FINAL,
            findings="两肺纹理清晰",
            impression="未见异常",
            quality_grade=grade,
            author_id=signer.user_id,
            author_level=signer.level,
            structured={},
            final_at=utcnow(),
        )
        session.add(report)
        session.flush()
        result = evaluate_report(session, report=report, exam=exam, signer=signer, now=utcnow())
        assert result is not None
        return result


@pytest.fixture
def hr(reading: Reading) -> Reading:
    """The reading alliance (a fresh database) with the catalogue loaded."""
    _load_catalog()
    return reading


@dataclass
class Shared:
    """One database for the table tests: each case gets its own clinic and exam, so the
    cases cannot see each other's accreditations."""

    people: dict[str, Principal]
    counter: itertools.count  # type: ignore[type-arg]

    def clinic_exam(self, study: str, discipline: str = "imaging") -> tuple[str, str]:
        """A new clinic and one exam like ``study`` (modality, body part) from it."""
        n = next(self.counter)
        code = f"K{n}"
        modality, body_part, priority, pid = STUDIES[study]
        with session_scope() as session:
            org = add_organization(session, code=code, name=f"Clinic {n}", kind=OrgKind.CLINIC)
            _, exam_id = record_instance(
                session,
                header=InstanceHeader(
                    sop_instance_uid=f"2.25.{n}.1.1",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    study_instance_uid=f"2.25.{n}",
                    series_instance_uid=f"2.25.{n}.1",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    patient_id=pid,
                    patient_name=f"Patient^{pid}",
                    modality="ECG" if discipline == "ecg" else modality,
                    body_part=body_part,
                    priority=priority,
                ),
                org_id=org.id,
                org_code=code,
                storage_key=f"k/{n}",
                size_bytes=1,
                sha256="0" * 64,
                calling_ae="AE",
                now=utcnow() - timedelta(minutes=1),
            )
            session.get_one(Exam, exam_id).discipline = Discipline(discipline)
        return code, exam_id


def _postgres_admin_url() -> str:
    return os.environ.get("RDC_TEST_POSTGRES_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")


@pytest.fixture(scope="module")
def shared_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], Shared]]:
    """A migrated database with the lead hospital, its readers and the catalogue, shared
    by the table tests of this module (SQLite, or PostgreSQL on a PostgreSQL run)."""
    env = {"RDC_DATA_DIR": str(tmp_path_factory.mktemp("recognition") / "data")}
    admin = None
    name = f"rdc_test_{uuid.uuid4().hex[:12]}"
    if os.environ.get("RDC_TEST_DATABASE", "sqlite") == "postgresql":
        admin = sqlalchemy.create_engine(
            _postgres_admin_url(),
            isolation_level="AUTOCOMMIT",
            poolclass=sqlalchemy.pool.NullPool,
        )
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        url = sqlalchemy.engine.make_url(_postgres_admin_url()).set(database=name)
        env["RDC_DATABASE_URL"] = url.render_as_string(hide_password=False)
    with _environment(env):
        upgrade_database()
        people = {}
        with session_scope() as session:
            add_organization(session, code="LEAD", name="Lead", kind=OrgKind.LEAD)
            for username, role, level, quals in (
                ("resident", Role.READER, ReaderLevel.RESIDENT, None),
                ("attending", Role.READER, ReaderLevel.ATTENDING, None),
                ("chief", Role.SENIOR_READER, ReaderLevel.CHIEF, None),
                ("ecg_only", Role.READER, ReaderLevel.ATTENDING, [{"discipline": "ecg"}]),
                ("qc", Role.QC, None, None),
                ("admin", Role.ADMIN, None, None),
            ):
                user = add_user(
                    session,
                    username=username,
                    password="pw-123456",
                    role=role,
                    org_code="LEAD",
                    level=level,
                    qualifications=quals,
                )
                people[username] = principal_for_user(user)
        _load_catalog()
    yield env, Shared(people=people, counter=itertools.count(1))
    if admin is not None:
        dispose_engines()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("RDC_") and k != "RDC_TEST_DATABASE"]:
            mp.delenv(key)
        for key, value in env.items():
            mp.setenv(key, value)
        reset_settings()
        dispose_engines()
        try:
            yield
        finally:
            dispose_engines()
            reset_settings()


@pytest.fixture
def shared(shared_db: tuple[dict[str, str], Shared]) -> Iterator[Shared]:
    """The shared database, made the configured one for this test."""
    env, data = shared_db
    with _environment(env):
        yield data


D = timedelta(days=1)


# (case, study, accreditations as (org, item, discipline, from offset, to offset) relative
#  to the exam date, grade, signer, granted, reason codes that must appear)
HR_RULES = [
    (
        "granted, accredited for the item",
        CT_CHEST,
        [("C1", "CT-CHEST", "", -10, 10)],
        QualityGrade.A,
        "attending",
        True,
        ["in_catalogue", "accredited", "grade_meets_minimum", "reader_qualified"],
    ),
    (
        "granted, accredited for the whole discipline",
        CT_CHEST,
        [("C1", "", "imaging", -10, 10)],
        QualityGrade.B,
        "attending",
        True,
        ["in_catalogue", "accredited", "grade_meets_minimum", "reader_qualified"],
    ),
    (
        "granted, accreditation ends on the exam date (inclusive)",
        CT_HEAD,
        [("C1", "CT-HEAD", "", -30, 0)],
        QualityGrade.A,
        "chief",
        True,
        ["accredited"],
    ),
    (
        "not in the catalogue",
        US_ABDOMEN,
        [("C1", "", "imaging", -10, 10)],
        QualityGrade.A,
        "attending",
        False,
        ["not_in_catalogue"],
    ),
    (
        "accreditation expired before the exam",
        CT_CHEST,
        [("C1", "CT-CHEST", "", -100, -1)],
        QualityGrade.A,
        "attending",
        False,
        ["accreditation_expired", "grade_meets_minimum", "reader_qualified"],
    ),
    (
        "accreditation not yet valid at the exam",
        CT_CHEST,
        [("C1", "", "imaging", 1, 100)],
        QualityGrade.A,
        "attending",
        False,
        ["accreditation_not_yet_valid"],
    ),
    (
        "no accreditation at all",
        CT_CHEST,
        [],
        QualityGrade.A,
        "attending",
        False,
        ["not_accredited"],
    ),
    (
        "another clinic's accreditation does not count",
        CT_CHEST,
        [("C2", "CT-CHEST", "", -10, 10)],
        QualityGrade.A,
        "attending",
        False,
        ["not_accredited"],
    ),
    (
        "another item's accreditation does not count",
        CT_CHEST,
        [("C1", "CT-HEAD", "", -10, 10)],
        QualityGrade.A,
        "attending",
        False,
        ["not_accredited"],
    ),
    (
        "image grade below the item's minimum",
        CT_CHEST,
        [("C1", "CT-CHEST", "", -10, 10)],
        QualityGrade.C,
        "attending",
        False,
        ["accredited", "grade_below_minimum"],
    ),
    (
        "grade 丙 meets a 丙 minimum",
        DX_CHEST,
        [("C1", "", "imaging", -10, 10)],
        QualityGrade.C,
        "attending",
        True,
        ["grade_meets_minimum"],
    ),
    (
        "signed by a resident (not a qualified reader)",
        CT_CHEST,
        [("C1", "CT-CHEST", "", -10, 10)],
        QualityGrade.A,
        "resident",
        False,
        ["accredited", "grade_meets_minimum", "reader_not_qualified"],
    ),
    (
        "signer qualified for another discipline only",
        CT_CHEST,
        [("C1", "CT-CHEST", "", -10, 10)],
        QualityGrade.A,
        "ecg_only",
        False,
        ["reader_not_qualified_for_exam"],
    ),
]


@pytest.mark.parametrize(
    ("case", "study", "accreditations", "grade", "signer", "granted", "codes"),
    HR_RULES,
    ids=[r[0] for r in HR_RULES],
)
def test_hr_rules(
    shared: Shared,
    case: str,
    study: str,
    accreditations: list[tuple[str, str, str, int, int]],
    grade: QualityGrade,
    signer: str,
    granted: bool,
    codes: list[str],
) -> None:
    clinic, exam_id = shared.clinic_exam(study)
    other, _ = shared.clinic_exam(study)  # a clinic whose accreditations must not count
    day = _exam_date(exam_id)
    if accreditations:
        _accredit(
            [
                (clinic if o == "C1" else other, i, d, day + f * D, day + t * D)
                for o, i, d, f, t in accreditations
            ]
        )
    result = _final_report(exam_id, shared.people[signer], grade)

    assert result["granted"] is granted, result["reasons"]
    got = [r["code"] for r in result["reasons"]]
    for code in codes:
        assert code in got, (code, got)
    # A decision is granted exactly when every reason passed.
    assert all(r["passed"] for r in result["reasons"]) is granted
    for reason in result["reasons"]:
        assert reason["text_zh"] and reason["text_en"] and " / " in reason["text"]
    assert result["covers"] == "data_and_images" and "不包括诊断结论" in result["covers_text"]
    assert result["exam_date"] == day.isoformat()
    assert result["institution"]["code"] == clinic
    if granted:
        assert result["mark"] in ("HR", "皖HR", "全国HR")
        assert result["recognizable_until"] == (day + result["valid_days"] * D).isoformat()
    else:
        assert result["mark"] is None and result["recognizable_until"] is None
    # The decision is recorded, keyed by the report version, exactly as returned.
    with session_scope() as session:
        stored = recognition_for_report(session, report_id=result["report_id"])
        row = session.execute(
            select(RecognitionDecision).where(RecognitionDecision.report_id == result["report_id"])
        ).scalar_one()
    assert stored == result
    assert row.granted is granted and [r["code"] for r in row.reasons] == got
    assert row.catalog_version == result["catalog_version"] == 1


def test_an_ecg_item_has_no_grade_rule_and_prints_its_footnote(shared: Shared) -> None:
    clinic, exam_id = shared.clinic_exam(CT_HEAD, discipline="ecg")
    day = _exam_date(exam_id)
    _accredit([(clinic, "", "ecg", day - 5 * D, day + 5 * D)])
    result = _final_report(exam_id, shared.people["attending"], None)
    assert result["granted"] is True, result["reasons"]
    assert result["item_code"] == "ECG-12" and result["mark"] == "★"
    assert result["scope"] == result["scope_note"] == "限本医联体内门诊"
    assert not any(r["code"].startswith("grade") for r in result["reasons"])


def test_catalogue_versions_are_kept_and_identical_content_changes_nothing(
    hr: Reading,
) -> None:
    again = _load_catalog()
    assert (again.version, again.created) == (1, False)
    exam_id = hr.exams[CT_CHEST]
    day = _exam_date(exam_id)
    _accredit([("C1", "", "imaging", day - D, day + D)])
    first = _final_report(exam_id, hr.people["attending"], QualityGrade.A)
    assert first["catalog_version"] == 1 and first["valid_days"] == 180

    yaml_text = """
items:
  - code: CT-CHEST
    discipline: imaging
    name_zh: 胸部CT平扫
    scope_mark: 皖HR
    valid_days: 90
    min_grade: 甲
    match: {modality: CT, body_part: CHEST}
"""
    second = _load_catalog(yaml_text, "yaml")
    assert (second.version, second.created, second.item_count) == (2, True, 1)
    assert _load_catalog(yaml_text, "yaml").created is False
    # A newer version of the same exam's report is decided again, on the current catalogue.
    newer = _final_report(exam_id, hr.people["attending"], QualityGrade.A, version=2)
    assert newer["catalog_version"] == 2 and newer["valid_days"] == 90
    assert newer["mark"] == "皖HR" and newer["decision_id"] != first["decision_id"]
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(CatalogVersion)) == 2
        old_items = session.scalar(
            select(func.count()).select_from(CatalogItem).where(CatalogItem.catalog_version == 1)
        )
        assert old_items == 5
        # The first version's decision still names the version it used.
        assert recognition_for_report(session, report_id=first["report_id"]) == first


BAD_CATALOGS = [
    (
        "code,discipline,name_zh,scope_mark,valid_days\nX1,dentistry,牙片,HR,30\n",
        "row 2",
        "discipline",
    ),
    ("code,discipline,name_zh,scope_mark,valid_days\nX1,ecg,心电图,★,30\n", "row 2", "footnote"),
    (
        "code,discipline,name_zh,scope_mark,valid_days\nX1,ecg,心电图,XYZ,30\n",
        "row 2",
        "scope_mark",
    ),
    (
        "code,discipline,name_zh,scope_mark,valid_days,min_grade\nX1,ecg,心电图,HR,30,甲\n",
        "row 2",
        "imaging items only",
    ),
    ("code,discipline,name_zh,scope_mark,valid_days\nX1,imaging,CT,HR,30\n", "row 2", "modality"),
    (
        "code,discipline,name_zh,scope_mark,valid_days\nX1,ecg,心电图,HR,soon\n",
        "row 2",
        "valid_days",
    ),
    (
        "code,discipline,name_zh,scope_mark,valid_days\nX1,ecg,a,HR,3\nX2,ecg,b,HR,3\nX1,ecg,c,HR,3\n",
        "row 4",
        "twice",
    ),
]


@pytest.mark.parametrize(("text", "where", "what"), BAD_CATALOGS)
def test_a_bad_catalogue_row_is_named_and_changes_nothing(
    shared: Shared, text: str, where: str, what: str
) -> None:
    with pytest.raises(InvalidInputError) as raised:
        _load_catalog(text)
    assert where in str(raised.value) and what in str(raised.value)
    assert "nothing was changed" in str(raised.value)
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(CatalogVersion)) == 1


def test_accreditations_upsert_and_a_bad_row_changes_nothing(shared: Shared) -> None:
    clinic, _ = shared.clinic_exam(CT_CHEST)
    _accredit([(clinic, "CT-CHEST", "", date(2026, 1, 1), date(2026, 12, 31))])

    def mine() -> list[Accreditation]:
        with session_scope() as session:
            org_id = get_organization(session, code=clinic).id
            return list(
                session.execute(
                    select(Accreditation).where(Accreditation.org_id == org_id)
                ).scalars()
            )

    (acc,) = mine()
    assert acc.discipline.value == "imaging"  # taken from the catalogue item
    assert (acc.item_code, acc.valid_to) == ("CT-CHEST", date(2026, 12, 31))
    text = (
        "org,item_code,discipline,valid_from,valid_to,note\n"
        f"{clinic},CT-CHEST,,2026-01-01,2027-06-30,renewed\n"
    )
    with session_scope() as session:
        done = load_accreditations(session, text=text, fmt="csv", principal=None, now=utcnow())
    assert (done.inserted, done.updated, done.unchanged) == (0, 1, 0)
    bad = (
        "org,item_code,discipline,valid_from,valid_to\n"
        f"{clinic},,ecg,2026-01-01,2026-12-31\n"
        "NOPE,,ecg,2026-01-01,2026-12-31\n"
        f"{clinic},,imaging,2026-12-31,2026-01-01\n"
        f"{clinic},UNKNOWN-ITEM,,2026-01-01,2026-12-31\n"
        f"{clinic},CT-CHEST,ecg,2026-01-01,2026-12-31\n"
    )
    with pytest.raises(InvalidInputError) as raised, session_scope() as session:
        load_accreditations(session, text=bad, fmt="csv", principal=None, now=utcnow())
    message = str(raised.value)
    assert "row 3: unknown organisation 'NOPE'" in message
    assert "row 4: valid_to is before valid_from" in message
    assert "row 5: item UNKNOWN-ITEM is not in the current catalogue" in message
    assert "row 6: item CT-CHEST is imaging, not ecg" in message
    assert "row 2" not in message
    assert [(a.valid_to, a.note) for a in mine()] == [(date(2027, 6, 30), "renewed")]


def test_only_administrators_load_reference_data(shared: Shared) -> None:
    for name in ("qc", "attending"):
        with pytest.raises(PermissionDeniedError), session_scope() as session:
            load_catalog(
                session,
                text=CATALOG_CSV,
                fmt="csv",
                source="x",
                principal=shared.people[name],
                now=utcnow(),
            )
        with pytest.raises(PermissionDeniedError), session_scope() as session:
            load_accreditations(
                session, text="org\n", fmt="csv", principal=shared.people[name], now=utcnow()
            )
    with session_scope() as session:
        again = load_catalog(
            session,
            text=CATALOG_CSV,
            fmt="csv",
            source="x",
            principal=shared.people["admin"],
            now=utcnow(),
        )
    assert (again.version, again.created) == (1, False)


def test_lookup_validity_window_current_version_and_declines(hr: Reading) -> None:
    # Patient P1 has a CT chest (180 days) and a chest X-ray (30 days) done 400 days ago.
    old = utcnow() - timedelta(days=400)
    with session_scope() as session:
        exam = session.get(Exam, hr.exams[DX_CHEST])
        assert exam is not None
        exam.performed_at = old
    ct_day, dx_day = _exam_date(hr.exams[CT_CHEST]), _exam_date(hr.exams[DX_CHEST])
    _accredit([("C1", "", "imaging", dx_day - D, ct_day + D)])
    ct = _final_report(hr.exams[CT_CHEST], hr.people["attending"], QualityGrade.A)
    dx = _final_report(hr.exams[DX_CHEST], hr.people["attending"], QualityGrade.A)
    assert ct["granted"] and dx["granted"]
    today = ct_day

    def lookup(principal: Principal, **kw: Any) -> list[dict[str, Any]]:
        with session_scope() as session:
            found = recognized_results(session, principal=principal, today=today, **kw)
        return list(found["results"])

    tech = hr.people["tech"]
    results = lookup(tech, patient_id="P1")  # issuer defaults to the clinic's own code
    assert [r["item_code"] for r in results] == ["CT-CHEST"]
    assert results[0]["recognizable_until"] == (ct_day + 180 * D).isoformat()
    assert results[0]["institution"]["code"] == "C1" and results[0]["mark"] == "HR"
    # Still valid on its last day, gone the day after (the expired X-ray never shows).
    assert lookup(tech, patient_id="P1", issuer="C1") == results
    last = ct_day + 180 * D
    with session_scope() as session:
        on_last = recognized_results(
            session, principal=tech, patient_id="P1", issuer="C1", today=last
        )
        after = recognized_results(
            session, principal=tech, patient_id="P1", issuer="C1", today=last + D
        )
    assert len(on_last["results"]) == 1 and after["results"] == []
    assert lookup(tech, patient_id="P1", item="DX-CHEST") == []
    assert lookup(tech, patient_id="P2") == []
    with pytest.raises(InvalidInputError):
        lookup(hr.people["qc"], patient_id="P1")  # lead staff name the issuer
    assert lookup(hr.people["qc"], patient_id="P1", issuer="C1") == results

    # A newer version of the CT report that is not granted replaces the recognised one.
    newer = _final_report(hr.exams[CT_CHEST], hr.people["resident"], QualityGrade.A, version=2)
    assert newer["granted"] is False
    assert lookup(tech, patient_id="P1") == []

    # Declines: only clinic clinicians, with a standard reason, and the patient told.
    with session_scope() as session:
        doctor = principal_for_user(
            add_user(
                session, username="doc1", password="pw-123456", role=Role.CLINICIAN, org_code="C1"
            )
        )
        doctor2 = principal_for_user(
            add_user(
                session, username="doc2", password="pw-123456", role=Role.CLINICIAN, org_code="C2"
            )
        )

    def decline(principal: Principal, decision_id: str, **kw: Any) -> dict[str, Any]:
        args = {"reason": "emergency", "patient_informed": True, **kw}
        with session_scope() as session:
            return decline_result(
                session, principal=principal, decision_id=decision_id, now=utcnow(), **args
            )

    with pytest.raises(PermissionDeniedError):
        decline(tech, ct["decision_id"])
    with pytest.raises(InvalidInputError, match="patient must be told"):
        decline(doctor, ct["decision_id"], patient_informed=False)
    with pytest.raises(InvalidInputError, match="needs a note"):
        decline(doctor, ct["decision_id"], reason="other", note="  ")
    with pytest.raises(InvalidInputError, match="reason must be one of"):
        decline(doctor, ct["decision_id"], reason="too_expensive")
    with pytest.raises(NotFoundError):
        decline(doctor, newer["decision_id"])  # not a recognised result
    first = decline(doctor2, ct["decision_id"], reason="other", note="影像不清", request_id="r1")
    retried = decline(doctor2, ct["decision_id"], reason="other", note="影像不清", request_id="r1")
    assert retried["id"] == first["id"]
    assert first["org"] == "C2" and first["declined_by"] == "doc2"
    assert first["reason_zh"] == "其他" and first["patient_informed"] is True

    with session_scope() as session:
        assert [d["id"] for d in list_declines(session, principal=hr.people["qc"])] == [first["id"]]
        assert [d["id"] for d in list_declines(session, principal=doctor2)] == [first["id"]]
        assert list_declines(session, principal=doctor) == []
    with pytest.raises(PermissionDeniedError), session_scope() as session:
        list_declines(session, principal=hr.people["attending"])


def test_signing_through_the_reading_workflow_records_the_decision(hr: Reading) -> None:
    exam_id = hr.exams[CT_CHEST]
    day = _exam_date(exam_id)
    _accredit([("C1", "CT-CHEST", "", day - D, day + D)])
    from worklist.claims import claim_item

    attending = hr.people["attending"]
    with session_scope() as session:
        claim_item(
            session,
            principal=attending,
            item_id=hr.items[CT_CHEST],
            now=utcnow(),
            lease_seconds=600,
        )
    with session_scope() as session:
        save_draft(
            session,
            principal=attending,
            exam_id=exam_id,
            data=ReportIn(findings="两肺纹理清晰", impression="未见异常", quality_grade="甲"),
            now=utcnow(),
        )
    with session_scope() as session:
        report = submit_report(session, principal=attending, exam_id=exam_id, now=utcnow())
    assert report.status is ReportStatus.FINAL
    with session_scope() as session:
        decision = recognition_for_report(session, report_id=report.id)
    assert decision is not None and decision["granted"] is True, decision
    assert decision["mark"] == "HR" and decision["signer"] == "attending"
