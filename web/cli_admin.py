"""Administration from the command line: ``rdc clinic list|edit|disable|enable``, ``rdc user
list|edit|disable|password``, ``rdc routing list|set``, ``rdc sla list|set``. The same
services as the console's API; every change is audited (actor ``cli``)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from rdc_core.errors import RDCError
from web.cli_audit import audit_app

__all__ = ["register_admin_commands", "routing_app", "sla_app"]

routing_app = typer.Typer(help="Routing rules (exam → reader pool).", no_args_is_help=True)
sla_app = typer.Typer(help="Turnaround targets per discipline and priority.", no_args_is_help=True)

console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)
T = TypeVar("T")


def _fail(message: str) -> NoReturn:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(1)


def _run(work: Callable[[Any], T]) -> T:
    """Run ``work(session)`` in one transaction; a domain error ends the command."""
    from pydantic import ValidationError

    from rdc_core.db import session_scope
    from rdc_core.migrate import upgrade_database

    upgrade_database()
    try:
        with session_scope() as session:
            return work(session)
    except RDCError as exc:
        _fail(str(exc))
    except ValidationError as exc:
        _fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, ensure_ascii=False, indent=2, default=str) + "\n")


def _qualifications(values: list[str] | None) -> list[dict[str, str]] | None:
    if values is None:
        return None
    return [dict(zip(("discipline", "modality"), q.split(":", 1), strict=False)) for q in values]


# --- clinics -------------------------------------------------------------------------------


def clinic_list(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    lead: Annotated[bool, typer.Option("--lead", help="include the lead hospital")] = False,
) -> None:
    """List the clinics with their AE titles and whether they are enabled."""
    from worklist.admin import list_clinics

    clinics = _run(lambda s: list_clinics(s, principal=None, include_lead=lead))
    if as_json:
        _print_json([c.model_dump(mode="json") for c in clinics])
        return
    table = Table("code", "name", "active", "AE titles", "users")
    for c in clinics:
        table.add_row(
            c.code, c.name, "yes" if c.active else "no", " ".join(c.ae_titles), str(c.users)
        )
    out.print(table)


def clinic_edit(
    code: Annotated[str, typer.Argument(help="clinic code")],
    name: Annotated[str | None, typer.Option(help="new display name")] = None,
    ae: Annotated[
        list[str] | None, typer.Option(help="the clinic's AE titles (repeat; replaces them all)")
    ] = None,
) -> None:
    """Rename a clinic or replace its AE titles."""
    from worklist.admin import update_clinic
    from worklist.admin.schemas import ClinicPatch

    patch = ClinicPatch(name=name, ae_titles=ae)
    c = _run(lambda s: update_clinic(s, principal=None, code=code, patch=patch))
    console.print(f"clinic {c.code} ({c.name}); AE titles: {', '.join(c.ae_titles) or 'none'}")


def _set_clinic_active(code: str, active: bool) -> None:
    from worklist.admin import update_clinic
    from worklist.admin.schemas import ClinicPatch

    _run(lambda s: update_clinic(s, principal=None, code=code, patch=ClinicPatch(active=active)))
    console.print(f"clinic {code} {'enabled' if active else 'disabled'}")


def clinic_disable(code: Annotated[str, typer.Argument(help="clinic code")]) -> None:
    """Disable a clinic: its AE titles are refused and its users cannot sign in."""
    _set_clinic_active(code, False)


def clinic_enable(code: Annotated[str, typer.Argument(help="clinic code")]) -> None:
    """Enable a disabled clinic again."""
    _set_clinic_active(code, True)


# --- users ---------------------------------------------------------------------------------


def user_list(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    org: Annotated[str | None, typer.Option(help="only this organisation's users")] = None,
) -> None:
    """List the users: display name, role, level, organisation, pools, qualifications."""
    from worklist.admin import list_users

    users = _run(lambda s: list_users(s, principal=None, org_code=org))
    if as_json:
        _print_json([u.model_dump(mode="json") for u in users])
        return
    table = Table("username", "name", "role", "level", "org", "pools", "active")
    for u in users:
        table.add_row(
            u.username,
            u.display_name,
            u.role.value,
            u.level.value if u.level else "",
            u.org_code,
            " ".join(u.pools),
            "yes" if u.active else "no",
        )
    out.print(table)


def user_edit(
    username: Annotated[str, typer.Argument()],
    name: Annotated[str | None, typer.Option(help="display name")] = None,
    role: Annotated[str | None, typer.Option(help="new role")] = None,
    level: Annotated[str | None, typer.Option(help="resident, attending or chief")] = None,
    pool: Annotated[list[str] | None, typer.Option(help="reader pool (repeat; replaces)")] = None,
    qualify: Annotated[
        list[str] | None, typer.Option(help="DISCIPLINE[:MODALITY] (repeat; replaces)")
    ] = None,
    enable: Annotated[bool, typer.Option("--enable", help="enable a disabled user")] = False,
) -> None:
    """Change a user's display name, role, level, pools or qualifications."""
    from worklist.admin import update_user
    from worklist.admin.schemas import UserPatch

    patch = UserPatch.model_validate(
        {
            "display_name": name,
            "role": role.replace("-", "_") if role else None,
            "level": level,
            "pools": pool,
            "qualifications": _qualifications(qualify),
            "active": True if enable else None,
        }
    )
    u = _run(lambda s: update_user(s, principal=None, username=username, patch=patch))
    console.print(f"user {u.username} ({u.display_name}): {u.role.value} at {u.org_code}")


