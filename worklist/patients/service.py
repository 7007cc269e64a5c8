"""The alliance patient index (IHE PIX in spirit): one person per patient of the alliance,
linking the (issuer, patient ID) identifiers the clinics use.

Links come from a national ID a message carries (intake calls
:func:`link_identifiers_from_intake`) and from an administrator's explicit merge
(:func:`link_identifiers`); persons that merely look alike are proposed
(:func:`match_candidates`), never linked. Every clinic patient row stays as received; only
its link to a person changes. Services take the session and never commit.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy import and_, distinct, func, select, update
from sqlalchemy.orm import Session

from rdc_core.db import insert_ignore, stable_id
from rdc_core.errors import ConflictError, InvalidInputError, NotFoundError
from rdc_core.settings import get_settings
from worklist.access import Principal, require_roles
from worklist.audit import record_access, record_event
from worklist.models import Exam, Organization, Patient, Role
from worklist.patients.links import same_person_clause
from worklist.patients.models import Person, PersonLink
from worklist.patients.national_id import (
    InvalidNationalIdError,
    cipher,
    mask_national_id,
    shown_patient_id,
    validate_national_id,
)
from worklist.patients.schemas import (
    Candidate,
    ExamBrief,
    IdentifierOut,
    IntakeLinkOutcome,
    OtherIdentifier,
    PersonOut,
)

__all__ = [
    "ensure_person",
    "find_person",
    "get_person",
    "link_identifiers",
    "link_identifiers_from_intake",
    "match_candidates",
    "parse_identifier",
    "resolve_patient_refs",
    "same_person_refs",
    "unlink_identifiers",
]

_LOOKUP_ROLES = frozenset(Role)  # clinic users (their own identifiers) and lead staff
_HL7_NATIONAL_ID_TYPE = "NNCHN"  # HL7 table 0203: national person identifier, China
_MAX_EXAMS = 200
_INTAKE_ACTOR = "system:intake"


def parse_identifier(identifier: str) -> tuple[str, str]:
    """``ISSUER|ID`` as (issuer, patient ID); the ID may itself contain ``|``."""
    issuer, sep, patient_id = identifier.partition("|")
    if not sep or not issuer.strip() or not patient_id.strip():
        raise InvalidInputError(f"an identifier is ISSUER|ID, not {identifier!r}")
    return issuer.strip(), patient_id.strip()


def _national_issuer() -> str | None:
    return get_settings().national_id_issuer or None


def _shown_identifier(issuer: str, patient_id: str) -> str:
    return f"{issuer}|{shown_patient_id(issuer, patient_id)}"


def _person_of(session: Session, patient_ref: str) -> str | None:
    return session.execute(
        select(PersonLink.person_id).where(PersonLink.patient_ref == patient_ref)
    ).scalar_one_or_none()


def ensure_person(session: Session, *, patient_ref: str, now: datetime) -> str:
    """The person the clinic patient row ``patient_ref`` belongs to; a new patient gets a
    person of its own (with an ID derived from the row, so racing writers agree)."""
    person_id = _person_of(session, patient_ref)
    if person_id is not None:
        return person_id
    person_id = stable_id("person", patient_ref)
    insert_ignore(
        session,
        Person.__table__,
        {"id": person_id, "created_at": now, "updated_at": now},
        conflict=["id"],
    )
    if insert_ignore(
        session,
        PersonLink.__table__,
        {
            "patient_ref": patient_ref,
            "person_id": person_id,
            "source": "intake",
            "auto_link_blocked": False,
            "linked_at": now,
        },
        conflict=["patient_ref"],
    ):
        return person_id
    return _person_of(session, patient_ref) or person_id  # another writer linked it first


def _national_person(session: Session, national_id: str, now: datetime) -> tuple[str, str]:
    """The person of ``national_id`` (created on first sight) and the ID's keyed hash.

    Its ID is derived from the keyed hash, and only such persons carry a national ID, so two
    clinics' messages arriving together meet in the same row."""
    c = cipher()
    digest = c.keyed_hash(national_id)
    person_id = stable_id("person-national-id", digest)
    insert_ignore(
        session,
        Person.__table__,
        {
            "id": person_id,
            "national_id_hash": digest,
            "national_id_enc": c.encrypt(national_id),
            "created_at": now,
            "updated_at": now,
        },
        # Both unique keys (id and national_id_hash) derive from the ID: on PostgreSQL two
        # clinics inserting it at once may clash on either index first, so both are arbiters.
        conflict=(),
    )
    return person_id, digest


