"""Observation codes → the alliance test catalogue (a LOINC subset shipped with RDC).

An OBX coded in LOINC (OBX-3 system ``LN``, or the alternate triplet) maps directly when the
code is in the catalogue. A local code maps through the sender's local-code table (sending
facility + local code → LOINC; a row with facility ``*`` applies to every sender). Nothing is
guessed: a code that is in neither comes back as :class:`Unmapped`, for the administrators'
mapping queue, with what the sender said (code, text, system, unit) so the row can be added.

The catalogue is data (``lab_results/data/loinc_subset.csv``, see ``LOINC_NOTICE.txt``);
the local-code table comes from the database (the intake service passes it in) or a CSV
with columns ``facility,local_code,loinc`` (optional ``system``).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from lab_results.parse import Observation, Order

__all__ = [
    "LOINC_SYSTEMS",
    "CatalogueEntry",
    "LocalCodeMapping",
    "Mapped",
    "MappedOrder",
    "MappedResult",
    "TestCatalogue",
    "Unmapped",
    "load_catalogue",
    "load_local_mappings",
    "loinc_notice",
    "map_observation",
    "map_order",
    "units_match",
]

#: OBX-3 coding-system names that mean LOINC (HL7 table 0396 ``LN``, its OID, spellings).
LOINC_SYSTEMS = frozenset({"LN", "LOINC", "2.16.840.1.113883.6.1", "HTTP://LOINC.ORG"})
_ANY_FACILITY = "*"


class CatalogueEntry(BaseModel):
    analyte: str  # the alliance's short key, used by the rule set (K, NA, GLU…)
    loinc: str
    long_common_name: str
    name_zh: str
    unit: str  # UCUM, as the alliance reports it; empty for qualitative tests
    category: str
    kind: Literal["quantitative", "qualitative"]
    recognition_window_days: int | None = None  # 互认时限; None: not a recognised item


class TestCatalogue:
    """The catalogue, looked up by LOINC code or analyte key."""

    __test__ = False  # not a pytest test class

    def __init__(self, entries: Iterable[CatalogueEntry]) -> None:
        self.entries = list(entries)
        self._by_loinc = {e.loinc: e for e in self.entries}
        self._by_analyte = {e.analyte: e for e in self.entries}
        if len(self._by_loinc) != len(self.entries) or len(self._by_analyte) != len(self.entries):
            raise ValueError("catalogue has a repeated LOINC code or analyte key")

    def __len__(self) -> int:
        return len(self.entries)

    def by_loinc(self, code: str) -> CatalogueEntry | None:
        return self._by_loinc.get(code.strip())

    def by_analyte(self, analyte: str) -> CatalogueEntry | None:
        return self._by_analyte.get(analyte)


def _read_catalogue(text: str) -> TestCatalogue:
    entries = []
    for row_number, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
        try:
            window = row.get("recognition_window_days") or ""
            entries.append(
                CatalogueEntry(
                    analyte=row["analyte"].strip(),
                    loinc=row["loinc"].strip(),
                    long_common_name=row["long_common_name"].strip(),
                    name_zh=row["name_zh"].strip(),
                    unit=row["unit"].strip(),
                    category=row["category"].strip(),
                    kind=row["kind"].strip(),  # type: ignore[arg-type]
                    recognition_window_days=int(window) if window.strip() else None,
                )
            )
        except (KeyError, ValueError) as exc:
            raise ValueError(f"catalogue row {row_number}: {exc}") from exc
    return TestCatalogue(entries)


@lru_cache(maxsize=1)
def _shipped_catalogue() -> TestCatalogue:
    text = resources.files("lab_results").joinpath("data", "loinc_subset.csv").read_text("utf-8")
    return _read_catalogue(text)


def load_catalogue(path: Path | None = None) -> TestCatalogue:
    """The shipped catalogue, or the CSV at ``path`` (same columns)."""
    if path is None:
        return _shipped_catalogue()
    return _read_catalogue(path.read_text("utf-8-sig"))


def loinc_notice() -> str:
    """LOINC's copyright and licence notice, to show wherever the catalogue is shown."""
    return resources.files("lab_results").joinpath("data", "LOINC_NOTICE.txt").read_text("utf-8")


