"""Hardening (issue 16) through the real interfaces: a signature needs the signer's password
(missing or wrong: 403, nothing signed, audited; 5 wrong: locked, 429 with Retry-After),
login throttling per username and per client address (shared by replicas through the
database), token revocation (logout, password reset, disable: CLI and API), production's
secret-key and password rules, the session cookie behind the TLS ingress
(RDC_FORWARDED_ALLOW_IPS reaches uvicorn; Secure in production), Origin: null refused,
files at rest 0600/0700, and refusals and configuration changes in the audit trail."""

from __future__ import annotations

import json
import secrets
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import (
    HTTP_TIMEOUT,
    RdcClient,
    RdcServer,
    free_port,
    rdc_cli,
    storescu,
    wait_for,
    worklist_items,
)

_LOGIN = "/api/v1/auth/token"


def _audit(server: RdcServer, action: str) -> list[dict[str, Any]]:
    with server.db() as db:
        rows = db.execute(
            "SELECT actor, action, object_type, object_id, detail FROM audit_events "
            "WHERE action = ? ORDER BY seq",
            (action,),
        ).fetchall()
    return [
        {
            "actor": r["actor"],
            "object_type": r["object_type"],
            "object_id": r["object_id"],
            "detail": json.loads(r["detail"]) if isinstance(r["detail"], str) else r["detail"],
        }
        for r in rows
    ]


def _report_rows(server: RdcServer, exam_id: str) -> list[tuple[Any, ...]]:
    with server.db() as db:
        return [
            (r["version"], r["status"], r["submitted_at"])
            for r in db.execute(
                "SELECT version, status, submitted_at FROM reports WHERE exam_id = ? "
                "ORDER BY version",
                (exam_id,),
            ).fetchall()
        ]


def _draft(client: RdcClient, item: dict[str, Any], impression: str) -> str:
    assert client.post(f"/api/v1/worklist/{item['id']}/claim").status_code == 200
    saved = client.put(
        f"/api/v1/exams/{item['exam_id']}/report",
        json={"findings": "两肺纹理清晰", "impression": impression, "quality_grade": "甲"},
    )
    assert saved.status_code == 200, saved.text
    return str(item["exam_id"])


