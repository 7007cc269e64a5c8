"""The alliance patient index, table tested through intake and the index's services: national
IDs from two clinics link (Other Patient IDs, a national issuer, HL7 type NNCHN); a bad check
digit links nothing; look-alikes are only proposed; an administrator's link and unlink; priors
follow the person; a clinic sees only its own identifiers."""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text

from dicom_gateway.records import InstanceHeader, record_instance
from rdc_core.db import get_engine, session_scope, stable_id, utcnow
from rdc_core.errors import ConflictError, NotFoundError, PermissionDeniedError
from rdc_core.migrate import upgrade_database
from rdc_core.settings import reset_settings
from worklist.access import Principal
from worklist.audit import AuditEvent, verify_chain
from worklist.directory import add_organization, add_user, principal_for_user
from worklist.models import Organization, OrgKind, Role, User
from worklist.patients import (
    InvalidNationalIdError,
    OtherIdentifier,
    find_person,
    get_person,
    link_identifiers,
    mask_national_id,
    match_candidates,
    unlink_identifiers,
    validate_national_id,
)
from worklist.patients.models import Person, PersonLink
from worklist.patients.national_id import shown_patient_id
from worklist.queries import list_priors

NATIONAL = "CN-NATIONAL"
NID = "11010519491231002X"  # GB 11643's own example
NID2 = "440524188001010014"
BAD_NID = "110105194912310021"  # check digit should be X
_serial = itertools.count(1)


@dataclass
class Alliance:
    people: dict[str, Principal]


@pytest.fixture
def alliance(database: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Alliance]:
    monkeypatch.setenv("RDC_NATIONAL_ID_ISSUER", NATIONAL)
    reset_settings()
    with session_scope() as session:
        add_organization(session, code="LEAD", name="Lead", kind=OrgKind.LEAD)
        add_organization(session, code="C1", name="Clinic 1", kind=OrgKind.CLINIC)
        add_organization(session, code="C2", name="Clinic 2", kind=OrgKind.CLINIC)
        for name, role, org in (
            ("admin", Role.ADMIN, "LEAD"),
            ("reader", Role.READER, "LEAD"),
            ("tech1", Role.TECHNICIAN, "C1"),
            ("tech2", Role.TECHNICIAN, "C2"),
        ):
            add_user(session, username=name, password="pw-123456", role=role, org_code=org)
    with session_scope() as session:
        users = session.execute(select(User)).scalars().all()
        people = {u.username: principal_for_user(u) for u in users}
    yield Alliance(people)
    reset_settings()


def receive(
    clinic: str,
    patient_id: str,
    *,
    issuer: str | None = None,
    other: tuple[OtherIdentifier, ...] = (),
    name: str = "",
    birth_date: str | None = None,
    sex: str | None = None,
) -> str:
    """One new study of ``patient_id`` from ``clinic``; returns its exam ID."""
    study = f"1.2.826.0.1.{next(_serial)}"
    with session_scope() as session:
        org_row = session.execute(
            select(Organization).where(Organization.code == clinic)
        ).scalar_one()
        _, exam_id = record_instance(
            session,
            header=InstanceHeader(
                sop_instance_uid=f"{study}.1.1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                study_instance_uid=study,
                series_instance_uid=f"{study}.1",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                patient_id=patient_id,
                issuer_of_patient_id=issuer,
                patient_name=name,
                patient_birth_date=birth_date,
                patient_sex=sex,
                other_patient_ids=other,
                modality="CT",
            ),
            org_id=org_row.id,
            org_code=org_row.code,
            storage_key=f"k/{study}",
            size_bytes=1,
            sha256="0" * 64,
            calling_ae="AE",
            now=utcnow() - timedelta(minutes=1),
        )
    return exam_id


def person(alliance: Alliance, identifier: str, who: str = "admin") -> dict[str, object]:
    with session_scope() as session:
        return find_person(
            session, principal=alliance.people[who], identifier=identifier
        ).model_dump()


def _ids(found: dict[str, object]) -> set[str]:
    identifiers = found["identifiers"]
    assert isinstance(identifiers, list)
    return {f"{i['issuer']}|{i['patient_id']}" for i in identifiers}


