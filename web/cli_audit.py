"""``rdc audit``: verify the audit trail, write a signed checkpoint, seal new records."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer
from rich.console import Console

from rdc_core.errors import RDCError

__all__ = ["audit_app"]

audit_app = typer.Typer(help="The tamper-evident audit trail.", no_args_is_help=True)
console = Console(stderr=True, soft_wrap=True)  # messages are never wrapped mid-line


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


@audit_app.command("verify")
def audit_verify(
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Seal new records, then check the whole chain against the signed checkpoints.
    Exit 0: intact; 1: the first bad or missing sequence number and why; 2: could not check."""
    from rdc_core.migrate import upgrade_database
    from worklist.audit_tasks import verify_now

    try:
        upgrade_database()
        report = verify_now()
    except RDCError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(asdict(report)))
    if report.intact:
        console.print(
            f"[green]intact[/green]: {report.records} records sealed through seq "
            f"{report.sealed_through}, {report.checkpoints} checkpoint(s) matched"
            + (f", {report.unsealed} not sealed yet" if report.unsealed else "")
        )
        return
    console.print(f"[red]NOT intact[/red] at seq {report.first_bad_seq}: {report.reason}")
    raise typer.Exit(1)


@audit_app.command("checkpoint")
def audit_checkpoint() -> None:
    """Seal new records, then write a signed checkpoint of the chain's head to the object
    store now (what the periodic task does)."""
    from rdc_core.migrate import upgrade_database
    from worklist.audit_tasks import checkpoint_now

    try:
        upgrade_database()
        checkpoint = checkpoint_now()
    except RDCError as exc:
        _fail(str(exc))
    if checkpoint is None:
        console.print("no new records since the last checkpoint; nothing written")
        return
    console.print(
        f"checkpoint {checkpoint.key}: seq {checkpoint.seq}, {checkpoint.count} records, "
        f"head {checkpoint.head_hash}"
    )


@audit_app.command("seal")
def audit_seal() -> None:
    """Chain the records appended since the last seal (the periodic task does it too)."""
    from rdc_core.migrate import upgrade_database
    from worklist.audit_tasks import seal_now

    try:
        upgrade_database()
        sealed = seal_now()
    except RDCError as exc:
        _fail(str(exc))
    console.print(f"{sealed} record(s) sealed")
