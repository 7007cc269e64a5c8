"""HL7 v2 lab intake through a running ``rdc serve``: every test-data message over a real MLLP
socket and over HTTP, acknowledgements checked with hl7apy, duplicates, unknown senders,
framing errors, access rules.

One deployment serves the module; ``mllp_answers`` sends every message once, the tests
then look at what was answered and stored.
"""

from __future__ import annotations

import hashlib
import re
import socket
from pathlib import Path

import httpx
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from hl7apy.validation import Validator

from tests.helpers import (
    HTTP_TIMEOUT,
    ack_fields,
    lab_message_bytes,
    mllp_exchange,
    mllp_read_answers,
)
from tests.lab_results.conftest import CLINIC_B_FACILITY, LabDeployment

ER7 = "x-application/hl7-v2+er7"

# What each message of the test data is answered: MSA-1 and a piece of the reason. The
# batch's first message reuses the control ID (and sender) of single_message.hl7 with other
# content; the batch is sent first (sorted order), so single_message is the reuse.
EXPECTED: dict[str, list[tuple[str, str]]] = {
    "malformed/reportstream_fail_onboarding_pass_prod.hl7": [("CR", "order number")],
    "malformed/reportstream_output-invalid.hl7": [("AR", "sending facility")],
    "msfhirconv_LAB-ORU-1.hl7": [("AA", "")],
    "msfhirconv_LRI_2.0-NG_CBC_Typ_Message.hl7": [("CA", "")],
    "non_oru/msfhirconv_ADT-A01-02.hl7": [("AR", "unsupported message type ADT^A01")],
    "non_oru/msfhirconv_OUL-R22-01.hl7": [("CA", "")],
    "pythonhl7_oru_r01_glucose.hl7": [("AA", "")],
    "reportstream_CE-20200415-0001.hl7": [("CA", "")],
    "reportstream_batch_message.hl7": [("CA", ""), ("CA", "")],
    "reportstream_elims_1_72_3029202646_5532_NoPII.hl7": [("CA", "")],
    "reportstream_sample_oru_CDPH_NBS_20241021-001.hl7": [("AA", "")],
    "reportstream_single_message.hl7": [("CE", "control ID reused")],
}


def hl7_files(testdata: Path) -> list[Path]:
    folder = testdata / "hl7"
    return sorted(folder.rglob("*.hl7"), key=lambda p: p.relative_to(folder).as_posix())


def name_of(testdata: Path, path: Path) -> str:
    return path.relative_to(testdata / "hl7").as_posix()


def split_acks(answer: bytes) -> list[bytes]:
    """The ACK messages of an answer (one ACK, or a batch of them between BHS and BTS)."""
    segments = [s for s in answer.split(b"\r") if s]
    acks: list[list[bytes]] = []
    for segment in segments:
        if segment.startswith(b"MSH"):
            acks.append([segment])
        elif segment[:3] in (b"FHS", b"BHS", b"BTS", b"FTS"):
            continue
        else:
            acks[-1].append(segment)
    return [b"\r".join(a) + b"\r" for a in acks]


def validate_ack(ack: bytes) -> None:
    """hl7apy: the ACK is a structurally valid ACK of its HL7 version."""
    message = parse_message(
        ack.decode("utf-8"), validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=True
    )
    assert message.name == "ACK"
    assert Validator.validate(message)


def control_ids(raw: bytes) -> list[str]:
    """MSH-10 of each message in ``raw``."""
    text = raw.decode("utf-8-sig")
    return [line.split("|")[9] for line in re.split(r"\r\n|\r|\n", text) if line[:3] == "MSH"]


def message_rows(lab: LabDeployment) -> dict[str, tuple[str, str, str, bytes]]:
    with lab.server.db() as db:
        rows = db.execute(
            "SELECT control_id, object_key, channel, ack_code, ack FROM lab_messages"
        ).fetchall()
    return {r[0]: (r[1], r[2], r[3], bytes(r[4])) for r in rows}


