"""Tables of critical values."""

from __future__ import annotations