def test_signing_needs_the_signers_own_password(
    server: RdcServer, alliance: dict[str, str], testdata: Path, dcmtk: Path
) -> None:
    sent = storescu(
        dcmtk,
        [testdata / "dicom" / "CT_small.dcm", testdata / "dicom" / "MR_small.dcm"],
        port=server.dicom_port,
        calling_ae="CLINIC_A_CT",
    )
    assert all(r.returncode == 0 for r in sent)
    reader = server.client("reader", alliance["reader"])
    senior = server.client("senior", alliance["senior"])
    items = worklist_items(reader, count=2)
    exam_id = _draft(reader, items[0], "未见异常")
    submit = f"/api/v1/exams/{exam_id}/report/submit"

    # Missing, empty or wrong password (someone else's too): 403, nothing signed.
    for body in (None, {}, {"signing_password": ""}, {"signing_password": alliance["senior"]}):
        refused = reader.post(submit, json=body) if body is not None else reader.post(submit)
        assert refused.status_code == 403, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["title"] == "Signature refused"
    assert _report_rows(server, exam_id) == [(1, "draft", None)]
    assert server.objects("reports") == []
    refusals = _audit(server, "sign_refused")
    assert [r["detail"]["reason"] for r in refusals] == ["no signing password"] * 3 + [
        "wrong signing password"
    ]
    assert {(r["actor"], r["object_type"], r["object_id"]) for r in refusals} == {
        ("user:reader", "exam", exam_id)
    }

    # The right password signs (a resident: preliminary).
    signed = reader.post(submit, json=reader.signing)
    assert signed.status_code == 200, signed.text
    report = signed.json()
    assert report["status"] == "preliminary"

    # Verify-by-senior and amend need the senior's own password too.
    verify = f"/api/v1/reports/{report['id']}/verify-by-senior"
    assert senior.post(verify).status_code == 403
    assert senior.post(verify, json={"signing_password": alliance["reader"]}).status_code == 403
    assert _report_rows(server, exam_id)[0][1] == "preliminary"
    verified = senior.post(verify, json=senior.signing)
    assert verified.status_code == 200 and verified.json()["status"] == "final"
    amend = f"/api/v1/reports/{report['id']}/amend"
    change = {"kind": "corrected", "reason": "更正", "impression": "右肺小结节"}
    assert senior.post(amend, json=change).status_code == 403
    wrong = senior.post(amend, json={**change, "signing_password": "nope-nope-nope"})
    assert wrong.status_code == 403
    assert len(_report_rows(server, exam_id)) == 1
    amended = senior.post(amend, json={**change, **senior.signing})
    assert amended.status_code == 200 and amended.json()["version"] == 2

    # Lock-out: the reader's fifth wrong password within 15 minutes locks signing; the
    # sixth attempt answers 429 with Retry-After even with the right password.
    exam_2 = _draft(reader, items[1], "测试")
    submit_2 = f"/api/v1/exams/{exam_2}/report/submit"
    for _ in range(4):  # one wrong password above, four here
        assert reader.post(submit_2, json={"signing_password": "guess-guess"}).status_code == 403
    locked = reader.post(submit_2, json=reader.signing)
    assert locked.status_code == 429, locked.text
    assert 0 < int(locked.headers["retry-after"]) <= 15 * 60
    assert locked.json()["retry_after"] == int(locked.headers["retry-after"])
    assert _report_rows(server, exam_2) == [(1, "draft", None)]
    assert _audit(server, "sign_refused")[-1]["detail"]["reason"] == "locked"
    # Another signer is not locked.
    assert (
        senior.post(f"/api/v1/reports/{amended.json()['id']}/amend", json=change).status_code == 403
    )

    # Files at rest in the object store: the DICOM, ECG and lab objects too, directories
    # 0700 and files 0600 whatever the umask (022 here), wherever RDC_STORAGE_URL puts them.
    tech = server.client("tech_a", alliance["tech_a"])
    aecg = testdata / "ecg" / "aecg" / "Example_aECG.xml"
    ecg = tech.post("/api/v1/ecg", files=[("file", (aecg.name, aecg.read_bytes(), "text/xml"))])
    assert ecg.status_code == 201, ecg.text
    # Clinic A's laboratory sends as "ELAB-3" (the glucose ORU's MSH-4).
    rdc_cli(
        server.env, "clinic", "add", "--code", "CLINIC_A", "--update", "--hl7-facility", "ELAB-3"
    )
    oru = (testdata / "hl7" / "pythonhl7_oru_r01_glucose.hl7").read_bytes()
    ack = tech.post(
        "/api/v1/lab/messages", content=oru, headers={"Content-Type": "application/hl7-v2"}
    )
    assert ack.status_code == 200 and b"MSA|AA" in ack.content, ack.text
    if server.env.get("RDC_STORAGE_BACKEND", "local") == "local":
        root = Path(server.env["RDC_DATA_DIR"]) / "objects"
        # The message's bytes reach the object store when processing has run.
        wait_for(
            lambda: list((root / "hl7").rglob("*.hl7")),
            timeout=60,
            what="the lab message's object (written by processing)",
        )
        stored = [p for p in root.rglob("*") if p.is_file()]
        assert {p.relative_to(root).parts[0] for p in stored} >= {"dicom", "ecg", "hl7"}
        for path in [root, *root.rglob("*")]:
            expected = 0o700 if path.is_dir() else 0o600
            assert stat.S_IMODE(path.stat().st_mode) == expected, (path, oct(path.stat().st_mode))


def _login(http: str, username: str, password: str, **headers: str) -> httpx.Response:
    return httpx.post(
        http + _LOGIN,
        data={"username": username, "password": password},
        headers=headers,
        timeout=60,
    )