@pytest.fixture(scope="module")
def mllp_answers(lab: LabDeployment, testdata: Path) -> dict[str, bytes]:
    """Every test-data message sent over one MLLP connection: file name -> answer."""
    answers = {}
    with socket.create_connection(("127.0.0.1", lab.server.mllp_port), timeout=30) as sock:
        for path in hl7_files(testdata):
            answers[name_of(testdata, path)] = mllp_exchange(sock, path.read_bytes())
    return answers


def test_every_message_is_answered_as_expected_over_one_connection(
    mllp_answers: dict[str, bytes], testdata: Path
) -> None:
    assert set(mllp_answers) == set(EXPECTED), "the test data changed: update EXPECTED"
    for name, answer in mllp_answers.items():
        sent_ids = control_ids((testdata / "hl7" / name).read_bytes())
        acks = split_acks(answer)
        assert len(acks) == len(EXPECTED[name]), name
        for ack, control_id, (code, reason) in zip(acks, sent_ids, EXPECTED[name], strict=True):
            validate_ack(ack)
            fields = ack_fields(ack)
            assert fields["MSA"][1] == code, (name, ack)
            assert fields["MSA"][2] == control_id, name  # MSA-2 echoes MSH-10
            if reason:
                err = fields["ERR"]
                text = err[8] if len(err) > 8 else err[1]
                unescaped = text.replace("\\S\\", "^")
                assert reason in unescaped, (name, ack)
                if len(fields["MSA"]) > 3:  # MSA-3 (before v2.7) says the same
                    assert reason in fields["MSA"][3].replace("\\S\\", "^")
            else:
                assert "ERR" not in fields, name


def test_batch_answer_is_a_batch_of_acks(mllp_answers: dict[str, bytes]) -> None:
    answer = mllp_answers["reportstream_batch_message.hl7"]
    names = [s[:3] for s in answer.split(b"\r") if s]
    assert names == [b"FHS", b"BHS", b"MSH", b"MSA", b"MSH", b"MSA", b"BTS", b"FTS"]
    bts = next(s for s in answer.split(b"\r") if s.startswith(b"BTS"))
    assert bts == b"BTS|2"


def test_accepted_messages_are_indexed_with_their_bytes(
    lab: LabDeployment, mllp_answers: dict[str, bytes], testdata: Path
) -> None:
    rows = message_rows(lab)
    accepted: dict[str, bytes] = {}  # control ID -> the bytes as sent
    for name, expected in EXPECTED.items():
        raw = (testdata / "hl7" / name).read_bytes()
        if name == "reportstream_batch_message.hl7":
            body = raw.decode()
            parts = re.split(r"(?=^MSH\|)", body, flags=re.M)[1:]
            parts[-1] = parts[-1].split("BTS|")[0]
            for part, control_id in zip(parts, control_ids(raw), strict=True):
                accepted[control_id] = part.encode()
        elif expected[0][0] in ("AA", "CA"):
            accepted[control_ids(raw)[0]] = raw
    assert set(rows) == set(accepted)  # nothing rejected was indexed
    with lab.server.db() as db:
        hashes = dict(db.execute("SELECT control_id, content_sha256 FROM lab_messages").fetchall())
    for control_id, sent in accepted.items():
        # content_sha256: the SHA-256 of the message's bytes as sent (inside the MLLP frame)
        assert hashes[control_id] == hashlib.sha256(sent).hexdigest()
        _, channel, code, ack = rows[control_id]
        assert channel == "mllp"
        # kept as received (BOM, LF and all): in its row, then moved to its object
        assert lab_message_bytes(lab.env, control_id) == sent
        assert ack_fields(ack)["MSA"][1] == code
    keys = lab.server.objects("hl7")
    assert set(keys) <= {r[0] for r in rows.values()}  # no stray objects


