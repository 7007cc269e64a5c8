"""CSV and XLSX of indicator tables and case lists. Both are written row by row: CSV as a
stream of text chunks, XLSX as its sheet's XML deflated into the file as it is produced
(a workbook of one sheet needs nothing more), so a quarter's case list never sits in
memory."""

from __future__ import annotations

import csv
import io
import math
import re
import zipfile
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, Any, cast
from zoneinfo import ZoneInfo

from worklist.qc.schemas import CaseOut, IndicatorOut

__all__ = ["case_table", "csv_chunks", "indicator_table", "write_xlsx", "xlsx_chunks"]

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


_MAIN_NS = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
_REL_NS = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
_PKG_RELS = "http://schemas.openxmlformats.org/package/2006/relationships"
_XML = '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
_SHEET_TYPE = "application/vnd.openxmlformats-officedocument.spreadsheetml"
_PARTS = {
    "[Content_Types].xml": (
        f'{_XML}<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.'
        'relationships+xml"/><Default Extension="xml" ContentType="application/xml"/>'
        f'<Override PartName="/xl/workbook.xml" ContentType="{_SHEET_TYPE}.sheet.main+xml"/>'
        '<Override PartName="/xl/worksheets/sheet1.xml"'
        f' ContentType="{_SHEET_TYPE}.worksheet+xml"/>'
        f'<Override PartName="/xl/styles.xml" ContentType="{_SHEET_TYPE}.styles+xml"/></Types>'
    ),
    "_rels/.rels": (
        f'{_XML}<Relationships xmlns="{_PKG_RELS}"><Relationship Id="rId1"'
        f' Type="{_REL_NS}/officeDocument" Target="xl/workbook.xml"/></Relationships>'
    ),
    "xl/_rels/workbook.xml.rels": (
        f'{_XML}<Relationships xmlns="{_PKG_RELS}">'
        f'<Relationship Id="rId1" Type="{_REL_NS}/worksheet" Target="worksheets/sheet1.xml"/>'
        f'<Relationship Id="rId2" Type="{_REL_NS}/styles" Target="styles.xml"/></Relationships>'
    ),
    "xl/styles.xml": (
        f'{_XML}<styleSheet xmlns="{_MAIN_NS}"><fonts count="2">'
        '<font><sz val="11"/><name val="Calibri"/><family val="2"/></font>'
        '<font><b/><sz val="11"/><name val="Calibri"/><family val="2"/></font></fonts>'
        '<fills count="2"><fill><patternFill patternType="none"/></fill>'
        '<fill><patternFill patternType="gray125"/></fill></fills>'
        '<borders count="1"><border><left/><right/><top/><bottom/><diagonal/></border></borders>'
        '<cellStyleXfs count="1"><xf numFmtId="0" fontId="0" fillId="0" borderId="0"/>'
        '</cellStyleXfs><cellXfs count="2">'
        '<xf numFmtId="0" fontId="0" fillId="0" borderId="0" xfId="0"/>'
        '<xf numFmtId="0" fontId="1" fillId="0" borderId="0" xfId="0" applyFont="1"/>'
        '</cellXfs><cellStyles count="1"><cellStyle name="Normal" xfId="0" builtinId="0"/>'
        "</cellStyles></styleSheet>"
    ),
}
# Characters XML 1.0 cannot carry: written as Excel's _xHHHH_ escapes (as Excel reads them).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
_SPECIAL = re.compile("[&<>\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
_SHEET_NAME_BAD = re.compile(r"[\[\]:*?/\\]")
_MAX_STRING = 32767  # Excel's limit of a cell's text
_FLUSH_ROWS = 2000


def _column_letters(n: int) -> list[str]:
    """A, B, ..., Z, AA, ... for the first ``n`` columns."""
    out = []
    for i in range(n):
        name, k = "", i + 1
        while k:
            k, rem = divmod(k - 1, 26)
            name = chr(65 + rem) + name
        out.append(name)
    return out


def _text(value: str) -> str:
    value = value[:_MAX_STRING]
    if not _SPECIAL.search(value):  # most cells: nothing to escape
        return value
    value = value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    if _CONTROL.search(value):
        value = _CONTROL.sub(lambda m: f"_x{ord(m.group()):04X}_", value)
    return value


def _cells(row: Iterable[Any], letters: list[str], r: int, style: str = "") -> str:
    parts = [f'<row r="{r}">']
    for col, value in zip(letters, row, strict=False):
        if value is None or value == "":
            continue
        if isinstance(value, bool):
            parts.append(f'<c r="{col}{r}"{style}><v>{int(value)}</v></c>')
        elif isinstance(value, int | float):
            if isinstance(value, float) and not math.isfinite(value):
                continue
            parts.append(f'<c r="{col}{r}"{style}><v>{value!r}</v></c>')
        else:
            text = _text(str(value))
            space = ' xml:space="preserve"' if text[:1].isspace() or text[-1:].isspace() else ""
            parts.append(f'<c r="{col}{r}"{style} t="inlineStr"><is><t{space}>{text}</t></is></c>')
    parts.append("</row>")
    return "".join(parts)


class _Drain:
    """A write-only file the zip writer fills and :func:`xlsx_chunks` empties (the zip
    writer keeps its own offsets when the file cannot tell or seek)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out, self.parts = b"".join(self.parts), []
        return out


def xlsx_chunks(
    sheet: str, header: list[str], rows: Iterable[list[Any]], *, counted: list[int] | None = None
) -> Iterator[bytes]:
    """The table as an XLSX workbook of one sheet, in chunks as it is produced (a response
    can stream them: memory stays flat however many rows). Cells are written by type
    (strings stay strings, as inline text: no URL, formula or number guessing), empty
    cells not at all; the header row is bold and frozen. ``counted`` gets the number of
    data rows appended at the end."""
    name = _text(_SHEET_NAME_BAD.sub("_", sheet)[:31].strip("'") or "Sheet1")
    letters = _column_letters(len(header))
    n = 0
    sink = _Drain()
    archive = cast(IO[bytes], sink)
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for part, text in _PARTS.items():
            zf.writestr(part, text)
        zf.writestr(
            "xl/workbook.xml",
            f'{_XML}<workbook xmlns="{_MAIN_NS}" xmlns:r="{_REL_NS}"><sheets>'
            f'<sheet name="{name}" sheetId="1" r:id="rId1"/></sheets></workbook>',
        )
        # No ZIP64 records: Excel refuses a part that carries them without needing them;
        # the sheet's sizes follow it in a 32-bit data descriptor (a sheet is far below
        # 2 GiB at Excel's 1,048,576 rows of case list).
        with zf.open("xl/worksheets/sheet1.xml", "w") as out:
            out.write(
                f'{_XML}<worksheet xmlns="{_MAIN_NS}" xmlns:r="{_REL_NS}"><sheetViews>'
                '<sheetView tabSelected="1" workbookViewId="0"><pane ySplit="1"'
                ' topLeftCell="A2" activePane="bottomLeft" state="frozen"/>'
                '<selection pane="bottomLeft"/></sheetView></sheetViews>'
                '<sheetFormatPr defaultRowHeight="15"/><sheetData>'.encode()
            )
            chunk = [_cells(header, letters, 1, ' s="1"')]
            for n, row in enumerate(rows, start=1):
                chunk.append(_cells(row, letters, n + 1))
                if len(chunk) >= _FLUSH_ROWS:
                    out.write("".join(chunk).encode())
                    chunk = []
                    if data := sink.take():
                        yield data
            chunk.append("</sheetData></worksheet>")
            out.write("".join(chunk).encode())
    yield sink.take()
    if counted is not None:
        counted.append(n)


def write_xlsx(path: Path, sheet: str, header: list[str], rows: Iterable[list[Any]]) -> int:
    """:func:`xlsx_chunks` into the file ``path``; returns the number of data rows."""
    counted: list[int] = []
    with path.open("wb") as f:
        for data in xlsx_chunks(sheet, header, rows, counted=counted):
            f.write(data)
    return counted[0]
