"""The shipped LOINC subset and the mapping of OBX codes to it."""

from __future__ import annotations

from pathlib import Path

from ucumvert import get_ucum_parser

from lab_results import (
    LocalCodeMapping,
    Mapped,
    Unmapped,
    load_catalogue,
    load_critical_limits,
    load_local_mappings,
    load_rules,
    loinc_notice,
    map_observation,
    map_order,
    parse_message,
)
from lab_results.mapping import units_match
from tests.lab_results.lab_messages import SHANGHAI, mapped, message, obx


def _loinc_check_digit_ok(code: str) -> bool:
    body, check = code.split("-")
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d // 10 + d % 10
    return (10 - total % 10) % 10 == int(check)


def test_catalogue_has_about_a_hundred_analytes_with_valid_codes_and_ucum_units() -> None:
    catalogue = load_catalogue()
    assert 100 <= len(catalogue) <= 150
    parser = get_ucum_parser()
    for entry in catalogue.entries:
        assert _loinc_check_digit_ok(entry.loinc), entry.loinc
        assert entry.name_zh and entry.long_common_name
        if entry.kind == "quantitative":
            parser.parse(entry.unit)  # raises on a unit that is not UCUM
    categories = {e.category for e in catalogue.entries}
    assert {
        "electrolytes",
        "lipids",
        "liver",
        "renal",
        "cbc",
        "coagulation",
        "thyroid",
    } <= categories


def test_catalogue_entries_and_recognition_windows() -> None:
    catalogue = load_catalogue()
    k = catalogue.by_loinc("2823-3")
    assert k is not None
    assert (k.analyte, k.name_zh, k.unit, k.recognition_window_days) == ("K", "钾", "mmol/L", 7)
    for analyte in ("K", "NA", "CL", "CA", "MG", "FE", "TIBC", "PHOS", "LI"):  # DOMAIN §C4
        entry = catalogue.by_analyte(analyte)
        assert entry is not None and entry.recognition_window_days == 7, analyte
    for analyte in ("TP", "ALB", "FERR", "GLU", "TC", "TG", "HDL", "LDL", "APOA1", "APOB", "TBIL"):
        entry = catalogue.by_analyte(analyte)
        assert entry is not None and entry.recognition_window_days == 30, analyte
    hba1c = catalogue.by_analyte("HBA1C")
    assert hba1c is not None and (hba1c.loinc, hba1c.recognition_window_days) == ("4548-4", 60)
    for code, unit in [
        ("718-7", "g/L"),
        ("777-3", "10*9/L"),
        ("6690-2", "10*9/L"),
        ("6301-6", "{INR}"),
    ]:
        entry = catalogue.by_loinc(code)
        assert entry is not None and entry.unit == unit
    blood_culture = catalogue.by_analyte("BCX")
    assert blood_culture is not None and blood_culture.recognition_window_days is None


def test_loinc_notice_is_shipped() -> None:
    notice = loinc_notice()
    assert "Regenstrief Institute, Inc." in notice
    assert "https://loinc.org/license" in notice


def test_rule_set_and_critical_limits_name_only_catalogue_analytes() -> None:
    catalogue = load_catalogue()
    rules = load_rules()
    for analyte in rules.analytes:
        assert catalogue.by_analyte(analyte) is not None, analyte
    for logic in rules.logic:
        for analyte in logic.analytes:
            assert catalogue.by_analyte(analyte) is not None, (logic.id, analyte)
    critical = load_critical_limits()
    for analyte, limits in critical.limits.items():
        entry = catalogue.by_analyte(analyte)
        assert entry is not None, analyte
        assert units_match(limits.unit, entry.unit), analyte
    assert set(critical.qualitative) == {"BCX"}


