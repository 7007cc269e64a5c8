"""``rdc catalog`` and ``rdc accreditation``: mutual-recognition reference data."""

from __future__ import annotations

import typer

catalog_app = typer.Typer(
    help="The catalogue of recognised items (互认项目).", no_args_is_help=True
)
accreditation_app = typer.Typer(
    help="Institutions' QC accreditations (质控合格).", no_args_is_help=True
)