def _person_hash(session: Session, person_id: str) -> str | None:
    return session.execute(
        select(Person.national_id_hash).where(Person.id == person_id)
    ).scalar_one_or_none()


def _merge(session: Session, *, source: str, target: str, now: datetime) -> None:
    """Move every identifier of person ``source`` to ``target``; ``source`` remembers where
    its identifiers went, so its ID still leads to them."""
    session.execute(
        update(PersonLink).where(PersonLink.person_id == source).values(person_id=target)
    )
    session.execute(
        update(Person).where(Person.id == source).values(merged_into=target, updated_at=now)
    )
    session.execute(update(Person).where(Person.id == target).values(updated_at=now))


def link_identifiers_from_intake(
    session: Session,
    *,
    patient_ref: str,
    issuer: str,
    patient_id: str,
    other_ids: Sequence[OtherIdentifier] = (),
    now: datetime,
) -> IntakeLinkOutcome:
    """Called by intake where a clinic patient row is upserted: give the row its person and,
    when the message carries a national ID (the patient's own issuer is
    ``RDC_NATIONAL_ID_ISSUER``, or another identifier with that issuer or of HL7 type
    ``NNCHN``), link it to that national ID's person.

    An invalid national ID (wrong length, wrong GB 11643 check digit) or one that conflicts
    with what this identifier carried before links nothing and is audited; the message itself
    is still accepted (its images must not be lost over a typo in a demographic field).
    """
    person_id = ensure_person(session, patient_ref=patient_ref, now=now)
    national = _national_issuer()
    offered = [patient_id] if national and issuer == national else []
    offered += [
        o.value
        for o in other_ids
        if (national and o.issuer == national)
        or o.type_code.strip().upper() == _HL7_NATIONAL_ID_TYPE
    ]
    if not offered:
        return IntakeLinkOutcome(person_id, "none")

    def refused(reason: str) -> IntakeLinkOutcome:
        record_event(
            session,
            actor=_INTAKE_ACTOR,
            action="national_id_refused",
            object_type="patient",
            object_id=patient_ref,
            detail={"reason": reason, "identifier": _shown_identifier(issuer, patient_id)},
        )
        return IntakeLinkOutcome(person_id, "refused", reason)

    try:
        valid = {validate_national_id(value) for value in offered}
    except InvalidNationalIdError as exc:
        return refused(str(exc))
    if len(valid) > 1:
        return refused("the message carries two different national IDs")
    national_id = valid.pop()
    c = cipher()
    digest = c.keyed_hash(national_id)
    link = session.execute(
        select(PersonLink.national_id_hash, PersonLink.auto_link_blocked).where(
            PersonLink.patient_ref == patient_ref
        )
    ).one()
    if link.national_id_hash is None:
        session.execute(
            update(PersonLink)
            .where(PersonLink.patient_ref == patient_ref)
            .values(national_id_hash=digest, national_id_enc=c.encrypt(national_id))
        )
    elif link.national_id_hash != digest:
        return refused("this identifier arrived before with another national ID")
    if link.auto_link_blocked:
        return IntakeLinkOutcome(person_id, "blocked", "unlinked by an administrator")
    target, _ = _national_person(session, national_id, now)
    if person_id == target:
        return IntakeLinkOutcome(person_id, "unchanged")
    current_hash = _person_hash(session, person_id)
    if current_hash is not None and current_hash != digest:
        return refused("the identifier's person has another national ID")
    _merge(session, source=person_id, target=target, now=now)
    session.execute(
        update(PersonLink)
        .where(PersonLink.patient_ref == patient_ref)
        .values(source="national_id", linked_at=now)
    )
    record_event(
        session,
        actor=_INTAKE_ACTOR,
        action="link",
        object_type="person",
        object_id=target,
        detail={
            "identifier": _shown_identifier(issuer, patient_id),
            "by": "national_id",
            "merged": [person_id],
        },
    )
    return IntakeLinkOutcome(target, "linked")


