"""Push of signed reports to a clinic's HIS as HL7 v2 ORU^R01 over MLLP."""

from __future__ import annotations
