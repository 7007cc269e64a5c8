"""CSV and XLSX of indicator tables and case lists. Both are written row by row: CSV as a
stream of text chunks, XLSX with xlsxwriter's constant-memory mode into a temporary file,
so a quarter's case list never sits in memory."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import xlsxwriter

from worklist.qc.schemas import CaseOut, IndicatorOut

__all__ = ["case_table", "csv_chunks", "indicator_table", "write_xlsx"]

_INDICATOR_HEADER = [
    "code",
    "name_zh",
    "name_en",
    "group",
    "numerator",
    "denominator",
    "rate",
    "value",
    "unit",
    "p50_min",
    "p90_min",
    "target",
    "direction",
    "status",
    "previous_value",
    "change",
    "source",
]
_CASE_HEADER = [
    "case_id",
    "exam_id",
    "accession",
    "clinic",
    "discipline",
    "modality",
    "priority",
    "reader",
    "at",
    "start_at",
    "end_at",
    "due_at",
    "minutes",
    "in_numerator",
    "reason",
]


def indicator_table(indicators: list[IndicatorOut]) -> tuple[list[str], Iterator[list[Any]]]:
    """One row per indicator, then one per group of its breakdown (``group`` column)."""

    def rows() -> Iterator[list[Any]]:
        for ind in indicators:
            yield [
                ind.code,
                ind.name_zh,
                ind.name_en,
                "",
                ind.numerator,
                ind.denominator,
                ind.rate,
                ind.value,
                ind.unit,
                ind.p50,
                ind.p90,
                ind.target,
                ind.direction,
                ind.status,
                ind.previous_value,
                ind.change,
                ind.source,
            ]
            for g in ind.groups or []:
                yield [
                    ind.code,
                    ind.name_zh,
                    ind.name_en,
                    g.key if g.key is not None else "",
                    g.numerator,
                    g.denominator,
                    g.rate,
                    g.value,
                    ind.unit,
                    g.p50,
                    g.p90,
                    ind.target,
                    ind.direction,
                    g.status,
                    None,
                    None,
                    ind.source,
                ]

    return list(_INDICATOR_HEADER), rows()


def _local(value: datetime | None, zone: ZoneInfo) -> str:
    return "" if value is None else value.astimezone(zone).isoformat(timespec="seconds")


def case_table(cases: Iterable[CaseOut], tz: str) -> tuple[list[str], Iterator[list[Any]]]:
    """One row per case; times in the clinics' time zone with their offset."""
    zone = ZoneInfo(tz)

    def rows() -> Iterator[list[Any]]:
        for c in cases:
            yield [
                c.case_id,
                c.exam_id,
                c.accession,
                c.clinic,
                c.discipline,
                c.modality,
                c.priority,
                c.reader,
                _local(c.at, zone),
                _local(c.start_at, zone),
                _local(c.end_at, zone),
                _local(c.due_at, zone),
                c.minutes,
                1 if c.in_numerator else 0,
                c.reason,
            ]

    return list(_CASE_HEADER), rows()


def csv_chunks(header: list[str], rows: Iterable[list[Any]], *, batch: int = 500) -> Iterator[str]:
    """UTF-8 CSV with a byte-order mark (so spreadsheet programs read the Chinese right)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    buffer.write("\ufeff")
    writer.writerow(header)
    for n, row in enumerate(rows, start=1):
        writer.writerow(["" if v is None else v for v in row])
        if n % batch == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def write_xlsx(path: Path, sheet: str, header: list[str], rows: Iterable[list[Any]]) -> int:
    """Write the table to ``path`` row by row; returns the number of data rows. Cells are
    written by type (strings stay strings: no URL, formula or number guessing), empty cells
    not at all."""
    workbook = xlsxwriter.Workbook(
        str(path),
        {
            "constant_memory": True,
            "in_memory": False,
            "strings_to_urls": False,
            "strings_to_formulas": False,
            "strings_to_numbers": False,
        },
    )
    try:
        ws = workbook.add_worksheet(sheet[:31])
        bold = workbook.add_format({"bold": True})
        ws.write_row(0, 0, header, bold)
        write_string, write_number = ws.write_string, ws.write_number
        n = 0
        for n, row in enumerate(rows, start=1):
            for col, value in enumerate(row):
                if value is None or value == "":
                    continue
                if isinstance(value, bool):
                    write_number(n, col, int(value))
                elif isinstance(value, int | float):
                    write_number(n, col, value)
                else:
                    write_string(n, col, str(value))
        ws.freeze_panes(1, 0)
    finally:
        workbook.close()
    return n
