"""``rdc catalog`` and ``rdc accreditation``: mutual-recognition reference data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rdc_core.errors import RDCError

__all__ = ["accreditation_app", "catalog_app"]

catalog_app = typer.Typer(
    help="The catalogue of recognised items (互认项目).", no_args_is_help=True
)
accreditation_app = typer.Typer(
    help="Institutions' QC accreditations (质控合格).", no_args_is_help=True
)
console = Console(stderr=True, soft_wrap=True)  # messages are never wrapped mid-line
out = Console()

FormatOption = Annotated[
    str | None, typer.Option("--format", help="csv or yaml (default: from the file's suffix)")
]


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(1)


def _read(path: Path, fmt: str | None) -> tuple[str, str]:
    if fmt is None:
        suffix = path.suffix.lower()
        fmt = {".csv": "csv", ".yaml": "yaml", ".yml": "yaml"}.get(suffix)
        if fmt is None:
            _fail(f"{path}: cannot tell the format from the suffix; give --format csv|yaml")
    if fmt not in ("csv", "yaml"):
        _fail("--format must be csv or yaml")
    try:
        return path.read_text(encoding="utf-8"), str(fmt)
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"{path}: {exc}")
        raise  # unreachable: _fail exits


@catalog_app.command("load")
def catalog_load(
    file: Annotated[Path, typer.Argument(help="CSV (UTF-8, header row) or YAML file")],
    fmt: FormatOption = None,
) -> None:
    """Load the whole catalogue: a new version when it differs from the current one."""
    from rdc_core.db import session_scope, utcnow
    from rdc_core.migrate import upgrade_database
    from worklist.recognition.catalog import load_catalog

    text, kind = _read(file, fmt)
    upgrade_database()
    try:
        with session_scope() as session:
            result = load_catalog(
                session, text=text, fmt=kind, source=file.name, principal=None, now=utcnow()
            )
    except RDCError as exc:
        _fail(f"{file}: {exc}")
        return
    if result.created:
        out.print(f"catalogue version {result.version}: {result.item_count} items loaded")
    else:
        out.print(f"unchanged: catalogue version {result.version} has the same content")


@catalog_app.command("list")
def catalog_list(
    version: Annotated[
        int | None, typer.Option(help="catalogue version (default: current)")
    ] = None,
) -> None:
    """Show the items of the current (or a given) catalogue version."""
    from rdc_core.db import session_scope
    from rdc_core.migrate import upgrade_database
    from worklist.recognition.catalog import catalog_items, current_catalog

    upgrade_database()
    with session_scope() as session:
        current = current_catalog(session)
        if current is None:
            _fail("no catalogue loaded yet (rdc catalog load FILE)")
            return
        shown = version or current.version
        items = catalog_items(session, version=shown)
        if not items:
            _fail(f"no catalogue version {shown}")
        table = Table(title=f"互认项目目录 / recognised items — version {shown}")
        for column in ("code", "discipline", "name", "mark", "days", "min grade", "match"):
            table.add_column(column)
        for item in items:
            match = " ".join(
                filter(None, [item.modality, item.body_part, ",".join(item.test_codes or [])])
            )
            name = item.name_zh + (f" / {item.name_en}" if item.name_en else "")
            mark = item.scope_mark + (f" ({item.scope_note})" if item.scope_note else "")
            table.add_row(
                item.code,
                item.discipline.value,
                name,
                mark,
                str(item.valid_days),
                item.min_grade.value if item.min_grade else "—",
                match or "—",
            )
    out.print(table)


@accreditation_app.command("load")
def accreditation_load(
    file: Annotated[Path, typer.Argument(help="CSV (UTF-8, header row) or YAML file")],
    fmt: FormatOption = None,
) -> None:
    """Upsert accreditations (organisation, item or discipline, valid_from, valid_to, note)."""
    from rdc_core.db import session_scope, utcnow
    from rdc_core.migrate import upgrade_database
    from worklist.recognition.catalog import load_accreditations

    text, kind = _read(file, fmt)
    upgrade_database()
    try:
        with session_scope() as session:
            result = load_accreditations(session, text=text, fmt=kind, principal=None, now=utcnow())
    except RDCError as exc:
        _fail(f"{file}: {exc}")
        return
    out.print(
        f"accreditations: {result.inserted} added, {result.updated} updated, "
        f"{result.unchanged} unchanged"
    )


@accreditation_app.command("list")
def accreditation_list(
    org: Annotated[str | None, typer.Option(help="organisation code")] = None,
) -> None:
    """Show the accreditations (optionally of one organisation)."""
    from rdc_core.db import session_scope
    from rdc_core.migrate import upgrade_database
    from worklist.recognition.catalog import list_accreditations

    upgrade_database()
    with session_scope() as session:
        rows = list_accreditations(session, principal=None, org=org)
    table = Table(title="质控合格 / QC accreditations")
    for column in ("org", "discipline", "item", "valid from", "valid to", "note"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["org"],
            r["discipline"],
            r["item_code"] or "(all)",
            r["valid_from"],
            r["valid_to"],
            r["note"],
        )
    out.print(table)
