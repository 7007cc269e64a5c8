"""Mutual recognition (检查检验结果互认): the catalogue of recognised items, institutions'
QC accreditations, the evaluation at signing, the lookup of still-valid results, declines."""

from worklist.recognition.catalog import load_accreditations, load_catalog
from worklist.recognition.service import (
    decline_result,
    evaluate_report,
    list_declines,
    recognition_for_report,
    recognized_results,
)

__all__ = [
    "decline_result",
    "evaluate_report",
    "list_declines",
    "load_accreditations",
    "load_catalog",
    "recognition_for_report",
    "recognized_results",
]