def user_password(
    username: Annotated[str, typer.Argument()],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="read the password from stdin")
    ] = False,
) -> None:
    """Reset a user's password."""
    from worklist.admin import reset_password

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    _run(lambda s: reset_password(s, principal=None, username=username, password=password))
    console.print(f"password of {username} changed")


def register_admin_commands(clinic_app: typer.Typer, user_app: typer.Typer) -> None:
    """Add the console's commands to ``rdc clinic`` and ``rdc user``."""
    clinic_app.command("list")(clinic_list)
    clinic_app.command("edit")(clinic_edit)
    clinic_app.command("disable")(clinic_disable)
    clinic_app.command("enable")(clinic_enable)
    user_app.command("list")(user_list)
    user_app.command("edit")(user_edit)
    user_app.command("password")(user_password)


# --- routing rules and SLA targets ---------------------------------------------------------


@routing_app.command("list")
def routing_list(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """The routing rules in the order they are tried."""
    from worklist.admin import get_routing_rules

    rules = _run(lambda s: get_routing_rules(s, principal=None)).rules
    if as_json:
        _print_json([r.model_dump(mode="json") for r in rules])
        return
    table = Table("#", "discipline", "modality", "body part", "clinic", "priority", "pool")
    for r in rules:
        table.add_row(
            str(r.position),
            r.discipline.value if r.discipline else "*",
            r.modality or "*",
            r.body_part or "*",
            r.clinic or "*",
            r.priority.value if r.priority else "*",
            r.pool,
        )
    out.print(table)


@routing_app.command("set")
def routing_set(
    file: Annotated[Path, typer.Argument(help="JSON or YAML list of rules; - for stdin")],
) -> None:
    """Replace every routing rule by the list in FILE (list order is precedence):
    ``[{"modality": "CT", "clinic": "CLINIC_A", "pool": "ct-team"}, ...]``."""
    import yaml

    from worklist.admin import put_routing_rules
    from worklist.admin.schemas import RoutingRuleIn

    text = sys.stdin.read() if str(file) == "-" else file.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) or []
    except yaml.YAMLError as exc:
        _fail(f"{file}: {exc}")
    if not isinstance(data, list):
        _fail(f"{file}: a list of rules is expected")
    result = _run(
        lambda s: put_routing_rules(
            s, principal=None, rules=[RoutingRuleIn.model_validate(r) for r in data]
        )
    )
    console.print(f"{len(result.rules)} routing rule(s) in force")


