"""Association slots: how many associations the gateway serves at once, in all, per calling
AE title and per clinic.

One sender must not be able to take every slot (a modality stuck in a retry loop, or a
sender that opens associations and then trickles bytes): besides the gateway-wide limit
(``RDC_DICOM_MAX_ASSOCIATIONS``) each calling AE title (``RDC_DICOM_MAX_ASSOCIATIONS_PER_AE``)
and each clinic, over all its AE titles (``RDC_DICOM_MAX_ASSOCIATIONS_PER_CLINIC``), has a
limit of its own. A request over any of them is rejected as over the local limit (PS3.8
9.3.4: rejected-transient, service-provider presentation related, local-limit-exceeded), so
the modality tries again later.

The slots are counted where they are granted: in the serving process's threads with one
listener process, and in the serving process for all listener processes together otherwise
(:mod:`dicom_gateway.listener_pool`).
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

__all__ = ["Applicant", "AssociationLimits", "SlotBook"]


@dataclass(frozen=True, slots=True)
class AssociationLimits:
    """How many associations may be open at once: in all, per calling AE, per clinic."""

    total: int
    per_ae: int
    per_clinic: int


@dataclass(frozen=True, slots=True)
class Applicant:
    """Who asks for a slot: the calling AE title and the clinic it belongs to."""

    calling_ae: str
    clinic: str


class SlotBook:
    """The slots granted and not yet given back (thread-safe)."""

    def __init__(self, limits: AssociationLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._total = 0
        self._by_ae: Counter[str] = Counter()
        self._by_clinic: Counter[str] = Counter()

    def take(self, applicant: Applicant) -> bool:
        """Take a slot for ``applicant``; False when a limit is reached (nothing taken)."""
        limits = self.limits
        with self._lock:
            if (
                self._total >= limits.total
                or self._by_ae[applicant.calling_ae] >= limits.per_ae
                or self._by_clinic[applicant.clinic] >= limits.per_clinic
            ):
                return False
            self._total += 1
            self._by_ae[applicant.calling_ae] += 1
            self._by_clinic[applicant.clinic] += 1
            return True

    def give_back(self, applicant: Applicant) -> None:
        """Return a slot taken for ``applicant``."""
        with self._lock:
            self._total -= 1
            self._by_ae[applicant.calling_ae] -= 1
            self._by_clinic[applicant.clinic] -= 1
            if self._by_ae[applicant.calling_ae] <= 0:
                del self._by_ae[applicant.calling_ae]
            if self._by_clinic[applicant.clinic] <= 0:
                del self._by_clinic[applicant.clinic]

    @property
    def taken(self) -> int:
        """Slots taken now."""
        with self._lock:
            return self._total
