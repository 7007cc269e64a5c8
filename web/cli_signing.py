"""``rdc ca`` (the alliance CA and readers' certificates) and ``rdc verify``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from rdc_core.errors import RDCError

__all__ = ["ca_app", "cli_actor", "verify_command"]

ca_app = typer.Typer(
    help="The alliance CA and readers' signing certificates.", no_args_is_help=True
)
console = Console(stderr=True, soft_wrap=True)  # messages are never wrapped mid-line


def cli_actor() -> str:
    """Who ran an administrative command, for the audit trail (``cli:<login name>``)."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"[:100]
    except Exception:  # no login name (a container without a passwd entry)
        return "cli"


def _audit(session: Any, action: str, object_id: str, detail: dict[str, Any]) -> None:
    from worklist.audit import record_event

    record_event(
        session,
        actor=cli_actor(),
        action=action,
        object_type="certificate",
        object_id=object_id,
        detail=detail,
    )


def _fail(message: str, code: int = 1) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


@ca_app.command("init")
def ca_init() -> None:
    """Create the alliance's root CA (named after RDC_ALLIANCE_NAME); once only."""
    from rdc_core.db import session_scope, utcnow
    from rdc_core.migrate import upgrade_database
    from worklist.signing.pki import CaExistsError, ca_certificate, init_ca

    upgrade_database()
    try:
        with session_scope() as session:
            row = init_ca(session, now=utcnow())
            _audit(session, "ca_init", row.serial, {"subject": row.subject})
            console.print(f"alliance CA created: {row.subject} (serial {row.serial})")
    except CaExistsError:
        with session_scope() as session:
            row = ca_certificate(session)
            console.print(f"the alliance CA exists already: {row.subject} (serial {row.serial})")
    except RDCError as exc:
        _fail(str(exc))


@ca_app.command("issue")
def ca_issue(
    username: Annotated[str, typer.Option(help="the reader who will sign with it")],
    renew: Annotated[
        bool, typer.Option("--renew", help="replace the reader's current certificate")
    ] = False,
) -> None:
    """Issue a reader's signing key and certificate (two years) from the alliance CA."""
    from rdc_core.db import session_scope, utcnow
    from rdc_core.migrate import upgrade_database
    from worklist.signing.pki import issue_certificate

    upgrade_database()
    try:
        with session_scope() as session:
            row = issue_certificate(session, username=username, now=utcnow(), renew=renew)
            _audit(
                session,
                "issue_certificate",
                row.serial,
                {"username": username, "subject": row.subject, "renew": renew},
            )
            console.print(
                f"certificate for {username}: {row.subject}, serial {row.serial}, "
                f"valid until {row.not_after:%Y-%m-%d}"
            )
    except RDCError as exc:
        _fail(str(exc))


@ca_app.command("export")
def ca_export() -> None:
    """Print the CA certificate (PEM) for verifiers: ``rdc verify --ca``."""
    from rdc_core.db import read_session
    from rdc_core.migrate import upgrade_database
    from worklist.signing.pki import ca_certificate

    upgrade_database()
    try:
        with read_session() as session:
            sys.stdout.write(ca_certificate(session).certificate_pem)
    except RDCError as exc:
        _fail(str(exc))


@ca_app.command("revoke")
def ca_revoke(
    serial: Annotated[str, typer.Option(help="certificate serial number (hex)")],
) -> None:
    """Revoke a reader's certificate: what it signs from now on no longer verifies."""
    from rdc_core.db import session_scope, utcnow
    from rdc_core.migrate import upgrade_database
    from worklist.signing.pki import revoke_certificate

    upgrade_database()
    try:
        with session_scope() as session:
            row = revoke_certificate(session, serial=serial, now=utcnow())
            _audit(session, "revoke_certificate", row.serial, {"subject": row.subject})
            console.print(f"revoked {row.subject} (serial {row.serial})")
    except RDCError as exc:
        _fail(str(exc))


def verify_command(
    file: Annotated[Path, typer.Argument(help="a signed report PDF or JSON document")],
    ca: Annotated[
        Path | None,
        typer.Option(help="the alliance CA certificate (PEM); default: this deployment's"),
    ] = None,
) -> None:
    """Verify a signed report PDF or JSON document; exit 0 only when it is valid. With
    ``--ca`` (no database) revocation cannot be checked: a warning says so."""
    from worklist.signing.verify import load_ca_pems, verify_file

    try:
        data = file.read_bytes()
    except OSError as exc:
        _fail(f"cannot read {file}: {exc}", code=2)
    try:
        if ca is not None:
            result = verify_file(data, ca_certs=load_ca_pems(ca.read_bytes()))
        else:
            from rdc_core.db import read_session
            from rdc_core.migrate import upgrade_database

            upgrade_database()
            with read_session() as session:
                result = verify_file(data, session=session)
    except (OSError, ValueError, RDCError) as exc:
        _fail(str(exc), code=2)
    signer = result.signer or {}
    who = signer.get("name") or signer.get("username") or "?"
    if result.valid:
        console.print(
            f"[green]valid[/green] {result.kind}: signed by {who} "
            f"(certificate {signer.get('certificate_serial')}) at {result.signed_at}"
        )
        if not result.revocation_checked:
            console.print(
                "[yellow]warning:[/yellow] revocation not checked (no database; only the CA "
                "certificate) / 未检查证书吊销：请向签发机构核实"
            )
        return
    console.print(f"[red]NOT valid[/red] {result.kind}:")
    for reason in result.reasons:
        console.print(f"  - {reason}")
    raise typer.Exit(1)
