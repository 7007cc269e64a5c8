"""Result versions of an order: corrections (OBX-11 ``C``) make a new version; every
version is kept.

:func:`apply_correction` takes the order's current version (or ``None`` for a new order)
and a newly received message's order, and returns the next version, or ``None`` when the
message changes nothing (a re-sent copy). The previous version is never modified: the
caller stores the new one beside it. Results are matched by coding system, code and OBX-4
sub-ID. A message may carry only the corrected results: the others are carried over. OBX-11
``D`` deletes a result from the new version. A final result that changes without ``C`` is
still versioned, with a warning (HL7 asks for ``C``). Pure logic.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from lab_results.parse import Observation, Order

__all__ = ["OrderVersion", "ResultChange", "apply_correction", "result_key"]


class ResultChange(BaseModel):
    key: str
    change: Literal["added", "corrected", "updated", "deleted"]
    previous_value: str | None = None
    value: str | None = None
    previous_status: str | None = None
    status: str | None = None


class OrderVersion(BaseModel):
    version: int
    order_key: str  # filler number, else placer number
    control_id: str  # MSH-10 of the message that made this version
    received_at: datetime | None = None
    kind: Literal["original", "correction", "update"]
    results: list[Observation]
    changes: list[ResultChange] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    previous_version: int | None = None

    def result(self, key: str) -> Observation | None:
        return next((r for r in self.results if result_key(r) == key), None)


def result_key(obs: Observation) -> str:
    """The identity of a result within its order: ``system|code|sub-ID``."""
    system = obs.code.system if obs.code.code else obs.code.alt_system
    return f"{system.upper()}|{obs.code.identifier}|{obs.sub_id}"


def _same(a: Observation, b: Observation) -> bool:
    fields = ("value", "unit", "reference_range", "flags", "status", "value_type")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


def apply_correction(
    previous: OrderVersion | None,
    order: Order,
    *,
    control_id: str,
    received_at: datetime | None = None,
) -> OrderVersion | None:
    """The next version of the order's results, or ``None`` if nothing changed."""
    warnings: list[str] = []
    if previous is None:
        results = [o for o in order.observations if o.status != "D"]
        if any(o.status == "C" for o in results):
            warnings.append("corrected results (OBX-11 C) for an order with no earlier version")
        return OrderVersion(
            version=1,
            order_key=order.key,
            control_id=control_id,
            received_at=received_at,
            kind="original",
            results=results,
            changes=[
                ResultChange(key=result_key(o), change="added", value=o.value, status=o.status)
                for o in results
            ],
            warnings=warnings,
        )
    if previous.order_key and order.key and previous.order_key != order.key:
        raise ValueError(f"order {order.key} is not order {previous.order_key}")

    current: dict[str, Observation] = {result_key(o): o for o in previous.results}
    changes: list[ResultChange] = []
    for obs in order.observations:
        key = result_key(obs)
        old = current.get(key)
        if obs.status == "D":
            if old is not None:
                del current[key]
                changes.append(
                    ResultChange(
                        key=key,
                        change="deleted",
                        previous_value=old.value,
                        previous_status=old.status,
                        status="D",
                    )
                )
            continue
        if old is None:
            current[key] = obs
            changes.append(
                ResultChange(key=key, change="added", value=obs.value, status=obs.status)
            )
            if obs.status == "C":
                warnings.append(f"{key}: corrected (C) but not in version {previous.version}")
            continue
        if _same(old, obs):
            continue  # re-sent unchanged
        if obs.status != "C" and old.status in ("F", "C") and old.value != obs.value:
            warnings.append(f"{key}: final result changed without OBX-11 C")
        current[key] = obs
        changes.append(
            ResultChange(
                key=key,
                change="corrected" if obs.status == "C" else "updated",
                previous_value=old.value,
                value=obs.value,
                previous_status=old.status,
                status=obs.status,
            )
        )
    if not changes:
        return None
    kind: Literal["correction", "update"] = (
        "correction" if any(c.change == "corrected" for c in changes) else "update"
    )
    return OrderVersion(
        version=previous.version + 1,
        order_key=previous.order_key or order.key,
        control_id=control_id,
        received_at=received_at,
        kind=kind,
        results=list(current.values()),
        changes=changes,
        warnings=warnings,
        previous_version=previous.version,
    )
