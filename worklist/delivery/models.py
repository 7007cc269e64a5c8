"""Tables of report delivery."""

from __future__ import annotations