def test_resent_message_gets_the_same_ack_and_is_not_stored_again(
    lab: LabDeployment, mllp_answers: dict[str, bytes], testdata: Path
) -> None:
    raw = (testdata / "hl7" / "pythonhl7_oru_r01_glucose.hl7").read_bytes()
    before = message_rows(lab)
    with socket.create_connection(("127.0.0.1", lab.server.mllp_port), timeout=30) as sock:
        again = mllp_exchange(sock, raw)
        # LF instead of CR between segments is the same message
        assert mllp_exchange(sock, raw.replace(b"\r", b"\n")) == again
        changed = raw.replace(b"||^182|", b"||^183|", 1)
        assert changed != raw
        reused = mllp_exchange(sock, changed)
    assert again == mllp_answers["pythonhl7_oru_r01_glucose.hl7"]
    fields = ack_fields(reused)
    assert fields["MSA"][1:3] == ["AE", "CNTRL-3456"]
    assert "control ID reused" in fields["MSA"][3]
    assert fields["ERR"][1].startswith("MSH^1^10^205&")  # v2.4 ERR-1: location, code 205
    validate_ack(reused)
    assert message_rows(lab) == before
    # nothing kept twice: every object is a row's (processing writes them)
    assert set(lab.server.objects("hl7")) <= {row[0] for row in before.values()}


def test_unknown_sender_is_rejected_and_the_connection_stays_usable(
    lab: LabDeployment, testdata: Path
) -> None:
    raw = (testdata / "hl7" / "pythonhl7_oru_r01_glucose.hl7").read_bytes()
    stranger = raw.replace(b"|ELAB-3|", b"|ELAB-9^1.2.3^ISO|").replace(b"CNTRL-3456", b"X-1")
    fresh = raw.replace(b"CNTRL-3456", b"CNTRL-3457")
    with socket.create_connection(("127.0.0.1", lab.server.mllp_port), timeout=30) as sock:
        refused = ack_fields(mllp_exchange(sock, stranger))
        accepted = ack_fields(mllp_exchange(sock, fresh))
    assert refused["MSA"][1:3] == ["AR", "X-1"]
    assert "sending facility ELAB-9 / 1.2.3 is not registered" in refused["MSA"][3]
    assert accepted["MSA"][1:3] == ["AA", "CNTRL-3457"]
    rows = message_rows(lab)
    assert "X-1" not in rows and "CNTRL-3457" in rows


def test_framing_error_closes_only_that_connection(lab: LabDeployment, testdata: Path) -> None:
    raw = (testdata / "hl7" / "pythonhl7_oru_r01_glucose.hl7").read_bytes()
    address = ("127.0.0.1", lab.server.mllp_port)
    with (
        socket.create_connection(address, timeout=30) as good,
        socket.create_connection(address, timeout=30) as bad,
    ):
        bad.sendall(b"MSH|^~\\&|not framed\r")
        assert bad.recv(100) == b""  # closed without an answer
        # the other connection, open meanwhile, is served
        assert ack_fields(mllp_exchange(good, raw))["MSA"][1] == "AA"
        # blank lines between frames and a message that is not HL7 are tolerated
        good.sendall(b"\r\n")
        answer = ack_fields(mllp_exchange(good, b"hello"))
        assert answer["MSA"][1] == "AR" and "does not begin with an MSH" in answer["MSA"][3]
        assert ack_fields(mllp_exchange(good, raw))["MSA"][1] == "AA"
        # two messages in one frame without a batch header: refused, not merged
        twice = raw.replace(b"CNTRL-3456", b"TWICE-1") + raw.replace(b"CNTRL-3456", b"TWICE-2")
        answer = ack_fields(mllp_exchange(good, twice))
        assert answer["MSA"][1:3] == ["AR", "TWICE-1"] and "second MSH" in answer["MSA"][3]
    assert "TWICE-1" not in message_rows(lab)


