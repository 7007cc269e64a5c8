"""The alliance patient index: persons linking the clinics' (issuer, patient ID) identifiers
by national ID or an administrator's merge; priors and recognised results follow the person."""

from worklist.patients.national_id import (
    InvalidNationalIdError,
    mask_national_id,
    validate_national_id,
)
from worklist.patients.schemas import Candidate, IntakeLinkOutcome, OtherIdentifier, PersonOut
from worklist.patients.service import (
    find_person,
    get_person,
    link_identifiers,
    link_identifiers_from_intake,
    match_candidates,
    unlink_identifiers,
)

__all__ = [
    "Candidate",
    "IntakeLinkOutcome",
    "InvalidNationalIdError",
    "OtherIdentifier",
    "PersonOut",
    "find_person",
    "get_person",
    "link_identifiers",
    "link_identifiers_from_intake",
    "mask_national_id",
    "match_candidates",
    "unlink_identifiers",
    "validate_national_id",
]