def resolve_patient_refs(
    session: Session, *, issuer: str, patient_id: str, org_id: str | None = None
) -> list[str]:
    """The clinic patient rows an identifier names (within ``org_id`` when given). An
    identifier of the national issuer also names every row linked to that national ID's
    person; a national ID with a bad check digit is refused."""
    stmt = select(Patient.id).where(Patient.issuer == issuer, Patient.patient_id == patient_id)
    if org_id is not None:
        stmt = stmt.where(Patient.org_id == org_id)
    refs = list(session.execute(stmt.order_by(Patient.id)).scalars())
    if issuer == _national_issuer():
        digest = cipher().keyed_hash(validate_national_id(patient_id))
        linked = (
            select(PersonLink.patient_ref)
            .join(Person, Person.id == PersonLink.person_id)
            .where(Person.national_id_hash == digest)
        )
        if org_id is not None:
            linked = linked.join(Patient, Patient.id == PersonLink.patient_ref).where(
                Patient.org_id == org_id
            )
        refs += [r for r in session.execute(linked).scalars() if r not in refs]
    return refs


def _persons_of(session: Session, refs: Iterable[str], now: datetime | None = None) -> list[str]:
    persons: list[str] = []
    for ref in refs:
        person = (
            ensure_person(session, patient_ref=ref, now=now)
            if now is not None
            else _person_of(session, ref)
        )
        if person is not None and person not in persons:
            persons.append(person)
    return persons


def _follow_merges(session: Session, person_id: str) -> Person | None:
    for _ in range(32):
        person = session.get(Person, person_id)
        if person is None or person.merged_into is None:
            return person
        person_id = person.merged_into
    return None


def _decrypted_mask(token: str | None) -> str | None:
    if token is None:
        return None
    value = cipher().decrypt(token)
    return mask_national_id(value) if value else "******************"


def _person_out(session: Session, person: Person, principal: Principal) -> PersonOut:
    rows = session.execute(
        select(PersonLink, Patient, Organization)
        .join(Patient, Patient.id == PersonLink.patient_ref)
        .join(Organization, Organization.id == Patient.org_id)
        .where(PersonLink.person_id == person.id)
        .order_by(Organization.code, Patient.issuer, Patient.patient_id)
    ).all()
    identifiers = [
        IdentifierOut(
            issuer=patient.issuer,
            patient_id=shown_patient_id(patient.issuer, patient.patient_id),
            clinic_code=org.code,
            clinic_name=org.name,
            name=patient.name,
            birth_date=patient.birth_date,
            sex=patient.sex,
            source=link.source,
            linked_at=link.linked_at,
            national_id=_decrypted_mask(link.national_id_enc),
        )
        for link, patient, org in rows
    ]
    shown = {p.id: _shown_identifier(p.issuer, p.patient_id) for _, p, _ in rows}
    stmt = (
        select(Exam, Organization.code)
        .join(Organization, Organization.id == Exam.org_id)
        .where(Exam.patient_ref.in_(list(shown)))
    )
    if principal.is_clinic_user:
        stmt = stmt.where(Exam.org_id == principal.org_id)
    exams = [
        ExamBrief(
            id=exam.id,
            clinic_code=code,
            identifier=shown[exam.patient_ref],
            discipline=exam.discipline,
            modality=exam.modality,
            modalities=exam.modalities,
            body_part=exam.body_part,
            description=exam.description,
            state=exam.state,
            performed_at=exam.performed_at,
            first_received_at=exam.first_received_at,
        )
        for exam, code in session.execute(
            stmt.order_by(Exam.first_received_at.desc(), Exam.id).limit(_MAX_EXAMS)
        )
    ]
    return PersonOut(
        id=person.id,
        national_id=_decrypted_mask(person.national_id_enc),
        identifiers=identifiers,
        exams=exams,
    )


def _visible_to(session: Session, principal: Principal, person_id: str) -> bool:
    if not principal.is_clinic_user:
        return True
    return (
        session.execute(
            select(PersonLink.patient_ref)
            .join(Patient, Patient.id == PersonLink.patient_ref)
            .where(PersonLink.person_id == person_id, Patient.org_id == principal.org_id)
            .limit(1)
        ).first()
        is not None
    )


def find_person(session: Session, *, principal: Principal, identifier: str) -> PersonOut:
    """The person an identifier ``ISSUER|ID`` belongs to, with every linked identifier
    (audited). A clinic user may look up their own clinic's identifiers only."""
    require_roles(principal, _LOOKUP_ROLES)
    issuer, patient_id = parse_identifier(identifier)
    refs = resolve_patient_refs(
        session,
        issuer=issuer,
        patient_id=patient_id,
        org_id=principal.org_id if principal.is_clinic_user else None,
    )
    shown = _shown_identifier(issuer, patient_id)
    persons = _persons_of(session, refs)
    record_access(
        session,
        principal,
        action="lookup",
        object_type="person",
        object_id=persons[0] if len(persons) == 1 else "*",
        detail={"identifier": shown, "persons": persons},
    )
    if not persons:
        raise NotFoundError(f"no patient {shown}")
    if len(persons) > 1:
        raise ConflictError(
            f"{shown} names {len(persons)} persons (the same identifier at several clinics): "
            + ", ".join(persons)
        )
    person = session.get(Person, persons[0])
    assert person is not None
    return _person_out(session, person, principal)


