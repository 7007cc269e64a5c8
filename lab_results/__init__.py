"""HL7 v2 lab result intake and auto-verification: the lab centre's domain core.

Parse ER7 (:func:`parse_message`, :func:`parse_messages`) into typed models, map
observations to the alliance test catalogue (:func:`map_observation`), auto-verify an order
(:func:`autoverify`) and version corrected results (:func:`apply_correction`). Pure code:
the intake service supplies the database look-ups (catalogue, local mappings, priors).
"""

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
    "LabMessage",
    "LabParseError",
    "MalformedMessageError",
    "Observation",
    "Order",
    "Patient",
    "Specimen",
    "UnsupportedMessageTypeError",
    "parse_hl7_timestamp",
    "parse_message",
    "parse_messages",
    "split_messages",
]
