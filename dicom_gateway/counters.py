"""What the DICOM listener counts, and how a listener process reports it to its parent.

In one process the counts go straight to the Prometheus counters of :mod:`rdc_core.metrics`.
A listener process (``RDC_DICOM_PROCESSES`` > 1) sends each count to the serving process
over its channel instead, so ``/metrics`` there shows the whole gateway.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from rdc_core.metrics import DICOM_BYTES, DICOM_FAILURES, DICOM_INSTANCES

__all__ = ["ChannelCounters", "IngestCounters", "PrometheusCounters", "apply_report"]


class IngestCounters(Protocol):
    """Receives one call per C-STORE answered."""

    def stored(self, outcome: str, size_bytes: int) -> None:
        """An object was stored and indexed (``outcome``: stored, duplicate, conflict...)."""

    def failed(self, status: str) -> None:
        """A C-STORE was answered with the failure status named ``status``."""


class PrometheusCounters:
    """Counts into this process's Prometheus counters."""

    def stored(self, outcome: str, size_bytes: int) -> None:
        """Count one stored object and its bytes."""
        DICOM_INSTANCES.labels(outcome=outcome).inc()
        DICOM_BYTES.inc(size_bytes)

    def failed(self, status: str) -> None:
        """Count one failure answer."""
        DICOM_FAILURES.labels(status=status).inc()


class ChannelCounters:
    """Sends each count as one message on a listener process's channel to its parent."""

    def __init__(self, send: Callable[[bytes], None]) -> None:
        self._send_message = send

    def stored(self, outcome: str, size_bytes: int) -> None:
        """Report one stored object."""
        self._send(f"stored {outcome} {size_bytes}")

    def failed(self, status: str) -> None:
        """Report one failure answer."""
        self._send(f"failed {status}")

    def _send(self, message: str) -> None:
        self._send_message(message.encode())


def apply_report(counters: IngestCounters, message: bytes) -> bool:
    """Apply a message sent by :class:`ChannelCounters`; False if it is not a count."""
    kind, _, rest = message.decode(errors="replace").partition(" ")
    if kind == "stored":
        outcome, _, size = rest.partition(" ")
        counters.stored(outcome, int(size))
        return True
    if kind == "failed":
        counters.failed(rest)
        return True
    return False