@pytest.mark.task_free  # answers and audit rows of rdc serve itself
def test_login_throttling_revocation_origin_and_audit(
    server: RdcServer, alliance: dict[str, str], tmp_path: Path
) -> None:
    http = server.http
    # Per username: five failures, then 429 even with the right password.
    for n in range(5):  # from five addresses: only the username reaches the limit
        forwarded = {"X-Forwarded-For": f"198.51.100.{n}"}
        assert _login(http, "reader", "wrong-password", **forwarded).status_code == 401
    locked = _login(http, "reader", alliance["reader"])
    assert locked.status_code == 429 and int(locked.headers["retry-after"]) > 0
    ui_locked = httpx.post(
        http + "/login",
        data={"username": "reader", "password": alliance["reader"]},
        timeout=HTTP_TIMEOUT,
    )
    assert ui_locked.status_code == 429 and "rdc_session" not in ui_locked.headers.get(
        "set-cookie", ""
    )
    # The lock is in the database: a second replica (rdc serve --role web on the same
    # database) refuses too.
    env = {**server.env, "RDC_HTTP_PORT": str(free_port()), "RDC_DICOM_PORT": str(free_port())}
    with RdcServer(env, tmp_path / "replica.log", "--role", "web", workers=False) as replica:
        assert _login(replica.http, "reader", alliance["reader"]).status_code == 429
    failed = _audit(server, "login_failed")
    assert len(failed) == 5 and failed[0]["detail"]["username"] == "reader"
    assert _audit(server, "login_locked")

    # Guesses sent at once cannot all slip past the count: each is recorded before its
    # password is checked, so of 12 parallel guesses at most 5 are checked at all.
    barrier = threading.Barrier(12)

    def guess(n: int) -> int:
        barrier.wait()
        forwarded = {"X-Forwarded-For": f"192.0.2.{n}"}
        return _login(http, "ghost", f"guess-{n}", **forwarded).status_code

    with ThreadPoolExecutor(12) as pool:
        codes = sorted(pool.map(guess, range(12)))
    assert codes == [401] * 5 + [429] * 7, codes
    assert _login(http, "ghost", "guess-99").status_code == 429

    # Per client address (behind the ingress: X-Forwarded-For from a trusted proxy, here
    # the default RDC_FORWARDED_ALLOW_IPS=127.0.0.1): five failures with different usernames
    # lock the address, not the users elsewhere.
    for n in range(5):
        assert (
            _login(http, f"nobody{n}", "x", **{"X-Forwarded-For": "203.0.113.7"}).status_code == 401
        )
    assert (
        _login(http, "admin", alliance["admin"], **{"X-Forwarded-For": "203.0.113.7"}).status_code
        == 429
    )
    assert (
        _login(http, "admin", alliance["admin"], **{"X-Forwarded-For": "203.0.113.8"}).status_code
        == 200
    )

    # The cookie behind the ingress: Secure when the trusted proxy (RDC_FORWARDED_ALLOW_IPS,
    # default 127.0.0.1) says https, not on plain development HTTP.
    form = {"username": "admin", "password": alliance["admin"]}
    plain = httpx.post(http + "/login", data=form, timeout=HTTP_TIMEOUT)
    assert plain.status_code == 303 and "secure" not in plain.headers["set-cookie"].lower()
    proxied = httpx.post(
        http + "/login", data=form, headers={"X-Forwarded-Proto": "https"}, timeout=HTTP_TIMEOUT
    )
    assert proxied.status_code == 303 and "secure" in proxied.headers["set-cookie"].lower()

    # Origin: null (a sandboxed frame) and other sites cannot log in.
    for origin in ("null", "https://evil.example"):
        assert _login(http, "admin", alliance["admin"], Origin=origin).status_code == 403
        page = httpx.post(
            http + "/login",
            data={"username": "admin", "password": alliance["admin"]},
            headers={"Origin": origin},
            timeout=HTTP_TIMEOUT,
        )
        assert page.status_code == 403 and "rdc_session" not in page.headers.get("set-cookie", "")
    refused_origins = [
        d["detail"]["origin"] for d in _audit(server, "access_denied") if "origin" in d["detail"]
    ]
    assert refused_origins == ["null", "null", "https://evil.example", "https://evil.example"]

    # Revocation: logout (API) ends every token of the user at once.
    first, second = (
        server.token("senior", alliance["senior"]),
        server.token("senior", alliance["senior"]),
    )
    bearer = {"Authorization": f"Bearer {first}"}
    assert httpx.get(http + "/api/v1/me", headers=bearer, timeout=HTTP_TIMEOUT).status_code == 200
    assert (
        httpx.post(http + "/api/v1/auth/logout", headers=bearer, timeout=HTTP_TIMEOUT).status_code
        == 204
    )
    for token in (first, second):
        gone = httpx.get(
            http + "/api/v1/me", headers={"Authorization": f"Bearer {token}"}, timeout=HTTP_TIMEOUT
        )
        assert gone.status_code == 401 and "revoked" in gone.json()["detail"]
    # The UI's logout too.
    cookie_token = server.token("senior", alliance["senior"])
    httpx.post(
        http + "/logout",
        cookies={"rdc_session": cookie_token},
        headers={"X-Requested-With": "rdc"},
        timeout=HTTP_TIMEOUT,
    )
    assert (
        httpx.get(
            http + "/api/v1/me",
            headers={"Authorization": f"Bearer {cookie_token}"},
            timeout=HTTP_TIMEOUT,
        ).status_code
        == 401
    )

    # Password reset (rdc user add for an existing user) revokes the old tokens.
    old = server.token("tech_a", alliance["tech_a"])
    rdc_cli(
        server.env,
        "user", "add", "--username", "tech_a", "--role", "technician", "--org", "CLINIC_A",
        "--password-stdin",
        input="a-new-password-123\n",
    )  # fmt: skip
    assert (
        httpx.get(
            http + "/api/v1/me", headers={"Authorization": f"Bearer {old}"}, timeout=HTTP_TIMEOUT
        ).status_code
        == 401
    )
    assert _login(http, "tech_a", "a-new-password-123").status_code == 200
    assert _audit(server, "reset_password")[-1]["detail"]["username"] == "tech_a"

    # rdc user disable: every token fails, no more logins.
    tech_b = server.token("tech_b", alliance["tech_b"])
    rdc_cli(server.env, "user", "disable", "tech_b")
    assert (
        httpx.get(
            http + "/api/v1/me", headers={"Authorization": f"Bearer {tech_b}"}, timeout=HTTP_TIMEOUT
        ).status_code
        == 401
    )
    assert _login(http, "tech_b", alliance["tech_b"]).status_code == 401
    assert rdc_cli(server.env, "user", "disable", "nobody", check=False).returncode == 1

    # POST /api/v1/users/{username}/disable: administrators only (a refusal is audited).
    senior = server.client("senior", alliance["senior"])
    refused = senior.post("/api/v1/users/tech_a/disable")
    assert refused.status_code == 403
    admin = server.client("admin", alliance["admin"])
    tech_a = server.token("tech_a", "a-new-password-123")
    done = admin.post("/api/v1/users/tech_a/disable")
    assert done.status_code == 200 and done.json() == {"username": "tech_a", "active": False}
    assert (
        httpx.get(
            http + "/api/v1/me", headers={"Authorization": f"Bearer {tech_a}"}, timeout=HTTP_TIMEOUT
        ).status_code
        == 401
    )
    assert admin.post("/api/v1/users/nobody/disable").status_code == 404
    disabled_by = [r["actor"] for r in _audit(server, "user.disable")]
    assert len(disabled_by) == 2 and disabled_by[0].startswith("cli")
    assert disabled_by[1] == "user:admin"

    # Refusals in the audit trail: 403 with who was refused, 401 as anonymous.
    denied = _audit(server, "access_denied")
    assert any(
        d["actor"] == "user:senior" and d["object_id"] == "POST /api/v1/users/tech_a/disable"
        for d in denied
    )
    assert (
        httpx.get(
            http + "/api/v1/worklist",
            headers={"Authorization": "Bearer forged"},
            timeout=HTTP_TIMEOUT,
        ).status_code
        == 401
    )
    unknown = _audit(server, "authentication_failed")
    assert unknown[-1]["object_id"] == "GET /api/v1/worklist"
    assert unknown[-1]["actor"].startswith("anonymous@")

    # Configuration changes made through the CLI are audited.
    rdc_cli(
        server.env,
        "clinic",
        "add",
        "--code",
        "CLINIC_C",
        "--name",
        "Clinic C",
        "--ae",
        "CLINIC_C_US",
    )
    configured = _audit(server, "configure")
    assert any(
        c["object_type"] == "organization" and c["detail"]["code"] == "CLINIC_C" for c in configured
    )


