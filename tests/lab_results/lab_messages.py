"""Hand-written ER7 lab messages for the domain-core tests (parsed by the real parser)."""

from __future__ import annotations

from zoneinfo import ZoneInfo

from lab_results import LabMessage, MappedOrder, load_catalogue, map_order, parse_message

SHANGHAI = ZoneInfo("Asia/Shanghai")
FACILITY = "CLINIC_A"


def obx(
    code: str,
    value: str,
    unit: str = "",
    *,
    flags: str = "",
    status: str = "F",
    value_type: str = "NM",
    system: str = "LN",
    ref: str = "",
    when: str = "",
    sub_id: str = "",
) -> str:
    fields = [value_type, f"{code}^^{system}", sub_id, value, unit, ref, flags, "", "", status]
    return "OBX|1|" + "|".join(fields) + f"|||{when}"


def message(
    *lines: str,
    sex: str = "M",
    collected: str = "20260301070000",
    control_id: str = "MSG-1",
    filler: str = "FL-1",
    spm: str = "",
) -> LabMessage:
    text = "\r".join(
        [
            f"MSH|^~\\&|LIS|{FACILITY}|RDC|LEAD|20260301090000||ORU^R01^ORU_R01|{control_id}|P|2.5.1",
            f"PID|1||P001^^^{FACILITY}^MR||WANG^WU||19700101|{sex}",
            f"OBR|1|PL-1|{filler}|PANEL^Panel^L|||{collected}|||||||||||||||20260301085000|||F",
            *lines,
            *([spm] if spm else []),
        ]
    )
    return parse_message(text, tz=SHANGHAI)


def mapped(*lines: str, local: dict[tuple[str, str], str] | None = None, **kw: str) -> MappedOrder:
    msg = message(*lines, **kw)
    return map_order(
        msg.orders[0], facility=FACILITY, catalogue=load_catalogue(), local_mappings=local or {}
    )