def test_http_intake_answers_like_mllp(
    lab: LabDeployment, mllp_answers: dict[str, bytes], testdata: Path
) -> None:
    rows_before = message_rows(lab)
    with lab.client("tech_a") as client:
        for path in hl7_files(testdata):
            name = name_of(testdata, path)
            response = client.post(
                "/api/v1/lab/messages",
                content=path.read_bytes(),
                headers={"Content-Type": ER7},
            )
            assert response.status_code == 200, response.text
            assert response.headers["content-type"].startswith(ER7)
            acks, earlier = split_acks(response.content), split_acks(mllp_answers[name])
            for ack, first, (code, _) in zip(acks, earlier, EXPECTED[name], strict=True):
                validate_ack(ack)
                if code in ("AA", "CA"):
                    assert ack == first  # a re-send: the stored ACK, byte for byte
                else:
                    assert ack_fields(ack)["MSA"][1] == code
                    assert ack_fields(ack)["ERR"] == ack_fields(first)["ERR"]
    assert message_rows(lab) == rows_before

    fresh = (
        (testdata / "hl7" / "pythonhl7_oru_r01_glucose.hl7")
        .read_bytes()
        .replace(b"CNTRL-3456", b"HTTP-1")
    )
    with lab.client("admin") as client:
        response = client.post(
            "/api/v1/lab/messages", content=fresh, headers={"Content-Type": "text/plain"}
        )
    assert response.status_code == 200
    assert ack_fields(response.content)["MSA"][1:3] == ["AA", "HTTP-1"]
    assert message_rows(lab)["HTTP-1"][1] == "http"
    with lab.server.db() as db:
        audited = db.execute(
            "SELECT count(*) FROM audit_events WHERE action = 'lab.messages.receive'"
        ).fetchone()
    assert audited is not None and audited[0] >= len(EXPECTED) + 1


def test_http_intake_access_rules(lab: LabDeployment, testdata: Path) -> None:
    raw = (testdata / "hl7" / "pythonhl7_oru_r01_glucose.hl7").read_bytes()
    other = raw.replace(b"CNTRL-3456", b"B-1")
    headers = {"Content-Type": ER7}
    url = "/api/v1/lab/messages"
    with lab.client("tech_b") as client:
        # clinic B may not send as clinic A's facility
        refused = ack_fields(client.post(url, content=other, headers=headers).content)
        assert refused["MSA"][1] == "AR"
        assert "not one of your clinic's facilities" in refused["MSA"][3]
        own = other.replace(b"|ELAB-3|", f"|{CLINIC_B_FACILITY}|".encode())
        assert ack_fields(client.post(url, content=own, headers=headers).content)["MSA"][1] == "AA"
        wrong_type = client.post(url, content=raw, headers={"Content-Type": "application/json"})
        assert wrong_type.status_code == 415
        assert wrong_type.headers["content-type"] == "application/problem+json"
    with lab.client("reader") as client:
        assert client.post(url, content=raw, headers=headers).status_code == 403
    assert (
        httpx.post(
            lab.server.http + url, content=raw, headers=headers, timeout=HTTP_TIMEOUT
        ).status_code
        == 401
    )
    with lab.server.db() as db:
        owner = db.execute(
            "SELECT o.code FROM lab_messages m JOIN organizations o ON o.id = m.org_id "
            "WHERE m.control_id = 'B-1'"
        ).fetchall()
    assert [r[0] for r in owner] == ["CLINIC_B"]


def test_facility_belongs_to_one_clinic(lab: LabDeployment) -> None:
    from tests.helpers import rdc_cli

    taken = rdc_cli(
        lab.env,
        "clinic",
        "add",
        "--code",
        "CLINIC_B",
        "--update",
        "--hl7-facility",
        "ELAB-3",
        check=False,
    )
    assert taken.returncode == 1
    assert "already belongs to another organisation" in taken.stderr
    missing = rdc_cli(
        lab.env, "clinic", "add", "--code", "NOPE", "--update", "--hl7-facility", "X", check=False
    )
    assert missing.returncode == 1 and "no organisation with code 'NOPE'" in missing.stderr


