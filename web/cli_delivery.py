"""``rdc delivery``: clinics' push-back endpoints and the delivery queue."""

from __future__ import annotations

import typer

delivery_app = typer.Typer(help="Push-back of signed reports to clinics.", no_args_is_help=True)
