"""The ``rdc`` command: run the service, manage the database, clinics and users, import data."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from rdc_core.errors import RDCError
from rdc_core.logging import configure_logging
from rdc_core.settings import Settings, get_settings, private_directory
from rdc_core.tasks import TaskRunner
from web.cli_admin import register_admin_commands, routing_app, sla_app
from web.cli_audit import audit_app
from web.cli_critical import critical_app
from web.cli_delivery import delivery_app
from web.cli_recognition import accreditation_app, catalog_app
from web.cli_signing import ca_app, cli_actor, verify_command

__all__ = ["main"]

app = typer.Typer(
    help="RDC — remote diagnostic centre of a medical alliance.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
clinic_app = typer.Typer(help="Member clinics.", no_args_is_help=True)
org_app = typer.Typer(help="Organisations (the lead hospital and clinics).", no_args_is_help=True)
user_app = typer.Typer(help="Users and roles.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(clinic_app, name="clinic")
app.add_typer(org_app, name="org")
app.add_typer(user_app, name="user")
app.add_typer(ca_app, name="ca")
app.add_typer(catalog_app, name="catalog")
app.add_typer(accreditation_app, name="accreditation")
app.add_typer(critical_app, name="critical")
app.add_typer(delivery_app, name="delivery")
app.add_typer(routing_app, name="routing")
app.add_typer(sla_app, name="sla")
app.add_typer(audit_app, name="audit")
app.command("verify")(verify_command)
register_admin_commands(clinic_app, user_app)

console = Console(stderr=True, soft_wrap=True)  # messages are never wrapped mid-line
log = logging.getLogger("rdc")


def _fail(message: str, code: int = 1) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply every pending schema migration."""
    from rdc_core.migrate import upgrade_database

    upgrade_database()
    console.print("database is at the latest schema")


def _add_org(
    code: str,
    name: str | None,
    kind_value: str,
    ae: list[str],
    hl7_facilities: list[str] | None = None,
    destinations: list[str] | None = None,
    tls_destinations: list[str] | None = None,
    *,
    update: bool = False,
    create: bool = True,
) -> None:
    """Create or (``update``) change an organisation; ``clinic add --update`` needs the
    clinic to exist (``create`` False), ``org add`` creates or renames."""
    from rdc_core.db import session_scope
    from rdc_core.migrate import upgrade_database
    from worklist.admin import save_organization
    from worklist.directory import find_organization
    from worklist.models import OrgKind
    from worklist.move_destinations import add_move_destination

    upgrade_database()
    try:
        with session_scope() as session:
            existing = find_organization(session, code=code)
            if update and existing is None and not create:
                _fail(f"no organisation with code {code!r}")
            if update and existing is not None:
                if existing.kind is not OrgKind(kind_value):
                    _fail(f"organisation {code} is a {existing.kind.value}, not a {kind_value}")
                name = name or existing.name
            if not name:
                _fail("--name is required (or give --update to change an existing clinic)")
            assert name is not None
            org = save_organization(
                session,
                principal=None,
                code=code,
                name=name,
                kind=OrgKind(kind_value),
                ae_titles=ae,
                hl7_facilities=hl7_facilities,
                update=update,
            )
            for spec in destinations or []:
                add_move_destination(session, org_code=code, spec=spec)
            for spec in tls_destinations or []:
                add_move_destination(session, org_code=code, spec=spec, tls=True)
    except RDCError as exc:
        _fail(str(exc))
    titles = ", ".join(org.ae_titles) or "none"
    facilities = ", ".join(org.hl7_facilities) or "none"
    console.print(
        f"{kind_value} {code} ({name}); AE titles: {titles}; HL7 facilities: {facilities}"
    )


@clinic_app.command("add")
def clinic_add(
    code: Annotated[str, typer.Option(help="short code, e.g. CLINIC_A")],
    name: Annotated[str | None, typer.Option(help="display name")] = None,
    ae: Annotated[
        list[str] | None, typer.Option(help="calling AE title of a modality (repeatable)")
    ] = None,
    hl7_facility: Annotated[
        list[str] | None,
        typer.Option(
            "--hl7-facility",
            help="HL7 sending facility (MSH-4 namespace ID or universal ID) of the clinic's "
            "LIS or analysers (repeatable)",
        ),
    ] = None,
    dicom_destination: Annotated[
        list[str] | None,
        typer.Option(help="C-MOVE destination of the clinic, AE@host:port (repeatable)"),
    ] = None,
    dicom_tls_destination: Annotated[
        list[str] | None,
        typer.Option(
            help="C-MOVE destination reached over DICOM TLS, AE@host:port (repeatable); "
            "the centre's RDC_DICOM_TLS_CERT/_KEY is presented, RDC_DICOM_TLS_CA verifies it"
        ),
    ] = None,
    update: Annotated[
        bool,
        typer.Option(
            "--update", help="change an existing clinic: rename, add AE titles / HL7 facilities"
        ),
    ] = False,
) -> None:
    """Register a member clinic, the AE titles its modalities call with and the HL7 sending
    facilities of its lab systems. An existing code is refused unless --update."""
    _add_org(
        code,
        name,
        "clinic",
        ae or [],
        hl7_facility or [],
        dicom_destination,
        dicom_tls_destination,
        update=update,
        create=not update,
    )


