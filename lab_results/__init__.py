"""HL7 v2 lab result intake (MLLP listener and HTTP): messages are stored durably and
acknowledged; the result model and auto-verification follow."""

from lab_results.intake import Acknowledgement, LabIntake, http_intake_scope
from lab_results.mllp import MllpListener

__all__ = ["Acknowledgement", "LabIntake", "MllpListener", "http_intake_scope"]
