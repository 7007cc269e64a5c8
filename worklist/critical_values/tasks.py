"""Background tasks of critical_values (edges: each opens and commits its own transaction)."""

from __future__ import annotations
