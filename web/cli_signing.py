"""``rdc ca`` (the alliance CA and readers' certificates) and ``rdc verify``."""

from __future__ import annotations

import typer

ca_app = typer.Typer(
    help="The alliance CA and readers' signing certificates.", no_args_is_help=True
)
