"""The 互认 mark of each row of a signed lab report (lab_results.reading.row_recognition):
the analyte's own window from the test catalogue, else the catalogue item's; nothing for a
rejected or non-final result, an analyte outside the catalogue, a clinic not accredited for
the item, or a signer who may not grant recognition. Also the reference-range parser."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest

from lab_results import load_catalogue
from lab_results.reading import parse_range, row_recognition
from lab_results.schemas import LabResultOut
from worklist.models import Discipline
from worklist.recognition.models import CatalogItem

COLLECTED = date(2026, 3, 1)
ITEMS = [
    CatalogItem(
        code="LAB-ELEC",
        discipline=Discipline.LAB,
        name_zh="电解质",
        scope_mark="HR",
        valid_days=30,
        test_codes=["2823-3", "2951-2"],
    ),
    CatalogItem(
        code="LAB-LOCAL",
        discipline=Discipline.LAB,
        name_zh="本地项目",
        scope_mark="皖HR",
        valid_days=90,
        test_codes=["ZZ1"],
    ),
]
GRANTED: dict[str, Any] = {
    "granted": True,
    "reasons": [{"code": "reader_qualified", "passed": True, "text": "ok"}],
}


def result(loinc: str | None, analyte: str | None, *, status: str = "F") -> LabResultOut:
    return LabResultOut(
        id="r1",
        key=f"LN|{loinc}|",
        set_id="1",
        code=loinc or "X1",
        code_system="LN",
        code_text="",
        loinc=loinc,
        analyte=analyte,
        name_zh="",
        name_en="",
        value_type="NM",
        value="4.1",
        numeric=4.1,
        comparator="",
        unit="mmol/L",
        unit_ok=True,
        reference_range="3.5-5.3",
        flags=[],
        status=status,
        method="",
        performing_lab="",
        observed_at=None,
        version=1,
        verdict="pass",
        critical=False,
        autoverification=[],
        rules_version="",
    )


def mark(res: LabResultOut, **kw: Any) -> tuple[bool, str | None, str | None]:
    args: dict[str, Any] = {
        "result": res,
        "decision": "approved",
        "exam_decision": GRANTED,
        "items": ITEMS,
        "accredited": {"LAB-ELEC": True, "LAB-LOCAL": True},
        "tests": load_catalogue(),
        "collected": COLLECTED,
    }
    args.update(kw)
    row = row_recognition(**args)
    return row.granted, row.mark, row.recognizable_until


def test_window_of_the_analyte_else_of_the_item() -> None:
    # Potassium: 7 days in the test catalogue, although its item says 30.
    assert mark(result("2823-3", "K")) == (True, "HR", "2026-03-08")
    # A local code without a catalogue window: the item's 90 days and its provincial mark.
    assert mark(result(None, "ZZ1")) == (True, "皖HR", "2026-05-30")


@pytest.mark.parametrize(
    ("res", "kw"),
    [
        (result("2823-3", "K"), {"decision": "rejected"}),
        (result("2823-3", "K", status="P"), {}),
        (result("2345-7", "GLU"), {}),  # not in any lab item of the catalogue
        (result("2823-3", "K"), {"accredited": {"LAB-ELEC": False}}),
        (result("2823-3", "K"), {"exam_decision": None}),  # preliminary signature
        (
            result("2823-3", "K"),
            {
                "exam_decision": {
                    "granted": False,
                    "reasons": [
                        {"code": "reader_not_qualified", "passed": False, "text": "resident"}
                    ],
                }
            },
        ),
    ],
)
def test_no_mark(res: LabResultOut, kw: dict[str, Any]) -> None:
    assert mark(res, **kw) == (False, None, None)


def test_the_order_level_catalogue_miss_does_not_decide_the_rows() -> None:
    # The report-level decision found no single item for the whole order: each row decides.
    decision = {
        "granted": False,
        "reasons": [
            {"code": "not_in_catalogue", "passed": False, "text": "not in catalogue"},
            {"code": "reader_qualified", "passed": True, "text": "ok"},
        ],
    }
    assert mark(result("2951-2", "NA"), exam_decision=decision)[0] is True


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3.5-5.3", (3.5, 5.3)),
        ("137 - 147", (137.0, 147.0)),
        ("<5.2", (None, 5.2)),
        (">=1.0", (1.0, None)),
        ("-2.0-2.0", (-2.0, 2.0)),
        ("阴性", (None, None)),
        ("", (None, None)),
    ],
)
def test_reference_range(text: str, expected: tuple[float | None, float | None]) -> None:
    assert parse_range(text) == expected