def test_national_id_validation_and_mask() -> None:
    assert validate_national_id(" 11010519491231002x ") == NID
    assert validate_national_id(NID2) == NID2
    for bad, says in (
        (BAD_NID, "check digit"),
        ("1101051949123100", "18 characters"),
        ("11010519491231002Y", "17 digits"),
    ):
        with pytest.raises(InvalidNationalIdError, match=says):
            validate_national_id(bad)
    assert mask_national_id(NID) == "110105********002X"


def test_a_national_id_is_shown_masked_whatever_its_issuer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RDC_NATIONAL_ID_ISSUER", NATIONAL)
    reset_settings()
    try:
        assert shown_patient_id(NATIONAL, NID) == "110105********002X"
        # A clinic using the card number as its own patient ID (any issuer, any case).
        assert shown_patient_id("CLINIC_A", NID.lower()) == "110105********002x"
        # Not a national ID: shown as received (a bad check digit, an ordinary ID).
        assert shown_patient_id("CLINIC_A", BAD_NID) == BAD_NID
        assert shown_patient_id("CLINIC_A", "A-100") == "A-100"
        # The national issuer's values are masked even when they are not valid IDs.
        assert shown_patient_id(NATIONAL, BAD_NID) == "110105********0021"
    finally:
        monkeypatch.delenv("RDC_NATIONAL_ID_ISSUER")
        reset_settings()


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param(
            ("C1", "A-1", None, (OtherIdentifier(NATIONAL, NID),)),
            ("C2", "B-1", None, (OtherIdentifier(NATIONAL, NID.lower()),)),
            id="other-patient-ids-with-the-national-issuer",
        ),
        pytest.param(
            ("C1", "A-1", None, (OtherIdentifier(NATIONAL, NID),)),
            ("C2", NID, NATIONAL, ()),
            id="patient-id-of-the-national-issuer",
        ),
        pytest.param(
            ("C1", "A-1", "HOSP-1", (OtherIdentifier("MOH", NID, "NNCHN"),)),
            ("C2", "B-1", None, (OtherIdentifier(NATIONAL, NID),)),
            id="hl7-identifier-type-NNCHN",
        ),
    ],
)
def test_same_national_id_from_two_clinics_links(
    alliance: Alliance,
    first: tuple[str, str, str | None, tuple[OtherIdentifier, ...]],
    second: tuple[str, str, str | None, tuple[OtherIdentifier, ...]],
) -> None:
    exams = [receive(c, pid, issuer=iss, other=other) for c, pid, iss, other in (first, second)]
    one = person(alliance, f"{first[2] or first[0]}|{first[1]}")
    two = person(alliance, f"{second[2] or second[0]}|{second[1]}")
    assert one["id"] == two["id"]
    assert one["national_id"] == "110105********002X"
    assert len(one["identifiers"]) == 2  # type: ignore[arg-type]
    assert NID not in str(one)
    # Looking up by the national ID itself finds the same person.
    assert person(alliance, f"{NATIONAL}|{NID}")["id"] == one["id"]
    # Priors follow the person across clinics for the lead hospital, not for a clinic.
    with session_scope() as session:
        priors = list_priors(session, principal=alliance.people["reader"], exam_id=exams[0])
        assert [p.id for p in priors] == [exams[1]]
        own = list_priors(session, principal=alliance.people["tech1"], exam_id=exams[0])
        assert own == []
    # Stored encrypted, matched by a keyed hash: neither is the number or its plain hash.
    with session_scope() as session:
        stored = session.execute(select(Person).where(Person.national_id_hash.is_not(None))).all()
        links = session.execute(select(PersonLink)).scalars().all()
    assert len(stored) == 1
    row = stored[0][0]
    plain_hash = hashlib.sha256(NID.encode()).hexdigest()
    for value in [row.national_id_hash, row.national_id_enc] + [
        v for link in links for v in (link.national_id_hash, link.national_id_enc) if v
    ]:
        assert NID not in value and value != plain_hash


