"""Imports every module that declares tables, so that ``Base.metadata`` is complete
(Alembic's autogenerate and the schema test rely on it)."""

from __future__ import annotations

import worklist.audit
import worklist.critical_values.models
import worklist.delivery.models
import worklist.models
import worklist.move_destinations
import worklist.patients.models
import worklist.qc.models
import worklist.recognition.models
import worklist.signing.models  # noqa: F401
