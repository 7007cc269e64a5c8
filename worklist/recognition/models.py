"""Tables of mutual recognition."""

from __future__ import annotations