@org_app.command("add")
def org_add(
    code: Annotated[str, typer.Option()],
    name: Annotated[str, typer.Option()],
    kind: Annotated[str, typer.Option(help="lead or clinic")] = "clinic",
    ae: Annotated[list[str] | None, typer.Option(help="calling AE title (repeatable)")] = None,
) -> None:
    """Register an organisation; ``--kind lead`` creates the lead hospital (one per deployment)."""
    if kind not in ("lead", "clinic"):
        _fail("--kind must be lead or clinic")
    _add_org(code, name, kind, ae or [], update=True)


@user_app.command("add")
def user_add(
    username: Annotated[str, typer.Option()],
    role: Annotated[
        str, typer.Option(help="technician, clinician, reader, senior_reader, qc, admin")
    ],
    org: Annotated[str, typer.Option(help="organisation code")],
    level: Annotated[
        str | None, typer.Option(help="resident, attending or chief (readers)")
    ] = None,
    name: Annotated[str, typer.Option(help="display name")] = "",
    pool: Annotated[
        list[str] | None,
        typer.Option(help="reader pool this reader works from (repeat; none: all pools)"),
    ] = None,
    qualify: Annotated[
        list[str] | None,
        typer.Option(
            help="what this reader may read, DISCIPLINE[:MODALITY], e.g. imaging:CT "
            "(repeat; none: everything)"
        ),
    ] = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="read the password from stdin")
    ] = False,
) -> None:
    """Create a user (or reset their password and role)."""
    from pydantic import ValidationError

    from rdc_core.db import session_scope
    from rdc_core.migrate import upgrade_database
    from worklist.admin import create_user
    from worklist.admin.schemas import UserIn
    from worklist.models import ReaderLevel, Role

    try:
        role_value = Role(role.replace("-", "_"))
        level_value = ReaderLevel(level) if level else None
    except ValueError as exc:
        _fail(str(exc))
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    upgrade_database()
    try:
        with session_scope() as session:
            create_user(
                session,
                principal=None,
                replace=True,
                data=UserIn.model_validate(
                    {
                        "username": username,
                        "password": password,
                        "role": role_value,
                        "org_code": org,
                        "level": level_value,
                        "display_name": name,
                        "pools": pool,
                        "qualifications": [
                            dict(zip(("discipline", "modality"), q.split(":", 1), strict=False))
                            for q in qualify
                        ]
                        if qualify
                        else None,
                    }
                ),
            )
    except RDCError as exc:
        _fail(str(exc))
    except ValidationError as exc:
        _fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
    console.print(f"user {username}: {role_value.value} at {org}")


@user_app.command("disable")
def user_disable(username: Annotated[str, typer.Argument(help="the user to disable")]) -> None:
    """Disable a user: no more logins, and every token they hold fails at once."""
    from rdc_core.db import session_scope
    from rdc_core.migrate import upgrade_database
    from worklist.accounts import disable_user

    upgrade_database()
    try:
        with session_scope() as session:
            disable_user(session, username=username, principal=None, actor=cli_actor())
    except RDCError as exc:
        _fail(str(exc))
    console.print(f"user {username}: disabled; every token of theirs is revoked")


@app.command("demo")
def demo() -> None:
    """Seed a demo alliance (lead hospital, two clinics, users, studies); safe to run twice."""
    from rdc_core.migrate import upgrade_database
    from rdc_core.storage import get_object_store
    from web.demo import DEMO_PASSWORD, DEMO_USERS, seed_demo

    settings = get_settings()
    upgrade_database()
    stored = seed_demo(settings=settings, store=get_object_store(settings))
    console.print(f"demo alliance ready; {stored} new instances stored")
    console.print(
        "users: " + ", ".join(u.username for u in DEMO_USERS) + f"; password: {DEMO_PASSWORD}"
    )


