"""Quality control: the indicators (national radiology and lab sets, the alliance's own),
their case lists, versioned targets, exports and the monthly report."""

from worklist.qc.definitions import INDICATORS, Indicator
from worklist.qc.service import (
    GROUPS,
    QcFilters,
    compute_indicators,
    histogram,
    iter_cases,
    list_cases,
    list_targets,
    month_period,
    period_filters,
    set_target,
    target_history,
)

__all__ = [
    "GROUPS",
    "INDICATORS",
    "Indicator",
    "QcFilters",
    "compute_indicators",
    "histogram",
    "iter_cases",
    "list_cases",
    "list_targets",
    "month_period",
    "period_filters",
    "set_target",
    "target_history",
]
