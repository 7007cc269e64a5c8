"""``rdc delivery``: clinics' push-back endpoints and the delivery queue."""

from __future__ import annotations

import json
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from rdc_core.errors import RDCError

__all__ = ["delivery_app"]

delivery_app = typer.Typer(help="Push-back of signed reports to clinics.", no_args_is_help=True)
endpoint_app = typer.Typer(
    help="Clinics' endpoints (DICOM AE or HL7 receiver).", no_args_is_help=True
)
delivery_app.add_typer(endpoint_app, name="endpoint")

console = Console(stderr=True, soft_wrap=True)  # messages are never wrapped mid-line
out = Console()


def _fail(message: str) -> NoReturn:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(1)


@endpoint_app.command("add")
def endpoint_add(
    clinic: Annotated[str, typer.Option(help="clinic code")],
    channel: Annotated[str, typer.Option(help="dicom or hl7")],
    host: Annotated[str, typer.Option(help="host name or IP address")],
    port: Annotated[int, typer.Option(help="TCP port")],
    ae: Annotated[str | None, typer.Option(help="DICOM: the clinic's AE title")] = None,
    app: Annotated[str | None, typer.Option(help="HL7: receiving application (MSH-5)")] = None,
    facility: Annotated[str | None, typer.Option(help="HL7: receiving facility (MSH-6)")] = None,
    name: Annotated[str | None, typer.Option(help="name (default: channel:AE@host:port)")] = None,
    pdf: Annotated[
        str, typer.Option(help="HL7: embed the signed PDF, or link it (URL and SHA-256)")
    ] = "embed",
    disabled: Annotated[bool, typer.Option("--disabled", help="add it disabled")] = False,
    tls: Annotated[bool, typer.Option("--tls", help="push over TLS")] = False,
) -> None:
    """Add (or update) a clinic's endpoint for push-back of signed reports."""
    from pydantic import ValidationError

    from rdc_core.db import session_scope, utcnow
    from rdc_core.migrate import upgrade_database
    from worklist.delivery.schemas import EndpointIn
    from worklist.delivery.service import add_endpoint

    try:
        data = EndpointIn(
            clinic=clinic,
            channel=channel,  # type: ignore[arg-type]
            host=host,
            port=port,
            ae_title=ae,
            receiving_application=app,
            receiving_facility=facility,
            name=name,
            pdf_mode=pdf,  # type: ignore[arg-type]
            enabled=not disabled,
            tls=tls,
        )
    except ValidationError as exc:
        _fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
    upgrade_database()
    try:
        with session_scope() as session:
            endpoint = add_endpoint(session, principal=None, data=data, now=utcnow())
    except RDCError as exc:
        _fail(str(exc))
    state = "enabled" if endpoint.enabled else "disabled"
    out.print(f"{endpoint.clinic_code} {endpoint.name} ({state}) id {endpoint.id}")


@endpoint_app.command("list")
def endpoint_list(
    clinic: Annotated[str | None, typer.Option(help="clinic code")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """List the clinics' endpoints."""
    from rdc_core.db import session_scope
    from rdc_core.migrate import upgrade_database
    from worklist.delivery.service import list_endpoints

    upgrade_database()
    with session_scope() as session:
        rows = list_endpoints(session, principal=None, clinic=clinic)
    if as_json:
        out.print_json(json.dumps([r.model_dump(mode="json") for r in rows]))
        return
    table = Table("clinic", "name", "channel", "target", "enabled", "id")
    for r in rows:
        target = f"{r.ae_title or r.receiving_application or ''}@{r.host}:{r.port}"
        table.add_row(r.clinic_code, r.name, r.channel.value, target, str(r.enabled), r.id)
    out.print(table)


def _set_enabled(endpoint: str, clinic: str | None, enabled: bool) -> None:
    from rdc_core.db import session_scope, utcnow
    from rdc_core.migrate import upgrade_database
    from worklist.delivery.service import set_endpoint_enabled

    upgrade_database()
    try:
        with session_scope() as session:
            row = set_endpoint_enabled(
                session,
                principal=None,
                endpoint=endpoint,
                clinic=clinic,
                enabled=enabled,
                now=utcnow(),
            )
    except RDCError as exc:
        _fail(str(exc))
    out.print(f"{row.clinic_code} {row.name}: {'enabled' if row.enabled else 'disabled'}")


@endpoint_app.command("disable")
def endpoint_disable(
    endpoint: Annotated[str, typer.Argument(help="endpoint ID or name")],
    clinic: Annotated[str | None, typer.Option(help="clinic code (with a name)")] = None,
) -> None:
    """Stop pushing to an endpoint (its pending deliveries wait)."""
    _set_enabled(endpoint, clinic, False)


@endpoint_app.command("enable")
def endpoint_enable(
    endpoint: Annotated[str, typer.Argument(help="endpoint ID or name")],
    clinic: Annotated[str | None, typer.Option(help="clinic code (with a name)")] = None,
) -> None:
    """Resume pushing to an endpoint."""
    _set_enabled(endpoint, clinic, True)


@delivery_app.command("list")
def deliveries_list(
    state: Annotated[str | None, typer.Option(help="pending, failing or delivered")] = None,
    clinic: Annotated[str | None, typer.Option(help="clinic code")] = None,
    limit: Annotated[int, typer.Option(help="rows")] = 50,
) -> None:
    """The delivery queue, newest first."""
    from sqlalchemy import select

    from rdc_core.db import session_scope
    from rdc_core.migrate import upgrade_database
    from worklist.delivery.models import DeliveryEndpoint, DeliveryState, ReportDelivery
    from worklist.models import Organization

    try:
        wanted = DeliveryState(state) if state else None
    except ValueError:
        _fail("--state is pending, failing or delivered")
    upgrade_database()
    table = Table("clinic", "report", "channel", "target", "state", "attempts", "next", "error")
    with session_scope() as session:
        stmt = (
            select(ReportDelivery, Organization.code, DeliveryEndpoint.name)
            .join(Organization, Organization.id == ReportDelivery.org_id)
            .outerjoin(DeliveryEndpoint, DeliveryEndpoint.id == ReportDelivery.endpoint_id)
        )
        if wanted:
            stmt = stmt.where(ReportDelivery.state == wanted)
        if clinic:
            stmt = stmt.where(Organization.code == clinic)
        for d, code, endpoint in session.execute(
            stmt.order_by(ReportDelivery.created_at.desc()).limit(limit)
        ):
            table.add_row(
                code,
                d.report_id,
                d.channel.value,
                endpoint or d.target,
                d.state.value,
                str(d.attempts),
                d.next_attempt_at.isoformat(timespec="seconds") if d.next_attempt_at else "",
                (d.last_error or "")[:60],
            )
    out.print(table)


@delivery_app.command("run")
def deliveries_run() -> None:
    """Attempt every due push now (what the periodic task does), and print the outcome."""
    import dicom_gateway.report_push  # noqa: F401  (registers the senders)
    import lab_results.report_push  # noqa: F401
    from rdc_core.migrate import upgrade_database
    from worklist.delivery.tasks import deliver_due_reports

    upgrade_database()
    run = deliver_due_reports()
    out.print(f"{len(run.delivered)} delivered, {len(run.failed)} failed")
    if run.failed:
        raise typer.Exit(2)
