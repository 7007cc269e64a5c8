"""ER7 → typed models, against every file of the shared HL7 sample data (values read from
the files) and hand-written messages for what the samples lack (Chinese names, NNCHN,
OUL^R22/R24, HIL, CRLF/BOM)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from lab_results import (
    LabParseError,
    MalformedMessageError,
    UnsupportedMessageTypeError,
    parse_hl7_timestamp,
    parse_message,
    parse_messages,
    split_messages,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")


@pytest.fixture(scope="module")
def hl7_dir(testdata: Path) -> Path:
    return testdata / "hl7"


def _read(hl7_dir: Path, name: str) -> bytes:
    return (hl7_dir / name).read_bytes()


def test_every_sample_file_is_either_parsed_or_refused_with_a_reason(hl7_dir: Path) -> None:
    expected = {
        "msfhirconv_LAB-ORU-1.hl7": 1,
        "msfhirconv_LRI_2.0-NG_CBC_Typ_Message.hl7": 1,
        "pythonhl7_oru_r01_glucose.hl7": 1,
        "reportstream_CE-20200415-0001.hl7": 1,
        "reportstream_batch_message.hl7": 2,
        "reportstream_elims_1_72_3029202646_5532_NoPII.hl7": 1,
        "reportstream_sample_oru_CDPH_NBS_20241021-001.hl7": 1,
        "reportstream_single_message.hl7": 1,
        "non_oru/msfhirconv_ADT-A01-02.hl7": ("AR", "200", "unsupported message type ADT^A01"),
        # OUL^R22 is accepted like ORU, but this synthetic sample has an OBX without OBX-3
        "non_oru/msfhirconv_OUL-R22-01.hl7": (
            "AE",
            "101",
            "OBX-3 (observation identifier) is empty in segment 18",
        ),
        "malformed/reportstream_fail_onboarding_pass_prod.hl7": (
            "AE",
            "101",
            "PID-5 (patient name) is empty",
        ),
        "malformed/reportstream_output-invalid.hl7": (
            "AE",
            "101",
            "MSH-3/MSH-4 (sending application and facility) are empty",
        ),
    }
    found = {str(p.relative_to(hl7_dir)) for p in hl7_dir.rglob("*.hl7")}
    assert found == set(expected), "a sample file is not covered by this test"
    for name, outcome in expected.items():
        data = _read(hl7_dir, name)
        if isinstance(outcome, int):
            assert len(parse_messages(data, tz=SHANGHAI)) == outcome, name
        else:
            with pytest.raises(LabParseError) as info:
                parse_messages(data, tz=SHANGHAI)
            error = info.value
            assert (error.ack_code, error.error_code, error.reason) == outcome, name


def test_adt_is_an_unsupported_type_with_its_control_id(hl7_dir: Path) -> None:
    with pytest.raises(UnsupportedMessageTypeError) as info:
        parse_message(_read(hl7_dir, "non_oru/msfhirconv_ADT-A01-02.hl7"), tz=SHANGHAI)
    assert info.value.message_type == "ADT^A01"
    assert info.value.control_id == "MSG00001"


def test_lab_oru_1_bom_lf_two_orders_with_specimens(hl7_dir: Path) -> None:
    msg = parse_message(_read(hl7_dir, "msfhirconv_LAB-ORU-1.hl7"), tz=SHANGHAI)
    assert msg.header.control_id == "182"
    assert msg.header.sending_application.namespace_id == "SomeSystem"
    assert msg.header.version == "2.5"
    assert msg.header.processing_id == "T"
    assert msg.header.message_time == datetime(2014, 10, 5, 23, 45, tzinfo=UTC)  # +0700
    assert msg.patient.identifiers[0].value == "10006579"
    assert msg.patient.identifiers[0].type_code == "MR"
    assert msg.patient.names[0].family == "DUCK"
    assert msg.patient.birth_date == date(1924, 10, 10)
    first, second = msg.orders
    assert (first.placer_number, first.filler_number) == ("88502218", "82503246")
    assert first.service.code == "24317-0" and first.service.system == "LN"
    assert first.result_status == "F"
    # OBR-14 is a blank (' '): the received time comes from SPM-18
    assert first.received_at == datetime(2014, 10, 6, 1, 21, tzinfo=UTC)
    assert first.collected_at == datetime(2014, 10, 5, 22, 35, tzinfo=UTC)
    assert [o.status for o in first.observations] == ["I", "P", "I", "P", "F"]
    assert first.observations[0].value == "" and first.observations[0].numeric is None
    plt = first.observations[4]
    assert (plt.code.code, plt.numeric, plt.unit, plt.flags) == (
        "11125-2",
        221.0,
        "giga.l-1",
        ["N"],
    )
    assert first.specimens[0].specimen_id == "SpecimenID"
    assert first.specimens[0].type is not None and first.specimens[0].type.code == "BLD"
    assert second.filler_number == "890775544"
    assert [o.code.code for o in second.observations][-1] == "30180-4"


def test_nist_lri_cbc_units_ranges_flags_performing_lab(hl7_dir: Path) -> None:
    msg = parse_message(_read(hl7_dir, "msfhirconv_LRI_2.0-NG_CBC_Typ_Message.hl7"), tz=SHANGHAI)
    assert msg.header.accept_ack_type == "AL" and msg.header.application_ack_type == "NE"
    assert msg.header.enhanced_ack
    (order,) = msg.orders
    assert order.placer_number == "ORD666555" and order.placer_namespace == "NIST EHR"
    assert order.filler_number == "R-991133"
    assert order.service.alt_code == "4456544" and order.service.alt_system == "99USI"
    assert order.collected_at == datetime(2011, 1, 3, 22, 34, 28, tzinfo=UTC)
    assert order.reported_at == datetime(2011, 1, 5, 1, 0, 28, tzinfo=UTC)
    assert len(order.observations) == 28
    hb = order.observations[1]
    assert hb.code.code == "718-7"
    assert (hb.numeric, hb.unit, hb.unit_system) == (12.5, "g/mL", "UCUM")
    assert (hb.reference_range, hb.reference_low, hb.reference_high) == ("13 to 18", 13.0, 18.0)
    assert hb.flags == ["L"]
    assert hb.performing_lab is not None and hb.performing_lab.name == "Century Hospital"
    assert hb.analysed_at == datetime(2011, 1, 4, 0, 34, 28, tzinfo=UTC)
    wbc = order.observations[3]
    assert (wbc.numeric, wbc.flags) == (105600.0, ["HH"])
    aniso = order.observations[19]
    assert aniso.value_type == "CWE"
    assert aniso.value_coded is not None and aniso.value_coded.code == "260348001"
    assert aniso.flags == ["A"]
    assert order.observations[25].value == "Many spherocytes present."
    assert order.specimens[0].type is not None and order.specimens[0].type.code == "119297000"


def test_glucose_sn_value_local_time_and_bad_birth_date(hl7_dir: Path) -> None:
    msg = parse_message(_read(hl7_dir, "pythonhl7_oru_r01_glucose.hl7"), tz=SHANGHAI)
    assert msg.header.version == "2.4"
    # 200202150930 has no zone: read in Asia/Shanghai (+08:00)
    assert msg.header.message_time == datetime(2002, 2, 15, 1, 30, tzinfo=UTC)
    assert msg.patient.birth_date is None and msg.patient.birth_date_raw == "196203520"
    assert any("PID-7" in w for w in msg.warnings)
    sn = msg.orders[0].observations[0]
    assert (sn.value_type, sn.value, sn.numeric) == ("SN", "^182", 182.0)
    assert (sn.reference_low, sn.reference_high, sn.flags) == (70.0, 105.0, ["H"])
    assert msg.orders[0].placer_number == "845439"
    assert msg.orders[0].filler_namespace == "GHH LAB"


def test_batch_is_split_into_its_messages(hl7_dir: Path) -> None:
    data = _read(hl7_dir, "reportstream_batch_message.hl7")
    assert len(split_messages(data)) == 2
    first, second = parse_messages(data, tz=SHANGHAI)
    assert (first.header.control_id, second.header.control_id) == ("371784", "612092")
    assert first.patient.names[0].family == "Buckridge"
    assert second.patient.names[0].family == "Keeling"
    assert second.orders[0].filler_number == "b518ef23-1d9a-40c1-ac4b-ed7b438dfc4b"
    with pytest.raises(MalformedMessageError):
        parse_message(data, tz=SHANGHAI)


def test_reportstream_samples(hl7_dir: Path) -> None:
    single = parse_message(_read(hl7_dir, "reportstream_single_message.hl7"), tz=SHANGHAI)
    assert single.header.sending_facility.universal_id == "10D0876999"
    assert single.header.sending_facility.matches("Avante at Ormond Beach")
    assert single.header.facility_names == ["Avante at Ormond Beach", "10D0876999"]
    obs = single.orders[0].observations[0]
    assert obs.value_coded is not None and obs.value_coded.text == "Not detected"
    assert obs.flags == ["N"]
    assert single.orders[0].observations[-1].notes == ["This is a note"]
    spm = single.orders[0].specimens[0]
    assert spm.received_at == datetime(2021, 2, 9, 6, 0, tzinfo=UTC)  # -0600

    ce = parse_message(_read(hl7_dir, "reportstream_CE-20200415-0001.hl7"), tz=SHANGHAI)
    # placer empty in OBR-2 and ORC-2, filler in OBR-3
    assert ce.orders[0].filler_number == "d542f884-9598-eb11-aa9d-9b0caef93d5a"
    assert ce.orders[0].specimens[0].specimen_id == "d542f884-9598-eb11-aa9d-9b0caef93d5a"

    elims = parse_message(
        _read(hl7_dir, "reportstream_elims_1_72_3029202646_5532_NoPII.hl7"), tz=SHANGHAI
    )
    assert len(elims.orders) == 5
    assert elims.orders[1].observations[0].code.code == "PLT1141"
    assert elims.orders[0].observations[1].numeric == 76.0  # SN ^76
    assert len(elims.notes) == 2  # the NTE after PID

    nbs = parse_message(
        _read(hl7_dir, "reportstream_sample_oru_CDPH_NBS_20241021-001.hl7"), tz=SHANGHAI
    )
    cah = nbs.orders[1].observations
    assert cah[1].code.identifier == "99717-6"  # empty primary code: the alternate
    assert cah[1].code.alt_system == "L"
    assert (cah[1].reference_high, cah[1].flags) == (38.0, ["H"])
    assert cah[3].observed_at is None  # '220241021055726' has 15 digits
    assert any("220241021055726" in w for w in nbs.warnings)


CHINESE = (
    "\ufeffMSH|^~\\&|LIS|CLINIC_A^1.2.3^ISO|RDC|LEAD|20260301083000||OUL^R24^OUL_R24|C-1|P|2.5.1"
    "|||AL|NE||UNICODE UTF-8\r\n"
    "PID|1||P001^^^CLINIC_A^MR~110101199003074514^^^CHN^NNCHN||ZHANG^SAN^^^^^L^A~张^三^^^^^L^I||"
    "19900307|M\r\n"
    "OBR|1|PL-1|FL-1|CHEM^生化^L|S||20260301070000+0800|||||||20260301073000+0800||||||||"
    "20260301082500+0800|||F\r\n"
    "ORC|RE|PL-1|FL-1\r\n"
    "SPM|1|SP-1||SER^Serum^HL70487|||||||||||||20260301070000|20260301073000||||||HEM^Hemolyzed^HL70493\r\n"
    "OBX|1|NM|HIL-H^Hemolysis index^L||120|mg/dL|||||F\r\n"
    "OBX|2|NM|K^钾^L||6.5|mmol/L|3.5-5.3|HH|||F|||20260301080000|||"
    "ISE^Indirect ISE^L||||||LEADLAB\r\n"
    "OBX|3|ST|NA^钠^L||<100|mmol/L|137-147|L|||C\r\n"
)


def test_chinese_names_nnchn_oul_r24_crlf_bom_hil_and_priority() -> None:
    msg = parse_message(CHINESE.encode("utf-8"), tz=SHANGHAI)
    assert msg.header.message_type == "OUL^R24"
    assert msg.header.character_set == "UNICODE UTF-8"
    assert msg.patient.national_id == "110101199003074514"
    ideographic = msg.patient.ideographic_name
    assert ideographic is not None and (ideographic.family, ideographic.given) == ("张", "三")
    assert [n.representation for n in msg.patient.names] == ["A", "I"]
    (order,) = msg.orders
    assert order.priority == "S" and order.urgent
    assert order.service.text == "生化"
    assert order.received_at == datetime(2026, 2, 28, 23, 30, tzinfo=UTC)  # OBR-14
    assert order.reported_at == datetime(2026, 3, 1, 0, 25, tzinfo=UTC)
    (spm,) = order.specimens
    assert [c.code for c in spm.condition] == ["HEM"]
    assert order.hil.hemolysis == 120.0  # OBX HIL-H: an index, not a result
    assert spm.received_at == datetime(2026, 2, 28, 23, 30, tzinfo=UTC)  # no zone: +08:00
    k, na = order.observations  # OUL^R24: the results follow the specimen group
    assert (k.numeric, k.flags, k.observed_at) == (
        6.5,
        ["HH"],
        datetime(2026, 3, 1, 0, 0, tzinfo=UTC),
    )
    assert k.method is not None and k.method.code == "ISE"
    assert k.performing_lab is not None and k.performing_lab.name == "LEADLAB"
    assert (na.numeric, na.comparator, na.status) == (100.0, "<", "C")


OUL_R22 = (
    "MSH|^~\\&|ANALYSER|CLINIC_B|RDC|LEAD|20260301083000+0800||OUL^R22^OUL_R22|C-2|P|2.5.1\n"
    "PID|1||P002^^^CLINIC_B^MR||LI^SI\n"
    "SPM|1|SP-9||SER|||||||||||||20260301070000+0800|20260301073000+0800\n"
    "OBX|1|NM|HIL-L^Lipaemia index^L||35||||||F\n"
    "OBR|1|PL-9||GLU^Glucose^L\n"
    "ORC|SC|PL-9|FL-9||||^^^^^R\n"
    "OBX|1|NM|GLU^Glucose^L||5.1|mmol/L|3.9-6.1|N|||F\n"
)


def test_oul_r22_specimen_first_orc_after_obr() -> None:
    msg = parse_message(OUL_R22, tz=SHANGHAI)
    (order,) = msg.orders
    assert order.filler_number == "FL-9"  # from the ORC that follows its OBR
    assert order.priority == "R"  # ORC-7 component 6
    assert order.specimens[0].specimen_id == "SP-9"
    assert order.received_at == datetime(2026, 2, 28, 23, 30, tzinfo=UTC)
    assert order.observations[0].numeric == 5.1
    assert order.observations[0].reference_low == 3.9
    assert order.specimens[0].hil.lipemia == 35.0 and order.hil.lipemia == 35.0
    assert len(order.observations) == 1


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "no MSH segment: not an HL7 v2 message"),
        ("PID|1||X\r", "segment 'PID' before the first MSH"),
        ("MSH|^~\\&|A|B|||2026||ORU^R01||P|2.5\rPID|1||X||Y^Z\rOBR|1\r", "MSH-10"),
        ("MSH|^~\\&|A|B|||2026||^|1|P|2.5\r", "MSH-9"),
        ("MSH|^~\\&|A|B|||2026||ORU^R01|1|P|2.5\rOBR|1\r", "no PID segment"),
        ("MSH|^~\\&|A|B|||2026||ORU^R01|1|P|2.5\rPID|1||X||Y\r", "no OBR segment"),
        (
            "MSH|^~\\&|A|B|||2026||ORU^R01|1|P|2.5\rPID|1||X||Y\rPID|1||Z||W\rOBR|1\r",
            "more than one",
        ),
        (
            "MSH|^~\\&|A|B|||2026||ORU^R01|1|P|2.5\rPID|1||X||Y\rOBR|1\rOBX|1|NM|K||4||||||\r",
            "OBX-11",
        ),
        ("MSH|^~\\&|A|B|||2026||ORU^R01|1|P|2.5\rthis is not hl7\r", "is not an HL7 segment"),
    ],
)
def test_malformed_messages_name_their_reason(text: str, reason: str) -> None:
    with pytest.raises(MalformedMessageError) as info:
        parse_messages(text, tz=SHANGHAI)
    assert reason in info.value.reason
    assert info.value.ack_code == "AE"


def test_invalid_utf8_is_malformed() -> None:
    with pytest.raises(MalformedMessageError, match="utf-8"):
        parse_message(b"MSH|^~\\&|A|B|||2026||ORU^R01|1|P|2.5\rPID|1||\xff\r", tz=SHANGHAI)


def test_oru_other_trigger_is_unsupported() -> None:
    with pytest.raises(UnsupportedMessageTypeError) as info:
        parse_message("MSH|^~\\&|A|B|||2026||ORU^R30|1|P|2.5\r", tz=SHANGHAI)
    assert info.value.reason == "unsupported message type ORU^R30"
    assert info.value.ack_code == "AR"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026", datetime(2025, 12, 31, 16, 0, tzinfo=UTC)),
        ("202603011230", datetime(2026, 3, 1, 4, 30, tzinfo=UTC)),
        ("20260301123015.25", datetime(2026, 3, 1, 4, 30, 15, 250000, tzinfo=UTC)),
        ("20260301123000-0500", datetime(2026, 3, 1, 17, 30, tzinfo=UTC)),
        ("20260301123000+0000", datetime(2026, 3, 1, 12, 30, tzinfo=UTC)),
        ("", None),
    ],
)
def test_hl7_timestamps(value: str, expected: datetime | None) -> None:
    assert parse_hl7_timestamp(value, SHANGHAI) == expected


@pytest.mark.parametrize(
    "value", ["2026030", "220241021055726", "20261301", "2026-03-01", "2026+9900"]
)
def test_bad_hl7_timestamps(value: str) -> None:
    with pytest.raises(ValueError):
        parse_hl7_timestamp(value, SHANGHAI)


GB_MESSAGE = (
    "MSH|^~\\&|LIS|CLINIC_A|RDC|LEAD|20260301083000||ORU^R01|G-1|P|2.5.1|||||CHN|{charset}\r"
    "PID|1||P9^^^CLINIC_A^MR||李^四^^^^^L^I||19800101|F\r"
    "OBR|1|PL|FL|GLU^葡萄糖^L\r"
    "OBX|1|NM|GLU^葡萄糖^L||5.0|mmol/L|3.9-6.1|N|||F\r"
)


def test_gb18030_declared_in_msh18() -> None:
    data = GB_MESSAGE.format(charset="GB 18030-2000").encode("gb18030")
    msg = parse_message(data, tz=SHANGHAI)
    assert msg.patient.names[0].family == "李"
    assert msg.orders[0].observations[0].code.text == "葡萄糖"


def test_gb18030_without_msh18_needs_the_senders_default() -> None:
    data = GB_MESSAGE.format(charset="").encode("gb18030")
    with pytest.raises(MalformedMessageError) as info:
        parse_message(data, tz=SHANGHAI)
    assert info.value.error_code == "102"
    assert info.value.reason.startswith("message is not valid utf-8")
    msg = parse_message(data, tz=SHANGHAI, encoding="gb18030")
    assert msg.patient.names[0].given == "四"


def test_unknown_character_set_is_refused() -> None:
    data = GB_MESSAGE.format(charset="EBCDIC").encode("ascii", "replace")
    with pytest.raises(MalformedMessageError, match="MSH-18 character set 'EBCDIC'"):
        parse_message(data, tz=SHANGHAI)


def test_escape_sequences_and_other_delimiters() -> None:
    text = (
        "MSH|$~\\&|LIS|CLINIC_A|RDC|LEAD|20260301083000||ORU$R01|E-1|P|2.5.1\r"
        "PID|1||P1$$$CLINIC_A$MR~ID2||WANG$WU\r"
        "OBR|1|PL|FL|U$Urine$L\r"
        "OBX|1|ST|NOTE$Comment$L||A\\T\\B \\F\\ C\\S\\D \\E\\ x\\.br\\y||||||F\r"
        "NTE|1||see \\T\\ note\r"
    )
    msg = parse_message(text, tz=SHANGHAI)
    assert msg.header.message_type == "ORU^R01"
    assert [i.value for i in msg.patient.identifiers] == ["P1", "ID2"]
    assert msg.patient.identifiers[0].type_code == "MR"
    (obs,) = msg.orders[0].observations
    assert obs.code.text == "Comment"
    assert obs.value.startswith("A&B | C$D \\ x")
    assert obs.notes == ["see & note"]


def test_delimiters_must_be_distinct() -> None:
    with pytest.raises(MalformedMessageError, match="not distinct"):
        parse_message("MSH|^^\\&|A|B|||2026||ORU^R01|1|P|2.5\r", tz=SHANGHAI)