def get_person(session: Session, *, principal: Principal, person_id: str) -> PersonOut:
    """One person (a merged person's ID leads to the person it was merged into), audited.
    A clinic user sees only persons with an identifier of their clinic; others are 404."""
    require_roles(principal, _LOOKUP_ROLES)
    person = _follow_merges(session, person_id)
    if person is None or not _visible_to(session, principal, person.id):
        raise NotFoundError(f"no person {person_id}")
    record_access(session, principal, action="view", object_type="person", object_id=person.id)
    return _person_out(session, person, principal)


def _admin_refs(session: Session, identifiers: Sequence[str]) -> dict[str, list[str]]:
    refs: dict[str, list[str]] = {}
    for identifier in identifiers:
        issuer, patient_id = parse_identifier(identifier)
        found = resolve_patient_refs(session, issuer=issuer, patient_id=patient_id)
        shown = _shown_identifier(issuer, patient_id)
        if not found:
            raise NotFoundError(f"no patient {shown}")
        refs[shown] = found
    return refs


def link_identifiers(
    session: Session,
    *,
    principal: Principal,
    identifiers: Sequence[str],
    reason: str,
    now: datetime,
) -> PersonOut:
    """An administrator's explicit merge: every named identifier becomes one person
    (the national ID's person, if one of them has one). Audited with the reason; clears an
    earlier unlink's block. Identifiers of two different national IDs are refused (409)."""
    require_roles(principal, {Role.ADMIN}, lead_only=True)
    if not reason.strip():
        raise InvalidInputError("a reason is required")
    if len(set(identifiers)) < 2:
        raise InvalidInputError("name at least two identifiers to link")
    refs = _admin_refs(session, identifiers)
    all_refs = list(dict.fromkeys(itertools.chain.from_iterable(refs.values())))
    persons = _persons_of(session, all_refs, now)
    hashes = {p: h for p in persons if (h := _person_hash(session, p)) is not None}
    if len(set(hashes.values())) > 1:
        raise ConflictError("the identifiers belong to persons with different national IDs")
    target = next(iter(hashes), persons[0])
    for other in persons:
        if other != target:
            _merge(session, source=other, target=target, now=now)
    session.execute(
        update(PersonLink)
        .where(PersonLink.patient_ref.in_(all_refs))
        .values(
            source="admin",
            linked_by=principal.actor,
            reason=reason,
            linked_at=now,
            auto_link_blocked=False,
        )
    )
    record_access(
        session,
        principal,
        action="link",
        object_type="person",
        object_id=target,
        detail={"identifiers": list(refs), "reason": reason, "merged": persons},
    )
    merged = session.get(Person, target)
    assert merged is not None
    session.refresh(merged)
    return _person_out(session, merged, principal)


def unlink_identifiers(
    session: Session,
    *,
    principal: Principal,
    identifiers: Sequence[str],
    reason: str,
    now: datetime,
) -> list[PersonOut]:
    """Take each named clinic identifier out of its person into a person of its own
    (audited with the reason). A national ID arriving with it later no longer links it
    again; only an administrator's explicit link does. Answers the new persons."""
    require_roles(principal, {Role.ADMIN}, lead_only=True)
    if not reason.strip():
        raise InvalidInputError("a reason is required")
    if not identifiers:
        raise InvalidInputError("name the identifiers to unlink")
    national = _national_issuer()
    moved: list[tuple[str, str, str]] = []
    for identifier in dict.fromkeys(identifiers):
        issuer, patient_id = parse_identifier(identifier)
        shown = _shown_identifier(issuer, patient_id)
        if issuer == national:
            raise InvalidInputError(
                "unlink names clinic identifiers; a national ID links all of them"
            )
        refs = resolve_patient_refs(session, issuer=issuer, patient_id=patient_id)
        if not refs:
            raise NotFoundError(f"no patient {shown}")
        for ref in refs:
            person = ensure_person(session, patient_ref=ref, now=now)
            others = session.execute(
                select(PersonLink.patient_ref).where(
                    PersonLink.person_id == person, PersonLink.patient_ref != ref
                )
            ).first()
            if others is None:
                raise ConflictError(f"{shown} is not linked to any other identifier")
            new_person = str(uuid.uuid4())
            session.add(Person(id=new_person, created_at=now, updated_at=now))
            session.flush()
            session.execute(
                update(PersonLink)
                .where(PersonLink.patient_ref == ref)
                .values(
                    person_id=new_person,
                    source="unlink",
                    auto_link_blocked=True,
                    linked_by=principal.actor,
                    reason=reason,
                    linked_at=now,
                )
            )
            moved.append((shown, person, new_person))
    record_access(
        session,
        principal,
        action="unlink",
        object_type="person",
        object_id=moved[0][1],
        detail={
            "reason": reason,
            "unlinked": [{"identifier": s, "from": f, "to": t} for s, f, t in moved],
        },
    )
    out = []
    for _, _, new_person in moved:
        created = session.get(Person, new_person)
        assert created is not None
        out.append(_person_out(session, created, principal))
    return out


