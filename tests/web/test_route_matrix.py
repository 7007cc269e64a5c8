"""Every route of the OpenAPI description, authorised by role and organisation, audited.

The routes are discovered from the live ``/openapi.json`` of one server, so routes added
later are covered without touching this module. The server holds clinic A's CT (C-STORE from
CLINIC_A_CT, read and signed by the lead hospital's reader) and clinic A's aECG (uploaded by
clinic A's technician). For each operation:

- without credentials: 401, unless the route is in ``PUBLIC`` (each with its reason);
- as clinic B's technician and clinic B's clinician, with the path parameters naming clinic
  A's objects (the CT's exam, study, series and instance, the ECG exam, the signed report,
  the work item, the person, clinic A's code, clinic A's user...): never 2xx for a path
  naming clinic A's object (an empty search aside), and no answer (lists too, also filtered
  by clinic A's code, exam or patient) carrying clinic A's patient ID or name unless the
  caller sent it; other methods, with the smallest body their schema accepts (and the
  caller's own signing password), never 2xx and change nothing (the admin's view of clinic
  A's objects and of the configuration is the same before and after);
- as a lead-hospital user (reader, else admin) and as clinic A's technician, every GET that
  answers with clinic A's patient data leaves an audit record of that user (read from the
  audit table); one whose path names a patient's object records that object;
- nothing answers a server error.

A path or required query parameter the module does not know fails the test with its
route's name, unless it is in ``MADE_UP`` (a made-up value, which must then answer 4xx).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pydicom
import pytest

from tests.helpers import (
    Deployments,
    RdcServer,
    alliance_passwords,
    rdc_cli,
    storescu,
    wait_for,
)

# Routes anyone may call (no 401 expected without credentials).
PUBLIC: dict[tuple[str, str], str] = {
    ("GET", "/healthz"): "load balancer health check",
    ("GET", "/livez"): "orchestrator liveness probe",
    ("GET", "/readyz"): "orchestrator readiness probe",
    ("GET", "/metrics"): "Prometheus scrape; counters only, no patient data",
    ("POST", "/api/v1/auth/token"): "the login itself",
    ("POST", "/api/v1/verify"): "anyone holding a report document may check its signature",
}

# Path parameters that name nothing the fixture creates: a made-up value, answering 4xx.
MADE_UP: dict[str, str] = {
    "endpoint_id": "no delivery endpoint is configured in this deployment",
    "alert_id": "no critical value is raised by the CT or ECG",
    "notification_id": "no notification is raised by the fixture",
    "decision_id": "no recognition decision is made by the fixture",
    "path": "DICOMweb bulk data of CT_small is inline, no bulk data URI",
    "entry_id": "the fixture's lab order is coded in the catalogue: no code waits for a mapping",
}

# Operations clinic B's user is not sent (other than GET), with the reason.
NOT_SENT_AS_CLINIC_B: dict[tuple[str, str], str] = {
    ("POST", "/api/v1/auth/logout"): "logs the caller out (its own token only): test_hardening",
    ("POST", "/api/v1/auth/token"): "the login: test_hardening",
    ("POST", "/api/v1/verify"): "public signature check: test_signing_api",
}

# Parameters that name clinic A's patient data: a 2xx GET naming them must be audited.
PATIENT_PARAMS = {"exam_id", "report_id", "study", "series", "sop", "person_id", "order_id"}
PATIENT_QUERY = {"identifier", "patient_id"}  # required query parameters naming a patient

_CLIENT_TIMEOUT = 60


@dataclass
class World:
    server: RdcServer
    passwords: dict[str, str]
    tokens: dict[str, str]
    params: dict[str, str]
    ecg_exam: str
    secrets: list[str]  # clinic A's patient IDs and names
    query: dict[str, str]  # required query parameters by name
    schemas: dict[str, Any]  # the OpenAPI components' schemas
    routes: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    def client(self, who: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        return httpx.Client(base_url=self.server.http, headers=headers, timeout=_CLIENT_TIMEOUT)


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, deployments: Deployments, testdata: Path, dcmtk: Path
) -> Iterator[World]:
    """One server: clinic A's CT (read and signed by the lead hospital) and clinic A's ECG."""
    workdir = tmp_path_factory.mktemp("route-matrix")
    with deployments.env(workdir) as env:
        # Clinic A's laboratory sends as "ELAB-3" (the shared glucose ORU's MSH-4).
        rdc_cli(env, "clinic", "add", "--code", "CLINIC_A", "--update", "--hl7-facility", "ELAB-3")
        with RdcServer(env, workdir / "serve.log") as server:
            yield _populate(server, alliance_passwords(), testdata, dcmtk)


def _populate(server: RdcServer, passwords: dict[str, str], testdata: Path, dcmtk: Path) -> World:
    ct = testdata / "dicom" / "CT_small.dcm"
    for result in storescu(dcmtk, [ct], port=server.dicom_port, calling_ae="CLINIC_A_CT"):
        assert result.returncode == 0, result.stderr
    tokens = {who: server.token(who, pw) for who, pw in passwords.items()}
    base = server.http
    # Clinic B's clinician too: a role that may read reports, so the organisation check
    # (not only the role check) is what refuses clinic A's.
    passwords = {**passwords, "doctor_b": "pw-doctor_b-123"}
    with httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {tokens['admin']}"}, timeout=60
    ) as admin:
        created = admin.post(
            "/api/v1/users",
            json={
                "username": "doctor_b",
                "password": passwords["doctor_b"],
                "role": "clinician",
                "org_code": "CLINIC_B",
            },
        )
        assert created.status_code in (200, 201), created.text
    tokens["doctor_b"] = server.token("doctor_b", passwords["doctor_b"])

    def as_(who: str) -> httpx.Client:
        return httpx.Client(
            base_url=base,
            headers={"Authorization": f"Bearer {tokens[who]}"},
            timeout=_CLIENT_TIMEOUT,
        )

    with as_("tech_a") as tech_a:
        aecg = testdata / "ecg" / "aecg" / "Example_aECG.xml"
        uploaded = tech_a.post(
            "/api/v1/ecg", files=[("file", (aecg.name, aecg.read_bytes(), "application/xml"))]
        )
        assert uploaded.status_code == 201, uploaded.text
        ecg_exam = str(uploaded.json()["exam_id"])
        oru = (testdata / "hl7" / "pythonhl7_oru_r01_glucose.hl7").read_bytes()
        ack = tech_a.post(
            "/api/v1/lab/messages", content=oru, headers={"Content-Type": "application/hl7-v2"}
        )
        assert ack.status_code == 200 and b"MSA|AA" in ack.content, ack.text
        orders = wait_for(
            lambda: tech_a.get("/api/v1/lab/orders", params={"clinic": "CLINIC_A"}).json() or None,
            timeout=120,
            what="clinic A's lab order processed",
        )
        lab_order = str(orders[0]["id"])  # the order's ID is its exam's
        lab_result = str(tech_a.get(f"/api/v1/lab/orders/{lab_order}").json()["results"][0]["id"])

    ds = pydicom.dcmread(ct, stop_before_pixels=True)
    with as_("reader") as reader, as_("admin") as admin:
        items = wait_for(
            lambda: (
                [
                    i
                    for i in reader.get("/api/v1/worklist").json()["items"]
                    if i["exam_id"] not in (ecg_exam, lab_order)
                ]
                or None
            ),
            timeout=120,
            what="the CT on the worklist",
        )
        item = items[0]
        exam_id = str(item["exam_id"])
        assert reader.post(f"/api/v1/worklist/{item['id']}/claim").status_code == 200
        saved = reader.put(
            f"/api/v1/exams/{exam_id}/report",
            json={"findings": "两肺纹理清晰", "impression": "未见异常", "quality_grade": "甲"},
        )
        assert saved.status_code == 200, saved.text
        signed = reader.post(
            f"/api/v1/exams/{exam_id}/report/submit",
            json={"signing_password": passwords["reader"]},
        )
        assert signed.status_code == 200, signed.text
        report_id = str(signed.json()["id"])
        exams = [admin.get(f"/api/v1/exams/{e}").json() for e in (exam_id, ecg_exam, lab_order)]
        ct_patient = exams[0]["patient"]
        person = admin.get(
            "/api/v1/patients",
            params={"identifier": f"{ct_patient['issuer']}|{ct_patient['patient_id']}"},
        )
        assert person.status_code == 200, person.text
    secrets = {str(ds.PatientID), str(ds.PatientName)}
    for exam in exams:
        patient = exam.get("patient") or {}
        for key in ("patient_id", "name", "patient_name"):
            for source in (exam, patient):
                value = source.get(key)
                if isinstance(value, str) and len(value) >= 4:
                    secrets.add(value)
    params = {
        "exam_id": exam_id,
        "item_id": str(item["id"]),
        "report_id": report_id,
        "study": str(ds.StudyInstanceUID),
        "series": str(ds.SeriesInstanceUID),
        "sop": str(ds.SOPInstanceUID),
        "frames": "1",
        "frame": "1",
        "person_id": str(person.json()["id"]),
        "org_code": "CLINIC_A",
        "code": "CLINIC_A",  # /clinics/{code}; QC indicators' codes are made up below
        "username": "tech_a",
        "order_id": lab_order,
        "result_id": lab_result,
    }
    with httpx.Client(base_url=base, timeout=_CLIENT_TIMEOUT) as anonymous:
        spec = anonymous.get("/openapi.json").json()
    routes = [
        (method.upper(), path, op)
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
        if method in {"get", "post", "put", "patch", "delete"}
    ]
    query = {
        "identifier": f"{ct_patient['issuer']}|{ct_patient['patient_id']}",
        "patient_id": str(ct_patient["patient_id"]),
        "prior": ecg_exam,
        "month": datetime.now(UTC).strftime("%Y-%m"),
    }
    schemas = spec.get("components", {}).get("schemas", {})
    return World(
        server, passwords, tokens, params, ecg_exam, sorted(secrets), query, schemas, routes
    )


def _fill(world: World, method: str, path: str, op: dict[str, Any]) -> str:
    """The route's URL, its path parameters naming clinic A's objects, its required query
    parameters filled (clinic A's patient where they name one)."""
    url = path
    query: dict[str, str] = {}
    for param in op.get("parameters", []):
        name = param["name"]
        if param["in"] == "query":
            if not param.get("required"):
                continue
            enum = param.get("schema", {}).get("enum")
            if enum:
                query[name] = str(enum[0])
            elif name in world.query:
                query[name] = world.query[name]
            else:
                pytest.fail(
                    f"{method} {path}: required query parameter {name!r} is unknown to the "
                    "route matrix; give it a value in _populate (World.query)"
                )
            continue
        if param["in"] != "path":
            continue
        if name == "exam_id" and path.startswith("/api/v1/ecg/"):
            value = world.ecg_exam
        elif name == "exam_id" and path.startswith("/api/v1/lab/"):
            value = world.params["order_id"]  # a lab order's ID is its exam's
        elif name == "code" and path.startswith("/api/v1/qc/"):
            value = "NO_SUCH_INDICATOR"
        elif name in world.params:
            value = world.params[name]
        elif name in MADE_UP:
            value = f"made-up-{name}"
        else:
            pytest.fail(
                f"{method} {path}: path parameter {name!r} is unknown to the route matrix; "
                "map it to a clinic A object in _populate or add it to MADE_UP with a reason"
            )
        url = url.replace("{" + name + "}", value)
    return str(httpx.URL(url, params=query)) if query else url


def _minimal_body(world: World, op: dict[str, Any], password: str) -> Any:
    """The smallest JSON body the operation's schema accepts (required fields only, and the
    caller's own signing password), so that the call gets past validation and the signature
    check to the authorisation; {} when it takes no JSON."""
    content = op.get("requestBody", {}).get("content", {})
    schema = content.get("application/json", {}).get("schema")
    if schema is None:
        return {}
    body = _minimal(world.schemas, schema, depth=0)
    if body is None:  # an optional body
        body = {}
    if isinstance(body, dict) and "signing_password" in _properties(world.schemas, schema):
        body["signing_password"] = password
    return body


def _properties(schemas: dict[str, Any], schema: dict[str, Any]) -> set[str]:
    if "$ref" in schema:
        return _properties(schemas, schemas[schema["$ref"].rsplit("/", 1)[-1]])
    options = schema.get("anyOf", []) + schema.get("oneOf", []) + schema.get("allOf", [])
    return set(schema.get("properties", {})).union(*(_properties(schemas, o) for o in options))


def _minimal(schemas: dict[str, Any], schema: dict[str, Any], depth: int) -> Any:
    if "$ref" in schema:
        return _minimal(schemas, schemas[schema["$ref"].rsplit("/", 1)[-1]], depth + 1)
    if depth > 8:
        return None
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            options = [o for o in schema[key] if o.get("type") != "null"] or schema[key]
            return _minimal(schemas, options[0], depth + 1)
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type", "object")
    if kind == "object":
        props = schema.get("properties", {})
        return {
            name: _minimal(schemas, props.get(name, {}), depth + 1)
            for name in schema.get("required", [])
        }
    if kind == "array":
        count = schema.get("minItems", 0)
        return [_minimal(schemas, schema.get("items", {}), depth + 1) for _ in range(count)]
    if kind in ("integer", "number"):
        return max(1, schema.get("minimum", 1))
    if kind == "boolean":
        return False
    return "x" * max(1, schema.get("minLength", 1)) if kind == "string" else None


def _scoping_query(world: World, op: dict[str, Any]) -> dict[str, str]:
    """The optional query parameters of ``op`` that name clinic A or its objects."""
    values = {
        "clinic": "CLINIC_A",
        "org": "CLINIC_A",
        "issuer": "CLINIC_A",
        "exam_id": world.params["exam_id"],
        "exam": world.params["exam_id"],
        "patient": world.query["patient_id"],
        "patient_name": next(s for s in world.secrets if "^" in s),
    }
    return {
        p["name"]: values[p["name"]]
        for p in op.get("parameters", [])
        if p["in"] == "query" and not p.get("required") and p["name"] in values
    }


def _required_query(op: dict[str, Any]) -> set[str]:
    return {p["name"] for p in op.get("parameters", []) if p["in"] == "query" and p.get("required")}


def _path_params(op: dict[str, Any]) -> set[str]:
    return {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}


def _excerpt(response: httpx.Response) -> str:
    kind = response.headers.get("content-type", "")
    textual = "json" in kind or kind.startswith("text/") or "xml" in kind
    return response.text[:300] if textual else f"<{kind}, {len(response.content)} bytes>"


def _empty_search(response: httpx.Response) -> bool:
    """A search (QIDO-RS within a study) finding nothing: 204, or 200 with no match."""
    return response.status_code == 204 or response.content.strip() in (b"", b"[]")


def _leaks(world: World, response: httpx.Response) -> list[str]:
    """Clinic A's patient IDs and names in the answer, other than those the caller sent
    (a search echoing what it was asked is no leak)."""
    text = response.content.decode("utf-8", "replace")
    asked = unquote(str(response.request.url))
    return [s for s in world.secrets if s in text and s not in asked]


def test_routes_need_credentials(world: World) -> None:
    listed = {(method, path) for method, path, _ in world.routes}
    assert set(PUBLIC) <= listed, f"stale PUBLIC entries: {set(PUBLIC) - listed}"
    wrong: list[str] = []
    with world.client(None) as anonymous:
        for method, path, op in world.routes:
            response = anonymous.request(method, _fill(world, method, path, op))
            expected = (method, path) in PUBLIC
            if response.status_code >= 500 or (not expected and response.status_code != 401):
                wrong.append(f"{method} {path}: {response.status_code} {_excerpt(response)}")
            if not expected and _leaks(world, response):
                wrong.append(f"{method} {path}: anonymous answer names clinic A's patient")
    assert not wrong, "\n".join(wrong)


_STATE_VIEWS = [
    "/api/v1/exams/{exam_id}",
    "/api/v1/exams/{exam_id}/report",
    "/api/v1/reports/{report_id}",
    "/api/v1/ecg/{ecg_exam}",
    "/api/v1/exams/{ecg_exam}",
    "/api/v1/worklist",
    "/api/v1/users",
    "/api/v1/clinics",
    "/api/v1/critical-contacts/CLINIC_A",
    "/api/v1/delivery-endpoints",
    "/api/v1/routing-rules",
    "/api/v1/sla-targets",
    "/api/v1/qc/targets",
    "/api/v1/critical-duty",
    "/api/v1/patients/{person_id}",
]

# Fields that change on their own (clocks, counters of views).
_VOLATILE = {
    "server_time",
    "now",
    "age_seconds",
    "sla_remaining_seconds",
    "waiting_seconds",
    "generated_at",
}


def _stable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _state(world: World) -> dict[str, Any]:
    names = {**world.params, "ecg_exam": world.ecg_exam}
    with world.client("admin") as admin:
        state = {}
        for view in _STATE_VIEWS:
            response = admin.get(view.format(**names))
            assert response.status_code in (200, 404), (view, response.status_code)
            state[view] = [response.status_code, _stable(response.json())]
        return state


@pytest.mark.parametrize("who", ["tech_b", "doctor_b"])
def test_clinic_b_never_reaches_clinic_a(world: World, who: str) -> None:
    before = _state(world)
    wrong: list[str] = []
    answered: list[str] = []
    with world.client(who) as tech_b:
        for method, path, op in world.routes:
            if method != "GET" and (method, path) in NOT_SENT_AS_CLINIC_B:
                continue
            url = _fill(world, method, path, op)
            if method == "GET":
                scoping = _scoping_query(world, op)
                if scoping:  # the list filtered to clinic A's objects: still none of them
                    filtered = tech_b.get(url, params=scoping)
                    if filtered.status_code >= 500 or _leaks(world, filtered):
                        wrong.append(
                            f"GET {path}?{scoping} as {who}: {filtered.status_code} "
                            f"{_leaks(world, filtered)} {_excerpt(filtered)}"
                        )
                response = tech_b.get(url)
            else:
                body = _minimal_body(world, op, world.passwords[who])
                response = tech_b.request(method, url, json=body)
            status = response.status_code
            if status < 300:
                answered.append(path)
            where = f"{method} {path} as {who}: {status}"
            if status >= 500:
                wrong.append(f"{where} (server error) {_excerpt(response)}")
            elif method != "GET" and status < 300:
                wrong.append(f"{where}: another clinic's user changed something")
            elif _path_params(op) and status < 300 and not _empty_search(response):
                wrong.append(f"{where}: answered for clinic A's object {_excerpt(response)}")
            if leaked := _leaks(world, response):
                wrong.append(
                    f"{where}: answer names clinic A's patient {leaked} {response.text[:300]}"
                )
        # The calls were made as a signed-in clinic B user, whose own lists do answer.
        assert tech_b.get("/api/v1/me").status_code == 200
    assert not wrong, "\n".join(wrong)
    assert "/api/v1/exams" in answered, answered
    after = _state(world)
    changed = [view for view in before if before[view] != after[view]]
    assert not changed, [(v, _differences(before[v], after[v])) for v in changed]


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in _differences(a.get(k), b.get(k), f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        pairs = enumerate(zip(a, b, strict=True))
        return [d for i, (x, y) in pairs for d in _differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} -> {b!r}"]


def _last_seq(world: World) -> int:
    with world.server.db() as db:
        row = db.execute("SELECT MAX(seq) AS seq FROM audit_events").fetchone()
    return int(row["seq"] or 0) if row else 0


def _records_since(world: World, who: str, seq: int) -> list[str]:
    """The audit records ``who`` left after ``seq``, each as its object and detail."""
    with world.server.db() as db:
        rows = db.execute(
            "SELECT object_type, object_id, detail FROM audit_events "
            "WHERE actor = ? AND seq > ? ORDER BY seq",
            (f"user:{who}", seq),
        ).fetchall()
    return [
        f"{r['object_type']} {r['object_id']} "
        + (r["detail"] if isinstance(r["detail"], str) else json.dumps(r["detail"]))
        for r in rows
    ]


def test_reading_clinic_a_patient_data_is_audited(world: World) -> None:
    """Every GET that answers a lead-hospital user or clinic A's own user with clinic A's
    patient data leaves an audit record of that user; one naming a patient's object records
    that object."""
    objects = [
        world.ecg_exam,
        world.query["patient_id"],
        *(world.params[k] for k in (*PATIENT_PARAMS, "item_id")),
    ]
    wrong: list[str] = []
    audited: list[str] = []
    for method, path, op in world.routes:
        lead_answered = False
        if method != "GET":
            continue
        url = _fill(world, method, path, op)
        scoped = bool(_path_params(op) & PATIENT_PARAMS or _required_query(op) & PATIENT_QUERY)
        # The lead hospital's reader, else its administrator; and clinic A's own technician.
        for who in ("reader", "admin", "tech_a"):
            if who == "admin" and lead_answered:
                continue
            before = _last_seq(world)
            with world.client(who) as client:
                response = client.get(url)
            status = response.status_code
            if status >= 500:
                wrong.append(f"GET {path} as {who}: {status} (server error)")
            if status == 403:
                continue  # not this role's: the next one
            lead_answered = who == "reader"
            if _path_params(op) & set(MADE_UP) and status < 300:
                wrong.append(f"GET {path} as {who}: {status} for a made-up object")
            text = response.content.decode("utf-8", "replace")
            if status < 300 and (scoped or any(s in text for s in world.secrets)):
                records = _records_since(world, who, before)
                if not records:
                    wrong.append(f"GET {path} as {who}: {status}, clinic A's data, no audit")
                elif scoped and not any(o in r for o in objects for r in records):
                    wrong.append(f"GET {path} as {who}: audit names no object: {records}")
                else:
                    audited.append(path)
    assert not wrong, "\n".join(wrong)
    # The fixture's objects are real: the main reads did answer and were audited.
    for path in (
        "/api/v1/exams",
        "/api/v1/exams/{exam_id}",
        "/api/v1/ecg/{exam_id}",
        "/api/v1/reports/{report_id}",
        "/api/v1/patients/{person_id}",
        "/dicomweb/studies/{study}/metadata",
    ):
        assert path in audited, (path, audited)


_MAX_FAILURES = 5  # RDC_AUTH_MAX_FAILURES (the default) within RDC_AUTH_LOCKOUT_SECONDS
# The signing operations the issue names (more may come: every operation whose JSON body
# takes ``signing_password`` is tried below).
_SIGNING_ROUTES = {
    ("POST", "/api/v1/exams/{exam_id}/report/submit"),
    ("POST", "/api/v1/reports/{report_id}/verify-by-senior"),
    ("POST", "/api/v1/reports/{report_id}/amend"),
    ("POST", "/api/v1/lab/exams/{exam_id}/sign"),
}


def test_every_signature_needs_the_signers_password(world: World) -> None:
    """Every operation that signs (imaging, ECG and lab reports; submit, verify, amend) as
    the lead hospital's senior reader, who may sign: without ``signing_password`` and with a
    wrong one 403 (audited), nothing signed; the fifth wrong password locks signing for the
    user on every one of them, the right password included: 429 with Retry-After. Runs last
    in the module (it locks the senior's signing)."""
    signing = [
        (method, path, op)
        for method, path, op in world.routes
        if method != "GET"
        and "signing_password"
        in _properties(
            world.schemas,
            op.get("requestBody", {})
            .get("content", {})
            .get("application/json", {})
            .get("schema", {}),
        )
    ]
    assert {(m, p) for m, p, _ in signing} >= _SIGNING_ROUTES, signing
    calls = [(method, _fill(world, method, path, op), op) for method, path, op in signing]
    submit = next(op for m, p, op in signing if p.endswith("/report/submit"))
    calls.append(("POST", f"/api/v1/exams/{world.ecg_exam}/report/submit", submit))  # the ECG's
    before = _state(world)
    seq = _last_seq(world)
    wrong: list[str] = []
    failures = 0
    with world.client("senior") as senior:
        for method, url, op in calls:
            body = _minimal_body(world, op, "not-the-senior-password")
            without = {k: v for k, v in body.items() if k != "signing_password"}
            for attempt in (without, body):
                response = senior.request(method, url, json=attempt)
                failures += attempt is body
                # A missing password is refused before anything is counted or locked.
                expected = 429 if attempt is body and failures > _MAX_FAILURES else 403
                title = response.json().get("title") if response.content else None
                if response.status_code != expected or (
                    expected == 403 and title != "Signature refused"
                ):
                    wrong.append(f"{method} {url}: {response.status_code} {_excerpt(response)}")
        assert failures >= _MAX_FAILURES, "too few signing routes to reach the lock"
        for method, url, op in calls:
            body = _minimal_body(world, op, world.passwords["senior"])
            locked = senior.request(method, url, json=body)
            if locked.status_code != 429 or int(locked.headers.get("retry-after", 0)) <= 0:
                wrong.append(f"{method} {url} (locked): {locked.status_code} {_excerpt(locked)}")
    assert not wrong, "\n".join(wrong)
    after = _state(world)
    changed = [view for view in before if before[view] != after[view]]
    assert not changed, [(v, _differences(before[v], after[v])) for v in changed]
    with world.server.db() as db:
        refused = db.execute(
            "SELECT object_id FROM audit_events WHERE actor = ? AND action = ? AND seq > ?",
            ("user:senior", "sign_refused", seq),
        ).fetchall()
    assert len(refused) == 3 * len(calls), refused  # missing, wrong, locked: each audited
