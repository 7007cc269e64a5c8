"""The XLSX writer of the QC exports: a workbook spreadsheet programs read, every cell as
written (strings stay strings, numbers numbers, text XML cannot carry escaped), produced in
chunks as the rows come (a response streams them)."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import openpyxl

from worklist.qc.export import write_xlsx, xlsx_chunks

HEADER = [f"col{i}" for i in range(30)]  # past Z: AA, AB, ...


def _row(i: int) -> list[object]:
    row: list[object] = [f"text {i}", i, i + 0.5, None, "", "0012", "=1+1", "<a & b>", True]
    row += [" padded ", "医生 甲", "bell\x07here", "http://x.test/a"]
    return row + [f"c{i}-{k}" for k in range(len(HEADER) - len(row))]


def test_cells_read_back_as_written(tmp_path: Path) -> None:
    path = tmp_path / "cases.xlsx"
    assert write_xlsx(path, "TAT-07: [cases]", HEADER, (_row(i) for i in range(3))) == 3
    book = openpyxl.load_workbook(path)
    sheet = book.active
    assert sheet is not None
    assert sheet.title == "TAT-07_ _cases_"  # characters a sheet name cannot hold
    assert sheet.freeze_panes == "A2" and sheet["A1"].font.b and not sheet["A2"].font.b
    rows = list(sheet.iter_rows(values_only=True))
    assert list(rows[0]) == HEADER and len(rows) == 4
    first = list(rows[1])
    assert first[:9] == ["text 0", 0, 0.5, None, None, "0012", "=1+1", "<a & b>", 1]
    assert first[9:13] == [" padded ", "医生 甲", "bell_x0007_here", "http://x.test/a"]
    assert first[-1] == "c0-16" and rows[3][1] == 2
    assert sheet["G2"].data_type == "s"  # a formula's text stays text


def test_chunks_come_as_the_rows_do() -> None:
    pulled = 0

    def rows() -> Iterator[list[object]]:
        nonlocal pulled
        for i in range(10_000):
            pulled += 1
            yield _row(i)

    chunks = xlsx_chunks("big", HEADER, rows())
    first = next(chunks)
    assert first and pulled < 10_000  # some bytes before every row was read
    data = first + b"".join(chunks)
    sheet = openpyxl.load_workbook(io.BytesIO(data), read_only=True).active
    assert sheet is not None
    assert sum(1 for _ in sheet.iter_rows(values_only=True)) == 10_001


def test_the_package_has_no_zip64_records() -> None:
    """Excel refuses a workbook whose parts carry ZIP64 records they do not need (a
    streamed part's sizes go in a 32-bit data descriptor instead)."""
    data = b"".join(xlsx_chunks("cases", HEADER, (_row(i) for i in range(100))))
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
    assert [i.filename for i in infos][-1] == "xl/worksheets/sheet1.xml"
    for info in infos:
        assert info.extract_version == 20 and info.create_version == 20, info.filename
        assert b"\x01\x00" not in info.extra[:2], info.filename  # no ZIP64 extra field
    sheet = infos[-1]
    assert sheet.flag_bits & 0x08  # sizes follow the data (streamed)
    # the data descriptor: signature, CRC-32 and two 32-bit sizes (16 bytes, not 24)
    descriptors = [i for i in range(len(data)) if data.startswith(b"PK\x07\x08", i)]
    assert len(descriptors) == len(infos)
    for at in descriptors:
        assert data[at + 16 : at + 20] in (b"PK\x03\x04", b"PK\x01\x02")