def _production_env(rdc_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return {
        **rdc_env,
        "RDC_ENV": "production",
        "RDC_SECRET_KEY": secrets.token_urlsafe(32),
        "RDC_PASSWORD_HASH_ROUNDS": "12",
        "RDC_DATABASE_URL": rdc_env.get("RDC_DATABASE_URL")
        or f"sqlite:///{tmp_path / 'prod' / 'rdc.sqlite3'}",
    }


def test_production_rules_and_files_at_rest(rdc_env: dict[str, str], tmp_path: Path) -> None:
    prod = _production_env(rdc_env, tmp_path)
    # A short or non-random secret key is refused (a token signed with "x" was forged).
    for weak in ("x", "x" * 40, "abababababababababababababababababab", "short-but-random-9f3k"):
        refused = rdc_cli({**prod, "RDC_SECRET_KEY": weak}, "db", "upgrade", check=False)
        assert refused.returncode != 0
        assert "RDC_SECRET_KEY must be at least 32 random bytes" in refused.stderr + refused.stdout
    rdc_cli(prod, "org", "add", "--code", "LEAD", "--name", "Lead", "--kind", "lead")
    add = (
        "user",
        "add",
        "--username",
        "u1",
        "--role",
        "admin",
        "--org",
        "LEAD",
        "--password-stdin",
    )
    short = rdc_cli(prod, *add, input="nine-char\n", check=False)
    assert short.returncode == 1 and "shorter than 10" in short.stderr
    longer = rdc_cli(
        {**prod, "RDC_PASSWORD_MIN_LENGTH": "16"}, *add, input="fifteen-chars-x\n", check=False
    )
    assert longer.returncode == 1 and "shorter than 16" in longer.stderr
    lower = rdc_cli({**prod, "RDC_PASSWORD_MIN_LENGTH": "8"}, "db", "upgrade", check=False)
    assert lower.returncode != 0  # configurable upward only
    rdc_cli(prod, *add, input="ten-chars!\n")

    # The production server: Secure cookie although the request came over plain HTTP from
    # a proxy that is not trusted (RDC_FORWARDED_ALLOW_IPS reaches uvicorn: 127.0.0.1 is
    # not in it, so its X-Forwarded-For is ignored and failures count against 127.0.0.1).
    prod["RDC_FORWARDED_ALLOW_IPS"] = "192.0.2.1"
    with RdcServer(prod, tmp_path / "prod.log") as server:
        ok = httpx.post(
            server.http + "/login",
            data={"username": "u1", "password": "ten-chars!"},
            headers={"X-Forwarded-Proto": "http"},
            timeout=HTTP_TIMEOUT,
        )
        assert ok.status_code == 303 and "secure" in ok.headers["set-cookie"].lower()
        for n in range(5):
            assert (
                _login(
                    server.http, f"x{n}", "y", **{"X-Forwarded-For": f"198.51.100.{n}"}
                ).status_code
                == 401
            )
        assert (
            _login(
                server.http, "u1", "ten-chars!", **{"X-Forwarded-For": "198.51.100.99"}
            ).status_code
            == 429
        )

    # Files at rest: the data directory 0700 (local objects), the SQLite database 0600.
    if rdc_env.get("RDC_STORAGE_BACKEND", "local") == "local":
        data_dir = Path(rdc_env["RDC_DATA_DIR"])
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    if "RDC_DATABASE_URL" not in rdc_env:  # embedded: SQLite files
        database = tmp_path / "prod" / "rdc.sqlite3"
        assert stat.S_IMODE(database.parent.stat().st_mode) == 0o700
        for path in [database, *database.parent.glob("rdc.sqlite3-*")]:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_development_data_directory_is_private(rdc_env: dict[str, str]) -> None:
    """The first command on a fresh embedded deployment creates the data directory 0700 and
    the SQLite database 0600, whatever the umask (the test process's is 022). On every pass:
    the files under test are the embedded stack's."""
    env = {k: v for k, v in rdc_env.items() if k != "RDC_DATABASE_URL"}
    rdc_cli(env, "org", "add", "--code", "LEAD", "--name", "Lead", "--kind", "lead")
    data_dir = Path(env["RDC_DATA_DIR"])
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    files = [p for p in data_dir.glob("rdc.sqlite3*") if "lock" not in p.name]
    assert files
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
