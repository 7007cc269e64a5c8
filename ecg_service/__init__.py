"""ECG centre analysis core: parse DICOM waveform / WFDB / HL7 aECG into one typed record,
measure it on a median beat fused over the leads, pre-screen it against the critical-value
rule table, render the trace on the standard grid, and look up report statements.

The names exported here are a pure library: no database, no web. The intake builds on them:
``ecg_service.models`` (the ``ecg_studies`` detail table), ``ecg_service.service`` (upload
intake through the hub's intake contract, reading what was measured, ``load_record``) and
``ecg_service.tasks`` (measuring DICOM ECG waveforms received by C-STORE / STOW)."""

from ecg_service.analysis import (
    MEASUREMENT_KEYS,
    MIN_RELIABLE_RATE_HZ,
    EcgAnalysis,
    Fiducials,
    LeadQuality,
    Rhythm,
    analyse,
    detect_r_peaks,
)
from ecg_service.parsers import EcgFiles, detect_format, parse_ecg, read_ecg, record_from_dicom
from ecg_service.prescreen import PrescreenMatch, PrescreenRule, RuleTable, load_rules, prescreen
from ecg_service.record import (
    STANDARD_LEADS,
    DeviceMeasurement,
    EcgFormat,
    EcgFormatError,
    EcgRecord,
    PatientIdentity,
    RecordedBeat,
    UnsupportedEcgFormat,
    normalise_lead_name,
)
from ecg_service.render import LAYOUTS, render_trace
from ecg_service.serial import MeasurementDelta, compare_measurements
from ecg_service.statements import Statement, get_statement, search_statements, statement_library
from ecg_service.synthetic import SyntheticTruth, synthesize_ecg, synthetic_set

__all__ = [
    "LAYOUTS",
    "MEASUREMENT_KEYS",
    "MIN_RELIABLE_RATE_HZ",
    "STANDARD_LEADS",
    "DeviceMeasurement",
    "EcgAnalysis",
    "EcgFiles",
    "EcgFormat",
    "EcgFormatError",
    "EcgRecord",
    "Fiducials",
    "LeadQuality",
    "MeasurementDelta",
    "PatientIdentity",
    "PrescreenMatch",
    "PrescreenRule",
    "RecordedBeat",
    "Rhythm",
    "RuleTable",
    "Statement",
    "SyntheticTruth",
    "UnsupportedEcgFormat",
    "analyse",
    "compare_measurements",
    "detect_format",
    "detect_r_peaks",
    "get_statement",
    "load_rules",
    "normalise_lead_name",
    "parse_ecg",
    "prescreen",
    "read_ecg",
    "record_from_dicom",
    "render_trace",
    "search_statements",
    "statement_library",
    "synthesize_ecg",
    "synthetic_set",
]
