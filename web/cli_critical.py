"""``rdc critical``: critical-value contacts and the duty list."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from rdc_core.errors import RDCError

__all__ = ["critical_app"]

critical_app = typer.Typer(
    help="Critical values (危急值): contacts and duty list.", no_args_is_help=True
)
contact_app = typer.Typer(help="Clinics' critical-value contacts.", no_args_is_help=True)
duty_app = typer.Typer(help="The centre's critical-value duty list.", no_args_is_help=True)
critical_app.add_typer(contact_app, name="contact")
critical_app.add_typer(duty_app, name="duty")

console = Console(stderr=True, soft_wrap=True)  # messages are never wrapped mid-line


def _fail(message: str) -> NoReturn:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(1)


def _when(value: str | None, name: str) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        _fail(f"{name}: not an ISO 8601 time: {value!r}")
    if parsed.tzinfo is None:
        _fail(f"{name} needs a time zone, e.g. 2026-01-01T08:00:00+08:00")
    return parsed


@contact_app.command("set")
def contact_set(
    org: Annotated[str, typer.Option(help="clinic code")],
    primary_name: Annotated[str, typer.Option(help="first person to call")],
    primary_phone: Annotated[str, typer.Option()],
    primary_username: Annotated[
        str | None, typer.Option(help="their login, to notify them in the portal too")
    ] = None,
    secondary_name: Annotated[
        str | None, typer.Option(help="called when the alert escalates")
    ] = None,
    secondary_phone: Annotated[str | None, typer.Option()] = None,
    secondary_username: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Set (replace) a clinic's critical-value contacts."""
    from rdc_core.db import session_scope, utcnow
    from rdc_core.migrate import upgrade_database
    from worklist.critical_values.contacts import set_contact
    from worklist.critical_values.schemas import ContactIn

    upgrade_database()
    try:
        with session_scope() as session:
            out = set_contact(
                session,
                principal=None,
                org_code=org,
                data=ContactIn(
                    primary_name=primary_name,
                    primary_phone=primary_phone,
                    primary_username=primary_username,
                    secondary_name=secondary_name,
                    secondary_phone=secondary_phone,
                    secondary_username=secondary_username,
                ),
                now=utcnow(),
            )
    except RDCError as exc:
        _fail(str(exc))
    second = f"; secondary {out.secondary_name} {out.secondary_phone}" if out.secondary_name else ""
    console.print(f"{org}: primary {out.primary_name} {out.primary_phone}{second}")


@contact_app.command("show")
def contact_show(org: Annotated[str, typer.Option(help="clinic code")]) -> None:
    """Print a clinic's contacts as JSON."""
    from rdc_core.db import session_scope
    from rdc_core.migrate import upgrade_database
    from worklist.critical_values.contacts import contact_for
    from worklist.directory import get_organization

    upgrade_database()
    try:
        with session_scope() as session:
            contact = contact_for(session, org_id=get_organization(session, code=org).id)
            if contact is None:
                _fail(f"{org} has no critical-value contacts")
            fields = ("primary", "secondary")
            data = {
                f"{f}_{k}": getattr(contact, f"{f}_{k}")
                for f in fields
                for k in ("name", "phone", "username")
            }
    except RDCError as exc:
        _fail(str(exc))
    typer.echo(json.dumps({"org": org, **data}, ensure_ascii=False))


@duty_app.command("add")
def duty_add(
    username: Annotated[str, typer.Option(help="a lead-hospital user")],
    on_from: Annotated[
        str | None, typer.Option("--from", help="on duty from (ISO 8601 with zone)")
    ] = None,
    on_until: Annotated[
        str | None, typer.Option("--until", help="on duty until (ISO 8601 with zone)")
    ] = None,
) -> None:
    """Put a user on the duty list (again: replaces the window)."""
    from rdc_core.db import session_scope, utcnow
    from rdc_core.migrate import upgrade_database
    from worklist.critical_values.contacts import add_duty

    start, end = _when(on_from, "--from"), _when(on_until, "--until")
    upgrade_database()
    try:
        with session_scope() as session:
            add_duty(
                session,
                principal=None,
                username=username,
                on_from=start,
                on_until=end,
                now=utcnow(),
            )
    except RDCError as exc:
        _fail(str(exc))
    console.print(f"{username} is on the critical-value duty list")


@duty_app.command("remove")
def duty_remove(username: Annotated[str, typer.Option()]) -> None:
    """Take a user off the duty list."""
    from rdc_core.db import session_scope
    from rdc_core.migrate import upgrade_database
    from worklist.critical_values.contacts import remove_duty

    upgrade_database()
    try:
        with session_scope() as session:
            remove_duty(session, principal=None, username=username)
    except RDCError as exc:
        _fail(str(exc))
    console.print(f"{username} is off the critical-value duty list")


@duty_app.command("list")
def duty_list() -> None:
    """Print the duty list as JSON lines."""
    from rdc_core.db import session_scope, utcnow
    from rdc_core.migrate import upgrade_database
    from worklist.critical_values.contacts import list_duty

    upgrade_database()
    with session_scope() as session:
        entries = list_duty(session, principal=None, now=utcnow())
    for entry in entries:
        typer.echo(entry.model_dump_json())


@critical_app.command("escalate")
def escalate() -> None:
    """Escalate overdue alerts now (what the periodic task does); prints how many fired."""
    from rdc_core.migrate import upgrade_database
    from worklist.critical_values.tasks import escalate_critical_values_task

    upgrade_database()
    typer.echo(str(escalate_critical_values_task()))