class LocalCodeMapping(BaseModel):
    """One row of a sender's local-code table."""

    facility: str  # MSH-4 namespace or universal ID of the sender; "*" for every sender
    local_code: str
    loinc: str
    system: str = ""  # the OBX-3 coding system, when the sender's codes need it told apart


def load_local_mappings(path: Path) -> list[LocalCodeMapping]:
    rows = csv.DictReader(io.StringIO(path.read_text("utf-8-sig")))
    return [
        LocalCodeMapping(
            facility=r["facility"].strip(),
            local_code=r["local_code"].strip(),
            loinc=r["loinc"].strip(),
            system=(r.get("system") or "").strip(),
        )
        for r in rows
    ]


class Mapped(BaseModel):
    status: Literal["mapped"] = "mapped"
    entry: CatalogueEntry
    via: Literal["loinc", "local"]
    source_code: str
    source_system: str
    unit_ok: bool  # the OBX-6 unit is the catalogue's unit (or both are empty)


class Unmapped(BaseModel):
    """A code for the admin mapping queue: never guessed, held until a row is added."""

    status: Literal["unmapped"] = "unmapped"
    facility: str
    code: str
    system: str
    text: str
    unit: str
    reason: str

    @property
    def queue_key(self) -> tuple[str, str, str]:
        return (self.facility, self.system, self.code)


_UNIT_ALIASES = {
    "": "",
    "10^9/l": "10*9/l",
    "x10^9/l": "10*9/l",
    "×10^9/l": "10*9/l",
    "10^12/l": "10*12/l",
    "x10^12/l": "10*12/l",
    "×10^12/l": "10*12/l",
    "giga/l": "10*9/l",
    "giga.l-1": "10*9/l",
    "tera/l": "10*12/l",
    "tera.l-1": "10*12/l",
    "µmol/l": "umol/l",
    "μmol/l": "umol/l",
    "miu/l": "m[iu]/l",
    "uiu/ml": "u[iu]/ml",
    "µiu/ml": "u[iu]/ml",
    "iu/ml": "[iu]/ml",
    "inr": "{inr}",
    "ratio": "{ratio}",
    "mmhg": "mm[hg]",
    "ph": "[ph]",
    "mm/hr": "mm/h",
    "mg/l feu": "mg/l{feu}",
}


def _unit_key(unit: str) -> str:
    key = unit.strip().lower().replace(" ", " ")
    return _UNIT_ALIASES.get(key, key)


def units_match(sent: str, catalogue_unit: str) -> bool:
    """Whether the sender's unit means the catalogue's UCUM unit. Case-insensitive (senders
    write ``mg/dl``), with the common non-UCUM spellings (``10^9/L``, ``giga/L``, ``µmol/L``,
    ``mIU/L``); anything else is a mismatch: a number in another unit is never compared with
    limits in the catalogue's unit."""
    return _unit_key(sent) == _unit_key(catalogue_unit)


def _is_loinc(system: str) -> bool:
    return system.strip().upper() in LOINC_SYSTEMS


def map_observation(
    obs: Observation,
    *,
    facility: str,
    catalogue: TestCatalogue,
    local_mappings: Sequence[LocalCodeMapping] | Mapping[tuple[str, str], str] = (),
) -> Mapped | Unmapped:
    """The catalogue entry of ``obs`` (LOINC first, then the sender's local table), or an
    :class:`Unmapped` naming why."""
    table = _table(local_mappings)
    pairs = obs.code.pairs()
    loinc_misses = []
    for system, code in pairs:
        if _is_loinc(system):
            entry = catalogue.by_loinc(code)
            if entry is not None:
                return _mapped(obs, entry, "loinc", code, system)
            loinc_misses.append(code)
    for system, code in pairs:
        if _is_loinc(system):
            continue
        for key in ((facility, code), (_ANY_FACILITY, code)):
            loinc = table.get(key)
            if loinc is not None:
                entry = catalogue.by_loinc(loinc)
                if entry is None:
                    return _unmapped(
                        obs, facility, _REASON_STALE_MAPPING[0].format(code=code, loinc=loinc)
                    )
                return _mapped(obs, entry, "local", code, system)
    if loinc_misses:
        reason = _REASON_UNKNOWN_LOINC[0].format(loinc=loinc_misses[0])
    else:
        reason = _REASON_NO_MAPPING[0].format(
            code=obs.code.identifier, facility=facility or "this sender"
        )
    return _unmapped(obs, facility, reason)