def test_bad_check_digit_is_refused_and_not_linked(alliance: Alliance) -> None:
    receive("C1", "A-1", other=(OtherIdentifier(NATIONAL, NID),))
    receive("C2", "B-1", other=(OtherIdentifier(NATIONAL, BAD_NID),))
    assert person(alliance, "C1|A-1")["id"] != person(alliance, "C2|B-1")["id"]
    assert person(alliance, "C2|B-1")["national_id"] is None
    with session_scope() as session:
        refused = session.execute(
            select(AuditEvent).where(AuditEvent.action == "national_id_refused")
        ).scalar_one()
        assert "check digit" in refused.detail["reason"]
        assert BAD_NID not in str(refused.detail)
        # An administrator naming a bad national ID gets the same clear error.
        with pytest.raises(InvalidNationalIdError, match="check digit"):
            link_identifiers(
                session,
                principal=alliance.people["admin"],
                identifiers=["C1|A-1", f"{NATIONAL}|{BAD_NID}"],
                reason="same person",
                now=utcnow(),
            )


def test_look_alikes_are_proposed_never_linked(alliance: Alliance) -> None:
    demo = {"birth_date": "19800101", "sex": "M"}
    receive("C1", "A-1", name="Wang^Xiaoming=王^小明", **demo)
    receive("C2", "B-1", name="王小明", **demo)  # the same name, ideographic only
    receive("C2", "B-2", name="Wang^Xiaoming", birth_date="19800102", sex="M")
    # Different national IDs: never the same person, however alike.
    receive("C1", "A-3", name="Li^Na", other=(OtherIdentifier(NATIONAL, NID),), **demo)
    receive("C2", "B-3", name="Li^Na", other=(OtherIdentifier(NATIONAL, NID2),), **demo)
    assert person(alliance, "C1|A-1")["id"] != person(alliance, "C2|B-1")["id"]
    with session_scope() as session:
        with pytest.raises(PermissionDeniedError):
            match_candidates(session, principal=alliance.people["reader"])
        found = match_candidates(session, principal=alliance.people["admin"])
    assert [sorted(c.identifiers) for c in found] == [["C1|A-1", "C2|B-1"]]
    assert person(alliance, "C1|A-1")["id"] != person(alliance, "C2|B-1")["id"]


def test_link_and_unlink_by_an_administrator(alliance: Alliance) -> None:
    a = receive("C1", "A-1", other=(OtherIdentifier(NATIONAL, NID),))
    b = receive("C2", "B-1", other=(OtherIdentifier(NATIONAL, NID),))
    c = receive("C2", "B-2")
    linked = person(alliance, "C1|A-1")
    admin = alliance.people["admin"]
    with session_scope() as session:
        with pytest.raises(PermissionDeniedError):
            link_identifiers(
                session,
                principal=alliance.people["reader"],
                identifiers=["C1|A-1", "C2|B-2"],
                reason="x",
                now=utcnow(),
            )
        with pytest.raises(NotFoundError, match="C2\\|NOPE"):
            link_identifiers(
                session,
                principal=admin,
                identifiers=["C1|A-1", "C2|NOPE"],
                reason="x",
                now=utcnow(),
            )
        merged = link_identifiers(
            session,
            principal=admin,
            identifiers=["C2|B-2", "C1|A-1"],
            reason="记录核对 same patient",
            now=utcnow(),
        )
    # The national ID's person survives the merge; the merged person's ID leads to it.
    assert merged.id == linked["id"] and len(merged.identifiers) == 3
    with session_scope() as session:
        apart = unlink_identifiers(
            session, principal=admin, identifiers=["C2|B-1"], reason="wrong patient", now=utcnow()
        )
    assert len(apart) == 1 and _ids(apart[0].model_dump()) == {"C2|B-1"}
    assert person(alliance, "C2|B-1")["id"] != person(alliance, "C1|A-1")["id"]
    with session_scope() as session:
        priors = list_priors(session, principal=alliance.people["reader"], exam_id=a)
        assert {p.id for p in priors} == {c}
        assert list_priors(session, principal=alliance.people["reader"], exam_id=b) == []
    # The national ID arriving again with the unlinked identifier does not relink it.
    receive("C2", "B-1", other=(OtherIdentifier(NATIONAL, NID),))
    assert person(alliance, "C2|B-1")["id"] != person(alliance, "C1|A-1")["id"]
    receive("C1", "A-9", other=(OtherIdentifier(NATIONAL, NID2),))
    with session_scope() as session:
        with pytest.raises(ConflictError, match="not linked to any other"):
            unlink_identifiers(
                session, principal=admin, identifiers=["C2|B-1"], reason="x", now=utcnow()
            )
        # Two national IDs cannot be one person.
        with pytest.raises(ConflictError, match="different national IDs"):
            link_identifiers(
                session, principal=admin, identifiers=["C1|A-1", "C1|A-9"], reason="x", now=utcnow()
            )
    with session_scope() as session:
        actions = [
            e.action
            for e in session.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars()
            if e.object_type == "person" and e.action in ("link", "unlink")
        ]
        assert actions.count("unlink") == 1 and actions.count("link") >= 2
        assert verify_chain(session) == (True, None)


