"""Background tasks of delivery (edges: each opens and commits its own transaction)."""

from __future__ import annotations