# Why a result is unmapped: (English, Chinese). The English text is what the mapping queue
# stores; :func:`reason_zh` gives the Chinese for it.
_REASON_STALE_MAPPING = (
    "local code {code} maps to LOINC {loinc}, which is not in the catalogue",
    "本地代码 {code} 映射到的 LOINC {loinc} 不在检验项目目录中",
)
_REASON_UNKNOWN_LOINC = (
    "LOINC {loinc} is not in the alliance test catalogue",
    "LOINC {loinc} 不在医联体检验项目目录中",
)
_REASON_NO_MAPPING = (
    "local code {code} of {facility} has no mapping",
    "{facility}的本地代码 {code} 尚无映射",
)
_REASONS = (_REASON_STALE_MAPPING, _REASON_UNKNOWN_LOINC, _REASON_NO_MAPPING)


def _pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(
        re.escape(part) if i % 2 == 0 else f"(?P<{part}>.+?)" for i, part in enumerate(parts)
    )
    return re.compile(f"^{regex}$")


_REASON_PATTERNS = [(_pattern(en), zh) for en, zh in _REASONS]


def reason_zh(reason: str) -> str:
    """The Chinese text of an unmapped result's reason (as stored, in English); the reason
    itself when it is not one of the texts this module writes."""
    for pattern, zh in _REASON_PATTERNS:
        match = pattern.match(reason)
        if match is not None:
            values = match.groupdict()
            if values.get("facility") == "this sender":
                values["facility"] = "该发送方"
            return zh.format(**values)
    return reason


def _table(
    local_mappings: Sequence[LocalCodeMapping] | Mapping[tuple[str, str], str],
) -> Mapping[tuple[str, str], str]:
    if isinstance(local_mappings, Mapping):
        return local_mappings
    return {(m.facility, m.local_code): m.loinc for m in local_mappings}


def _mapped(
    obs: Observation, entry: CatalogueEntry, via: Literal["loinc", "local"], code: str, system: str
) -> Mapped:
    unit_ok = entry.kind == "qualitative" or units_match(obs.unit, entry.unit)
    return Mapped(entry=entry, via=via, source_code=code, source_system=system, unit_ok=unit_ok)


def _unmapped(obs: Observation, facility: str, reason: str) -> Unmapped:
    code = obs.code.code or obs.code.alt_code
    system = obs.code.system if obs.code.code else obs.code.alt_system
    return Unmapped(
        facility=facility,
        code=code,
        system=system,
        text=obs.code.display,
        unit=obs.unit,
        reason=reason,
    )


class MappedResult(BaseModel):
    observation: Observation
    mapping: Mapped | Unmapped

    @property
    def analyte(self) -> str | None:
        return self.mapping.entry.analyte if isinstance(self.mapping, Mapped) else None


class MappedOrder(BaseModel):
    order: Order
    facility: str
    results: list[MappedResult]

    @property
    def unmapped(self) -> list[Unmapped]:
        """The distinct codes of this order for the mapping queue."""
        seen: dict[tuple[str, str, str], Unmapped] = {}
        for r in self.results:
            if isinstance(r.mapping, Unmapped):
                seen.setdefault(r.mapping.queue_key, r.mapping)
        return list(seen.values())


def map_order(
    order: Order,
    *,
    facility: str,
    catalogue: TestCatalogue,
    local_mappings: Sequence[LocalCodeMapping] | Mapping[tuple[str, str], str] = (),
) -> MappedOrder:
    table = _table(local_mappings)
    return MappedOrder(
        order=order,
        facility=facility,
        results=[
            MappedResult(
                observation=obs,
                mapping=map_observation(
                    obs, facility=facility, catalogue=catalogue, local_mappings=table
                ),
            )
            for obs in order.observations
        ],
    )
