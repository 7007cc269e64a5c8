"""``rdc critical``: critical-value contacts and the duty list."""

from __future__ import annotations

import typer

critical_app = typer.Typer(
    help="Critical values (危急值): contacts and duty list.", no_args_is_help=True
)
