"""One order of a received message, start to end, as the intake service will call it:
the new result version (corrections kept as history), the mapping of every result, and the
auto-verification verdict with its traces and critical findings. Pure: the caller passes
the stored previous version, the sender's local-code table and the priors it looked up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from pydantic import BaseModel

from lab_results.autoverify import AutoverificationResult, PriorResult, RuleSet, autoverify
from lab_results.corrections import OrderVersion, apply_correction
from lab_results.mapping import LocalCodeMapping, MappedOrder, TestCatalogue, Unmapped, map_order
from lab_results.parse import Order

__all__ = ["OrderEvaluation", "evaluate_order"]


class OrderEvaluation(BaseModel):
    version: OrderVersion
    mapped: MappedOrder
    verification: AutoverificationResult

    @property
    def unmapped(self) -> list[Unmapped]:
        """Codes to put in the admin mapping queue."""
        return self.mapped.unmapped


def evaluate_order(
    order: Order,
    *,
    control_id: str,
    facility: str,
    catalogue: TestCatalogue,
    rules: RuleSet,
    previous: OrderVersion | None = None,
    local_mappings: Sequence[LocalCodeMapping] | Mapping[tuple[str, str], str] = (),
    priors: Sequence[PriorResult] = (),
    sex: str = "",
    stop_switch: bool = False,
    received_at: datetime | None = None,
) -> OrderEvaluation | None:
    """The order's next version, mapped and auto-verified as a whole (a corrected version is
    verified again with its carried-over results). ``None`` when the message repeats the
    stored version."""
    version = apply_correction(previous, order, control_id=control_id, received_at=received_at)
    if version is None:
        return None
    current = order.model_copy(update={"observations": version.results})
    mapped = map_order(
        current, facility=facility, catalogue=catalogue, local_mappings=local_mappings
    )
    verification = autoverify(mapped, priors, rules, stop_switch, sex=sex)
    return OrderEvaluation(version=version, mapped=mapped, verification=verification)
