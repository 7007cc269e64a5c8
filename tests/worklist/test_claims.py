"""Claims are leases: exactly one winner, visible to others as taken, expiring, released,
reassigned by seniors; the worklist sorts by urgency and counts per state."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from rdc_core.db import session_scope, utcnow
from rdc_core.errors import InvalidInputError, NotFoundError, PermissionDeniedError
from tests.worklist.conftest import Reading
from worklist.audit import AuditEvent
from worklist.claims import (
    ClaimConflictError,
    WorklistFilter,
    claim_item,
    claim_next,
    list_worklist,
    reassign_item,
    release_item,
    renew_item,
)
from worklist.directory import add_user, principal_for_user
from worklist.models import ReaderLevel, Role, RoutingRule, User, WorkItem, WorkItemState

LEASE = 600


def _claim(reading: Reading, who: str, study: str, *, at: timedelta = timedelta(0)) -> str:
    with session_scope() as session:
        lease = claim_item(
            session,
            principal=reading.people[who],
            item_id=reading.items[study],
            now=utcnow() + at,
            lease_seconds=LEASE,
        )
    return lease.claimed_by


def _worklist(reading: Reading, who: str, **filters: object):  # type: ignore[no-untyped-def]
    with session_scope() as session:
        return list_worklist(
            session,
            principal=reading.people[who],
            now=utcnow(),
            filters=WorklistFilter(**filters),  # type: ignore[arg-type]
        )


def test_twenty_readers_claiming_at_once_one_wins(reading: Reading) -> None:
    # 20 distinct readers, so "claiming again renews" cannot hide a double win.
    with session_scope() as session:
        for i in range(20):
            add_user(
                session,
                username=f"r{i:02d}",
                password="pw-123456",
                role=Role.READER,
                org_code="LEAD",
                level=ReaderLevel.ATTENDING,
            )
    with session_scope() as session:
        principals = [
            principal_for_user(u)
            for u in session.execute(select(User).where(User.username.like("r%"))).scalars()
            if u.username[1:].isdigit()
        ]
    assert len(principals) == 20
    item_id = reading.items["1.2.9.1"]
    barrier = threading.Barrier(len(principals))
    wins: list[str] = []
    conflicts: list[str] = []
    errors: list[BaseException] = []

    def attempt(principal) -> None:  # type: ignore[no-untyped-def]
        try:
            barrier.wait()
            with session_scope() as session:
                claim_item(
                    session,
                    principal=principal,
                    item_id=item_id,
                    now=utcnow(),
                    lease_seconds=LEASE,
                )
            wins.append(principal.username)
        except ClaimConflictError:
            conflicts.append(principal.username)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=attempt, args=(p,)) for p in principals]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(wins) == 1 and len(conflicts) == 19
    with session_scope() as session:
        holder = session.execute(
            select(User.username).join(WorkItem, WorkItem.claimed_by == User.id)
        ).scalar_one()
    assert holder == wins[0]


def test_taken_item_shows_holder_and_refuses_others(reading: Reading) -> None:
    assert _claim(reading, "resident", "1.2.9.1") == "resident"
    with pytest.raises(ClaimConflictError, match="taken by resident"):
        _claim(reading, "attending", "1.2.9.1")
    seen = {i.study_instance_uid: i for i in _worklist(reading, "attending").items}
    assert seen["1.2.9.1"].taken and seen["1.2.9.1"].claimed_by == "resident"
    mine = {i.study_instance_uid: i for i in _worklist(reading, "resident").items}
    assert mine["1.2.9.1"].mine and not mine["1.2.9.1"].taken
    # Claiming again renews for the holder.
    assert _claim(reading, "resident", "1.2.9.1") == "resident"


def test_lease_expires_and_then_another_reader_wins(reading: Reading) -> None:
    _claim(reading, "resident", "1.2.9.1")
    later = timedelta(seconds=LEASE + 1)
    assert _claim(reading, "attending", "1.2.9.1", at=later) == "attending"
    with session_scope() as session, pytest.raises(ClaimConflictError, match="lost"):
        renew_item(
            session,
            principal=reading.people["resident"],
            item_id=reading.items["1.2.9.1"],
            now=utcnow() + later,
            lease_seconds=LEASE,
        )


def test_release_by_hand_frees_the_item(reading: Reading) -> None:
    _claim(reading, "resident", "1.2.9.1")
    with session_scope() as session, pytest.raises(ClaimConflictError):
        release_item(
            session,
            principal=reading.people["attending"],
            item_id=reading.items["1.2.9.1"],
            now=utcnow(),
        )
    with session_scope() as session:
        release_item(
            session,
            principal=reading.people["resident"],
            item_id=reading.items["1.2.9.1"],
            now=utcnow(),
        )
    assert _claim(reading, "attending", "1.2.9.1") == "attending"
    with session_scope() as session:
        actions = session.execute(select(AuditEvent.action)).scalars().all()
    assert {"claim", "release"} <= set(actions)


def test_only_seniors_reassign(reading: Reading) -> None:
    _claim(reading, "resident", "1.2.9.1")
    with session_scope() as session, pytest.raises(PermissionDeniedError):
        reassign_item(
            session,
            principal=reading.people["resident2"],
            item_id=reading.items["1.2.9.1"],
            username="resident2",
            now=utcnow(),
            lease_seconds=LEASE,
        )
    with session_scope() as session:
        lease = reassign_item(
            session,
            principal=reading.people["chief"],
            item_id=reading.items["1.2.9.1"],
            username="resident2",
            now=utcnow(),
            lease_seconds=LEASE,
        )
    assert lease.claimed_by == "resident2"
    with pytest.raises(ClaimConflictError, match="resident2"):
        _claim(reading, "resident", "1.2.9.1")


def test_reassign_only_to_a_reader_who_may_read_the_exam(reading: Reading) -> None:
    with session_scope() as session:
        resident2 = session.execute(select(User).where(User.username == "resident2")).scalar_one()
        resident2.pools = ["ecg"]  # 1.2.9.1 is a CT in the imaging pool
    with session_scope() as session, pytest.raises(InvalidInputError, match="resident2"):
        reassign_item(
            session,
            principal=reading.people["chief"],
            item_id=reading.items["1.2.9.1"],
            username="resident2",
            now=utcnow(),
            lease_seconds=LEASE,
        )
    assert _claim(reading, "resident", "1.2.9.1") == "resident"  # nobody was given it


def test_an_exam_awaiting_verification_goes_to_seniors_only(reading: Reading) -> None:
    with session_scope() as session:
        session.execute(
            update(WorkItem)
            .where(WorkItem.id == reading.items["1.2.9.1"])
            .values(state=WorkItemState.AWAITING_VERIFICATION)
        )

    def reassign(to: str) -> str:
        with session_scope() as session:
            return reassign_item(
                session,
                principal=reading.people["chief"],
                item_id=reading.items["1.2.9.1"],
                username=to,
                now=utcnow(),
                lease_seconds=LEASE,
            ).claimed_by

    # A resident could neither verify nor edit it, and would block the seniors meanwhile.
    with pytest.raises(InvalidInputError, match="resident2"):
        reassign("resident2")
    assert reassign("attending") == "attending"


def test_worklist_sorted_by_urgency_then_due_with_counts(reading: Reading) -> None:
    page = _worklist(reading, "resident")
    priorities = [i.priority.value for i in page.items]
    assert priorities == ["emergency", "urgent", "routine", "routine"]
    routine_due = [i.due_at for i in page.items if i.priority.value == "routine"]
    assert routine_due == sorted(routine_due)
    _claim(reading, "attending", "1.2.9.2")
    page = _worklist(reading, "resident")
    assert page.counts.open == 3 and page.counts.claimed == 1 and page.counts.mine == 0
    assert [i.study_instance_uid for i in _worklist(reading, "attending", mine=True).items] == [
        "1.2.9.2"
    ]
    assert {i.modality for i in _worklist(reading, "resident", modality="ct").items} == {"CT"}
    assert len(_worklist(reading, "resident", state="open").items) == 3
    assert len(_worklist(reading, "resident", clinic="C2").items) == 0
    assert len(_worklist(reading, "resident", clinic="C1").items) == 4


def test_clinic_users_have_no_worklist(reading: Reading) -> None:
    with pytest.raises(PermissionDeniedError):
        _worklist(reading, "tech")
    with pytest.raises(PermissionDeniedError):
        _claim(reading, "tech", "1.2.9.1")


def test_routing_pools_and_qualifications_decide_who_sees_what(reading: Reading) -> None:
    with session_scope() as session:
        session.add(RoutingRule(position=1, modality="US", pool="ultrasound"))
        # Re-route the already queued US exam as the rule would have.
        session.execute(
            update(WorkItem)
            .where(WorkItem.id == reading.items["1.2.9.4"])
            .values(pool="ultrasound")
        )
        resident = session.execute(select(User).where(User.username == "resident")).scalar_one()
        resident.pools = ["imaging"]
        resident2 = session.execute(select(User).where(User.username == "resident2")).scalar_one()
        resident2.qualifications = [{"discipline": "imaging", "modality": "DX"}]
    assert "1.2.9.4" not in {i.study_instance_uid for i in _worklist(reading, "resident").items}
    with pytest.raises(NotFoundError):
        _claim(reading, "resident", "1.2.9.4")
    assert {i.study_instance_uid for i in _worklist(reading, "resident2").items} == {"1.2.9.3"}
    # With no pools or qualifications, a reader sees everything.
    assert len(_worklist(reading, "attending").items) == 4


def test_claim_next_takes_the_most_urgent_free_item(reading: Reading) -> None:
    _claim(reading, "attending", "1.2.9.2")  # the emergency one is taken
    with session_scope() as session:
        lease = claim_next(
            session, principal=reading.people["resident"], now=utcnow(), lease_seconds=LEASE
        )
    assert lease.item_id == reading.items["1.2.9.3"]  # the urgent one