@sla_app.command("list")
def sla_list(as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """The target of every discipline and priority, in minutes."""
    from worklist.admin import get_sla_targets

    targets = _run(lambda s: get_sla_targets(s, principal=None)).targets
    if as_json:
        _print_json([t.model_dump(mode="json") for t in targets])
        return
    table = Table("discipline", "priority", "minutes", "default")
    for t in targets:
        table.add_row(t.discipline.value, t.priority.value, str(t.minutes), str(t.default_minutes))
    out.print(table)


@sla_app.command("set")
def sla_set(
    discipline: Annotated[str, typer.Option(help="imaging, ecg or lab")],
    priority: Annotated[str, typer.Option(help="emergency, urgent or routine")],
    minutes: Annotated[int, typer.Option(help="minutes from first arrival to final report")],
    apply_to_ready: Annotated[
        bool,
        typer.Option("--apply-to-ready", help="also recompute the due time of READY exams"),
    ] = False,
) -> None:
    """Set one turnaround target; READY exams keep their due time unless --apply-to-ready."""
    from worklist.admin import put_sla_targets
    from worklist.admin.schemas import SlaTargetIn

    target = SlaTargetIn.model_validate(
        {"discipline": discipline, "priority": priority, "minutes": minutes}
    )
    result = _run(
        lambda s: put_sla_targets(
            s, principal=None, targets=[target], apply_to_ready=apply_to_ready
        )
    )
    console.print(
        f"{discipline}/{priority}: {minutes} min; {result.rescheduled} READY exam(s) rescheduled"
    )


# --- audit trail ---------------------------------------------------------------------------


@audit_app.command("search")
def audit_search(
    user: Annotated[str | None, typer.Option(help="username")] = None,
    patient: Annotated[str | None, typer.Option(help="patient ID")] = None,
    exam: Annotated[str | None, typer.Option(help="exam id, Study Instance UID, accession")] = None,
    action: Annotated[str | None, typer.Option(help="action; * matches any text")] = None,
    since: Annotated[
        str | None, typer.Option("--from", help="ISO time with zone, e.g. 2026-01-01T08:00+08:00")
    ] = None,
    until: Annotated[str | None, typer.Option("--to", help="ISO time with zone")] = None,
    as_csv: Annotated[bool, typer.Option("--csv", help="every match as CSV on stdout")] = False,
    limit: Annotated[int, typer.Option(help="newest N (without --csv)")] = 100,
) -> None:
    """Search the audit trail (as JSON lines, newest first, or every match as CSV)."""
    import csv
    from datetime import datetime

    from worklist.admin import AuditFilter, audit_events, iter_audit_events

    try:
        criteria = AuditFilter(
            user=user,
            patient=patient,
            exam=exam,
            action=action,
            since=datetime.fromisoformat(since) if since else None,
            until=datetime.fromisoformat(until) if until else None,
        )
    except ValueError as exc:
        _fail(str(exc))
    except RDCError as exc:
        _fail(str(exc))
    if as_csv:

        def export(session: Any) -> None:
            writer = csv.writer(sys.stdout)
            writer.writerow(
                ["seq", "at", "actor", "org_id", "action", "object_type", "object_id", "detail"]
            )
            for e in iter_audit_events(session, principal=None, criteria=criteria):
                writer.writerow(
                    [
                        e.seq,
                        e.at.isoformat(),
                        e.actor,
                        e.org_id or "",
                        e.action,
                        e.object_type,
                        e.object_id,
                        json.dumps(e.detail, ensure_ascii=False, sort_keys=True),
                    ]
                )

        _run(export)
        return
    items, total = _run(lambda s: audit_events(s, principal=None, criteria=criteria, limit=limit))
    for e in items:
        sys.stdout.write(json.dumps(e.model_dump(mode="json"), ensure_ascii=False) + "\n")
    console.print(f"{len(items)} of {total} event(s)")


@audit_app.command("check")
def audit_check() -> None:
    """Recompute the hash chain; exit 1 when a record was changed or removed."""
    from worklist.admin import verify_audit_chain

    result = _run(lambda s: verify_audit_chain(s, principal=None))
    if not result.intact:
        _fail(f"the audit chain is broken at event {result.first_bad_seq}")
    console.print(f"audit chain intact ({result.events} events)")