def test_chinese_lis_message_in_gb18030_with_crlf(lab: LabDeployment) -> None:
    """A county LIS sending GB 18030 (named in MSH-18) with CRLF segment terminators."""
    text = (
        "MSH|^~\\&|LIS|ELAB-3|RDC|RDC|20260101083000||ORU^R01|GB-1|P|2.5.1"
        "|||||CHN|GB 18030-2000\r\n"
        "PID|1||A123^^^ELAB-3^PI||张^三||19600101|M\r\n"
        "OBR|1|PL-1|FL-1|2345-7^血糖^LN|||20260101080000\r\n"
        "OBX|1|NM|2345-7^血糖^LN||6.1|mmol/L|3.9-6.1|N|||F\r\n"
    )
    raw = text.encode("gb18030")
    with socket.create_connection(("127.0.0.1", lab.server.mllp_port), timeout=30) as sock:
        answer = mllp_exchange(sock, raw)
    fields = ack_fields(answer)
    assert fields["MSA"][1:3] == ["AA", "GB-1"]
    assert fields["MSH"][17] == "GB 18030-2000"  # the ACK names the same character set
    assert lab_message_bytes(lab.env, "GB-1") == raw


def test_senders_that_do_not_wait_get_every_answer_in_order(
    lab: LabDeployment, testdata: Path
) -> None:
    """Two LIS connections each send a stream of messages without waiting for answers, in
    pieces, so that their frames reach the listener over many rounds: each gets one answer
    per message, in the order sent (rounds are synced and answered while later ones are
    committed), accepted ones AA and indexed, a resend the stored ACK, an ADT refused."""
    raw = (testdata / "hl7" / "pythonhl7_oru_r01_glucose.hl7").read_bytes()
    adt = (testdata / "hl7" / "non_oru" / "msfhirconv_ADT-A01-02.hl7").read_bytes()

    def stream(tag: str) -> tuple[list[bytes], list[tuple[str, str]]]:
        messages, expected = [], []
        for n in range(40):
            control_id = f"STREAM-{tag}-{n}"
            messages.append(raw.replace(b"CNTRL-3456", control_id.encode()))
            expected.append(("AA", control_id))
            if n % 10 == 5:
                messages.append(messages[-2])  # the message before again: its stored ACK
                expected.append(("AA", f"STREAM-{tag}-{n - 1}"))
                messages.append(adt)
                expected.append(("AR", control_ids(adt)[0]))
        return messages, expected

    port = lab.server.mllp_port
    streams = {tag: stream(tag) for tag in ("A", "B")}
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as a,
        socket.create_connection(("127.0.0.1", port), timeout=30) as b,
    ):
        socks = {"A": a, "B": b}
        data = {
            tag: b"".join(b"\x0b" + m + b"\x1c\x0d" for m in messages)
            for tag, (messages, _) in streams.items()
        }
        piece = 1500  # about two messages: frames split across reads and rounds
        for start in range(0, max(len(d) for d in data.values()), piece):
            for tag, sock in socks.items():
                sock.sendall(data[tag][start : start + piece])
        for tag, sock in socks.items():
            expected = streams[tag][1]
            answers = mllp_read_answers(sock, len(expected))
            got = [tuple(ack_fields(answer)["MSA"][1:3]) for answer in answers]
            assert got == expected
            first = answers[expected.index(("AA", f"STREAM-{tag}-4"))]
            assert answers[expected.index(("AA", f"STREAM-{tag}-4"), 5)] == first
    rows = message_rows(lab)
    for tag in ("A", "B"):
        assert {f"STREAM-{tag}-{n}" for n in range(40)} <= set(rows)