@app.command("import")
def import_(
    paths: Annotated[list[Path], typer.Argument(help="files, folders or DICOMDIR")],
    clinic: Annotated[str, typer.Option(help="code of the clinic the data comes from")],
) -> None:
    """Bulk-import DICOM files through the same ingest service as C-STORE, and ECG records
    (a WFDB header with its signal files, HL7 aECG) through the ECG upload's intake."""
    from dicom_gateway.bulk_import import iter_dicom_files
    from dicom_gateway.ingest import InvalidDicomError, ingest_dicom_file
    from ecg_service.files import group_ecg_files
    from rdc_core.db import session_scope
    from rdc_core.migrate import upgrade_database
    from rdc_core.storage import get_object_store
    from rdc_core.tasks import InProcessTaskRunner
    from worklist.directory import get_organization, org_ref

    settings = get_settings()
    upgrade_database()
    store = get_object_store(settings)
    try:
        files = list(iter_dicom_files(paths))
    except (FileNotFoundError, OSError) as exc:
        _fail(str(exc))
    try:
        with session_scope() as session:
            org = org_ref(get_organization(session, code=clinic))
    except RDCError as exc:
        _fail(str(exc))
    dicom_files: list[Path] = []
    other: list[Path] = []
    for path in files:
        (dicom_files if _is_part10(path) else other).append(path)
    ecg = group_ecg_files(other)
    # A refused file (unreadable, inconsistent, another clinic's study ...) is skipped with
    # its reason; the import goes on and ends with the summary, exit 1 if any was refused.
    counts = {"stored": 0, "duplicate": 0, "conflict": 0, "refused": len(ecg.refused)}
    refused: list[str] = [f"{path}: {reason}" for path, reason in ecg.refused]
    # DICOM ECG waveforms are measured by a task enqueued after their commit: run it here.
    _register_tasks()
    runner = InProcessTaskRunner(threads=1, run_periodic=False)
    runner.start()
    columns = (TextColumn("importing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            bar = progress.add_task("import", total=len(dicom_files) + len(ecg.records))
            for path in dicom_files:
                try:
                    with session_scope() as session:
                        result = ingest_dicom_file(
                            session,
                            store=store,
                            source=path,
                            calling_ae=f"import:{clinic}"[:16],
                            zone=settings.zone,
                            organization=org,
                        )
                    counts[result.outcome.value] += 1
                except (InvalidDicomError, RDCError, OSError) as exc:
                    counts["refused"] += 1
                    refused.append(f"{path}: {exc}")
                progress.advance(bar)
            for record in ecg.records:
                try:
                    counts[_import_ecg(record, store=store, org=org, clinic=clinic)] += 1
                except (RDCError, OSError) as exc:
                    counts["refused"] += 1
                    refused.append(f"{record[0]}: {exc}")
                progress.advance(bar)
    finally:
        runner.stop()
    for line in refused:
        console.print(f"[yellow]refused[/yellow] {line}", markup=True, highlight=False)
    console.print(", ".join(f"{v} {k}" for k, v in counts.items()))
    if refused:
        raise typer.Exit(1)


def _is_part10(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return True  # the DICOM ingest reports why it cannot be read


def _import_ecg(files: list[Path], *, store: Any, org: Any, clinic: str) -> str:
    """Import one ECG record (a WFDB header with its signal files, or one file)."""
    from ecg_service.service import EcgForm, ingest_ecg, prepare_ecg
    from rdc_core.db import session_scope

    prepared = prepare_ecg([(p.name, p.read_bytes()) for p in files])
    with session_scope() as session:
        result = ingest_ecg(
            session,
            store=store,
            prepared=prepared,
            org=org,
            form=EcgForm(),
            source=f"import:{clinic}",
            allow_anonymous=True,
        )
    return "duplicate" if result.duplicate else "stored"


@app.command("serve")
def serve(
    role: Annotated[str, typer.Option(help="all, web, dicom or mllp")] = "all",
    demo_data: Annotated[bool, typer.Option("--demo", help="seed the demo alliance first")] = False,
) -> None:
    """Run the service: web API, DICOM and MLLP listeners and background worker in one process."""
    import uvicorn

    from dicom_gateway.server import DicomGateway
    from lab_results.mllp import MllpListener
    from rdc_core.migrate import upgrade_database
    from rdc_core.storage import get_object_store
    from web.app import create_app

    if role not in ("all", "web", "dicom", "mllp"):
        _fail("--role must be all, web, dicom or mllp")
    settings = get_settings()
    if settings.storage_backend == "local":
        private_directory(settings.data_dir)  # 0700: the objects are patient data
    upgrade_database()
    store = get_object_store(settings)
    store.check()
    if demo_data:
        from web.demo import DEMO_PASSWORD, seed_demo

        seed_demo(settings=settings, store=store)
        console.print(
            f"demo alliance seeded (users admin, reader, senior, tech_a …; "
            f"password {DEMO_PASSWORD})"
        )

    runner = _task_runner(settings)
    # SIGTERM ends the process through the stops in `finally`, not by the default action;
    # uvicorn, after its own graceful shutdown, raises the signal again with this handler.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    runner.start()
    gateway: DicomGateway | None = None
    mllp: MllpListener | None = None
    stop_requested = False
    try:
        if role in ("all", "dicom"):
            gateway = DicomGateway(settings=settings, store=store)
            gateway.start()
            host, port = gateway.address
            console.print(f"DICOM listener: AE {settings.dicom_ae_title} on {host}:{port}")
        if role in ("all", "mllp"):
            mllp = MllpListener(settings=settings, store=store)
            mllp.start()
            host, port = mllp.address
            console.print(f"MLLP listener (HL7 v2 lab results) on {host}:{port}")
        if role in ("all", "web"):
            console.print(f"web: http://{settings.http_host}:{settings.http_port}")
            uvicorn.run(
                create_app(),
                host=settings.http_host,
                port=settings.http_port,
                # X-Forwarded-For/-Proto are believed only from these (the TLS ingress).
                proxy_headers=True,
                forwarded_allow_ips=settings.forwarded_allow_ips,
                log_level="warning",
                access_log=False,
            )
        else:
            # A DICOM-only or MLLP-only replica still exposes its metrics (on RDC_HTTP_PORT).
            from prometheus_client import start_http_server

            start_http_server(settings.http_port, addr=settings.http_host)
            _wait_for_signal()
            stop_requested = True
    except _StopRequested:
        stop_requested = True
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # already stopping
        if gateway is not None:
            gateway.stop()
        if mllp is not None:
            mllp.stop()
        runner.stop()
    if stop_requested:
        from rdc_core.shutdown import exit_now

        exit_now(0)


def _register_tasks() -> None:
    """Import every module that registers something with the hub, in every process (serve,
    worker, beat): the tasks, the push senders' channels, each discipline's report sections
    and the DICOM artifact details. A Celery worker that signs an auto-released lab report
    must build the same document as the web process does."""
    import dicom_gateway.models
    import dicom_gateway.report_push  # noqa: F401
    import ecg_service.reading_service
    import ecg_service.tasks
    import lab_results.reading
    import lab_results.report_push
    import lab_results.tasks  # noqa: F401
    import worklist.tasks  # noqa: F401

    ecg_service.reading_service.register()


def _task_runner(settings: Settings) -> TaskRunner:
    """In-process worker and scheduler (embedded), or the Celery client (production)."""
    _register_tasks()

    if settings.task_backend == "celery":
        from rdc_core.celery_runner import CeleryTaskRunner, make_celery_app

        return CeleryTaskRunner(make_celery_app(settings))
    from rdc_core.tasks import InProcessTaskRunner

    return InProcessTaskRunner(threads=settings.worker_threads)


def _celery_app() -> Any:
    _register_tasks()
    from rdc_core.celery_runner import make_celery_app
    from rdc_core.migrate import upgrade_database

    settings = get_settings()
    if settings.task_backend != "celery":
        _fail("set RDC_TASK_BACKEND=celery and RDC_BROKER_URL to run Celery workers")
    if settings.storage_backend == "local":
        private_directory(settings.data_dir)
    upgrade_database()
    return make_celery_app(settings)


@app.command("worker")
def worker(
    concurrency: Annotated[int, typer.Option(help="worker processes")] = 2,
    pool: Annotated[str, typer.Option(help="prefork, threads or solo")] = "prefork",
) -> None:
    """Run a Celery worker for the background tasks (production)."""
    _celery_app().worker_main(
        ["worker", "--loglevel=INFO", f"--concurrency={concurrency}", f"--pool={pool}"]
    )


@app.command("beat")
def beat() -> None:
    """Run Celery beat, which schedules the periodic tasks (one per deployment)."""
    schedule = get_settings().data_dir / "celerybeat-schedule"
    schedule.parent.mkdir(parents=True, exist_ok=True)
    _celery_app().start(["beat", "--loglevel=INFO", f"--schedule={schedule}"])


class _StopRequested(SystemExit):
    """SIGTERM: stop everything, then exit with status 0."""


def _exit_on_signal(_signum: int, _frame: object) -> None:
    raise _StopRequested(0)


def _wait_for_signal() -> None:
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def main() -> None:
    """Entry point of the ``rdc`` console script."""
    try:
        settings = get_settings()
        configure_logging(settings.log_level, settings.log_format)
        app()
    except RDCError as exc:
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()
