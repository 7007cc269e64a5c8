"""Tables of report signing."""

from __future__ import annotations
