"""HL7 v2 lab result intake and auto-verification: the lab centre.

Messages arrive over MLLP (:class:`MllpListener`) or HTTP and are stored durably and
acknowledged (:class:`LabIntake`).
Parse ER7 (:func:`parse_message`, :func:`parse_messages`) into typed models, map
observations to the alliance test catalogue (:func:`map_order`), auto-verify an order
(:func:`autoverify`) and version corrected results (:func:`apply_correction`);
:func:`evaluate_order` does the three for one order of a received message. Pure code:
the intake service supplies the database look-ups (local-code table, priors).
"""

from lab_results.autoverify import (
    AUTOVERIFIED_MARK,
    AutoverificationResult,
    CriticalFinding,
    PriorResult,
    ResultVerdict,
    RuleOutcome,
    RuleSet,
    autoverify,
    load_critical_limits,
    load_rules,
    reference_change_value,
)
from lab_results.corrections import OrderVersion, ResultChange, apply_correction
from lab_results.evaluate import OrderEvaluation, evaluate_order
from lab_results.intake import Acknowledgement, LabIntake, http_intake_scope
from lab_results.mapping import (
    CatalogueEntry,
    LocalCodeMapping,
    Mapped,
    MappedOrder,
    MappedResult,
    TestCatalogue,
    Unmapped,
    load_catalogue,
    load_local_mappings,
    loinc_notice,
    map_observation,
    map_order,
)
from lab_results.mllp import MllpListener
from lab_results.parse import (
    LabMessage,
    LabParseError,
    MalformedMessageError,
    Observation,
    Order,
    Patient,
    Specimen,
    UnsupportedMessageTypeError,
    parse_hl7_timestamp,
    parse_message,
    parse_messages,
    split_messages,
)

__all__ = [
    "AUTOVERIFIED_MARK",
    "Acknowledgement",
    "AutoverificationResult",
    "CatalogueEntry",
    "CriticalFinding",
    "LabIntake",
    "LabMessage",
    "LabParseError",
    "LocalCodeMapping",
    "MalformedMessageError",
    "Mapped",
    "MappedOrder",
    "MappedResult",
    "MllpListener",
    "Observation",
    "Order",
    "OrderEvaluation",
    "OrderVersion",
    "Patient",
    "PriorResult",
    "ResultChange",
    "ResultVerdict",
    "RuleOutcome",
    "RuleSet",
    "Specimen",
    "TestCatalogue",
    "Unmapped",
    "UnsupportedMessageTypeError",
    "apply_correction",
    "autoverify",
    "evaluate_order",
    "http_intake_scope",
    "load_catalogue",
    "load_critical_limits",
    "load_local_mappings",
    "load_rules",
    "loinc_notice",
    "map_observation",
    "map_order",
    "parse_hl7_timestamp",
    "parse_message",
    "parse_messages",
    "reference_change_value",
    "split_messages",
]