def test_loinc_coded_observation_maps_directly(testdata: Path) -> None:
    msg = parse_message(
        (testdata / "hl7" / "msfhirconv_LRI_2.0-NG_CBC_Typ_Message.hl7").read_bytes(), tz=SHANGHAI
    )
    order = map_order(msg.orders[0], facility="NIST Lab Facility", catalogue=load_catalogue())
    hb = order.results[1]
    assert isinstance(hb.mapping, Mapped)
    assert (hb.mapping.entry.analyte, hb.mapping.via) == ("HGB", "loinc")
    assert not hb.mapping.unit_ok  # g/mL is not the catalogue's g/L
    hct = order.results[2]
    assert isinstance(hct.mapping, Mapped) and hct.mapping.unit_ok  # %
    # codes outside the subset wait in the mapping queue, once each
    queue = order.unmapped
    assert "30385-9" in {u.code for u in queue}
    assert all(u.facility == "NIST Lab Facility" for u in queue)
    assert len({u.queue_key for u in queue}) == len(queue)


def test_local_codes_map_through_the_senders_table_only() -> None:
    local = [
        LocalCodeMapping(facility="CLINIC_A", local_code="K", loinc="2823-3"),
        LocalCodeMapping(facility="*", local_code="GLU", loinc="14749-6"),
    ]
    msg = message(obx("K", "4.2", "mmol/L", system="L"), obx("GLU", "5.0", "mmol/l", system="L"))
    k, glu = msg.orders[0].observations
    catalogue = load_catalogue()
    mapped_k = map_observation(k, facility="CLINIC_A", catalogue=catalogue, local_mappings=local)
    assert isinstance(mapped_k, Mapped) and mapped_k.entry.loinc == "2823-3"
    assert mapped_k.via == "local"
    # the same local code from another sender is not guessed
    other = map_observation(k, facility="CLINIC_B", catalogue=catalogue, local_mappings=local)
    assert isinstance(other, Unmapped)
    assert other.reason == "local code K of CLINIC_B has no mapping"
    assert (other.code, other.system, other.unit) == ("K", "L", "mmol/L")
    # a "*" row applies to every sender; units compare case-insensitively
    mapped_glu = map_observation(
        glu, facility="CLINIC_B", catalogue=catalogue, local_mappings=local
    )
    assert isinstance(mapped_glu, Mapped) and mapped_glu.unit_ok


def test_unknown_loinc_and_local_codes_go_to_the_mapping_queue(testdata: Path) -> None:
    order = mapped(obx("1834-1", "3.1", "ng/mL"), obx("99999-9", "1", "mmol/L"))
    assert isinstance(order.results[0].mapping, Mapped)  # AFP is in the subset
    queued = order.results[1].mapping
    assert isinstance(queued, Unmapped)
    assert queued.reason == "LOINC 99999-9 is not in the alliance test catalogue"
    glucose = parse_message(
        (testdata / "hl7" / "pythonhl7_oru_r01_glucose.hl7").read_bytes(), tz=SHANGHAI
    )
    order = map_order(glucose.orders[0], facility="ELAB-3", catalogue=load_catalogue())
    assert [u.code for u in order.unmapped] == ["1554-5", "1553-5"]
    assert order.unmapped[0].text == "GLUCOSE" and order.unmapped[0].unit == "mg/dl"


def test_local_mappings_csv(tmp_path: Path) -> None:
    path = tmp_path / "local.csv"
    path.write_text("facility,local_code,loinc\nCLINIC_A,KAL,2823-3\n", encoding="utf-8")
    (row,) = load_local_mappings(path)
    assert (row.facility, row.local_code, row.loinc) == ("CLINIC_A", "KAL", "2823-3")
    order = mapped(
        obx("KAL", "4.0", "mmol/L", system="99LOCAL"), local={("CLINIC_A", "KAL"): "2823-3"}
    )
    assert order.results[0].analyte == "K"


def test_units_match() -> None:
    assert units_match("mmol/l", "mmol/L")
    assert units_match("10^9/L", "10*9/L")
    assert units_match("giga.l-1", "10*9/L")
    assert units_match("µmol/L", "umol/L")
    assert units_match("mIU/L", "m[IU]/L")
    assert not units_match("mg/dL", "mmol/L")
    assert not units_match("", "mmol/L")