def test_a_clinic_sees_its_own_identifiers_only(alliance: Alliance) -> None:
    receive("C1", "A-1", other=(OtherIdentifier(NATIONAL, NID),))
    receive("C2", "B-1", other=(OtherIdentifier(NATIONAL, NID),))
    receive("C2", "B-2")
    shared = person(alliance, "C2|B-1", who="tech2")
    assert _ids(shared) == {"C1|A-1", "C2|B-1"}
    with pytest.raises(NotFoundError):
        person(alliance, "C2|B-1", who="tech1")
    only_b = person(alliance, "C2|B-2", who="tech2")
    with session_scope() as session:
        assert get_person(session, principal=alliance.people["tech1"], person_id=str(shared["id"]))
        with pytest.raises(NotFoundError):
            get_person(session, principal=alliance.people["tech1"], person_id=str(only_b["id"]))


def test_two_clinics_sending_the_same_national_id_at_once_meet_in_one_person(
    alliance: Alliance,
) -> None:
    """Intake in concurrent transactions (one per clinic, on PostgreSQL truly in parallel):
    the national ID's person has an ID derived from its keyed hash, so both land in it."""
    third = "32010219800101123"
    ids = [NID, NID2, third + validate_national_id_check(third)]
    errors: list[BaseException] = []
    for round_, national_id in enumerate(ids):
        barrier = threading.Barrier(2)

        def send(
            clinic: str,
            nid: str = national_id,
            r: int = round_,
            barrier: threading.Barrier = barrier,
        ) -> None:
            try:
                barrier.wait(timeout=30)
                receive(clinic, f"{clinic}-{r}", other=(OtherIdentifier(NATIONAL, nid),))
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=send, args=(c,)) for c in ("C1", "C2")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert errors == []
    for round_, national_id in enumerate(ids):
        found = person(alliance, f"{NATIONAL}|{national_id}")
        assert _ids(found) == {f"C1|C1-{round_}", f"C2|C2-{round_}"}
    with session_scope() as session:
        assert (
            len(
                session.execute(select(Person.id).where(Person.national_id_hash.is_not(None))).all()
            )
            == 3
        )


def validate_national_id_check(first17: str) -> str:
    """The GB 11643 check character of 17 digits (to build valid test IDs)."""
    for candidate in "0123456789X":
        try:
            return validate_national_id(first17 + candidate)[-1]
        except InvalidNationalIdError:
            continue
    raise AssertionError("no check character")


def test_the_migration_gives_every_patient_held_a_person(
    database_url: str | None, tmp_path: Path
) -> None:
    """Patients indexed before the index existed each become a person of their own, with the
    ID intake derives for them (so intake finds it)."""
    url = database_url or f"sqlite:///{tmp_path / 'rdc.db'}"
    upgrade_database(url, "0007")
    engine = get_engine(url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO organizations (id, code, name, kind, created_at) "
                "VALUES ('o1', 'C1', 'Clinic 1', 'clinic', :now)"
            ),
            {"now": utcnow()},
        )
        for n in range(3):
            connection.execute(
                text(
                    "INSERT INTO patients (id, org_id, issuer, patient_id, name, original, "
                    "created_at, updated_at) VALUES (:id, 'o1', 'C1', :pid, '', '{}', :now, :now)"
                ),
                {"id": f"p{n}", "pid": f"P{n}", "now": utcnow()},
            )
    upgrade_database(url)
    with engine.connect() as connection:
        links = connection.execute(
            text("SELECT patient_ref, person_id, source FROM person_links ORDER BY patient_ref")
        ).all()
        persons = connection.execute(text("SELECT COUNT(*) FROM persons")).scalar_one()
    engine.dispose()
    assert [(ref, person, source) for ref, person, source in links] == [
        (f"p{n}", stable_id("person", f"p{n}"), "intake") for n in range(3)
    ]
    assert persons == 3