def _name_keys(name: str) -> set[str]:
    # DICOM PN: alphabetic=ideographic=phonetic groups; components split by ^.
    keys = set()
    for group in name.split("="):
        key = "".join(group.replace("^", " ").split()).upper()
        if key:
            keys.add(key)
    return keys


def match_candidates(
    session: Session, *, principal: Principal, limit: int = 100
) -> list[Candidate]:
    """Persons whose identifiers agree on name (in either script), birth date and sex:
    proposed to an administrator, never linked here. Persons with different national IDs
    are never proposed. Audited."""
    require_roles(principal, {Role.ADMIN}, lead_only=True)
    if not 1 <= limit <= 1000:
        raise InvalidInputError("limit must be between 1 and 1000")
    known = (Patient.birth_date.is_not(None), Patient.sex.is_not(None), Patient.name != "")
    # Only birth date and sex shared by two persons or more can hold a match: the database
    # narrows the rows, names are compared here (either script of a DICOM name).
    shared = (
        select(Patient.birth_date, func.upper(Patient.sex).label("sex"))
        .join(PersonLink, PersonLink.patient_ref == Patient.id)
        .where(*known)
        .group_by(Patient.birth_date, func.upper(Patient.sex))
        .having(func.count(distinct(PersonLink.person_id)) > 1)
        .subquery()
    )
    rows = session.execute(
        select(Patient, PersonLink.person_id, Person.national_id_hash)
        .join(PersonLink, PersonLink.patient_ref == Patient.id)
        .join(Person, Person.id == PersonLink.person_id)
        .join(
            shared,
            and_(
                shared.c.birth_date == Patient.birth_date,
                shared.c.sex == func.upper(Patient.sex),
            ),
        )
        .where(*known)
        .order_by(Patient.birth_date, Patient.id)
    ).all()
    buckets: dict[tuple[str, str, str], list[tuple[Patient, str, str | None]]] = {}
    for patient, person, digest in rows:
        assert patient.birth_date is not None and patient.sex is not None
        for key in _name_keys(patient.name):
            buckets.setdefault((patient.birth_date, patient.sex.upper(), key), []).append(
                (patient, person, digest)
            )
    seen: set[frozenset[str]] = set()
    out: list[Candidate] = []
    for (birth_date, sex, _), members in buckets.items():
        for (pa, a, ha), (pb, b, hb) in itertools.combinations(members, 2):
            pair = frozenset((a, b))
            if a == b or pair in seen or (ha is not None and hb is not None and ha != hb):
                continue
            seen.add(pair)
            out.append(
                Candidate(
                    persons=[a, b],
                    identifiers=[
                        _shown_identifier(pa.issuer, pa.patient_id),
                        _shown_identifier(pb.issuer, pb.patient_id),
                    ],
                    name=pa.name,
                    birth_date=birth_date,
                    sex=sex,
                )
            )
            if len(out) >= limit:
                break
        if len(out) >= limit:
            break
    record_access(
        session,
        principal,
        action="list",
        object_type="person_candidate",
        detail={"pairs": [c.persons for c in out]},
    )
    return out


def same_person_refs(session: Session, *, patient_refs: Sequence[str]) -> list[str]:
    """``patient_refs`` and every clinic patient row linked to the same persons."""
    if not patient_refs:
        return []
    return list(
        session.execute(
            select(Patient.id).where(same_person_clause(Patient.id, patient_refs))
        ).scalars()
    )
