"""Push of signed reports back to a clinic's own AE by C-STORE (encapsulated PDF)."""

from __future__ import annotations
