"""Prometheus metrics of this process (exposed at ``/metrics`` by the web layer)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

__all__ = [
    "DICOM_BYTES",
    "DICOM_FAILURES",
    "DICOM_INSTANCES",
    "TASK_SECONDS",
]

DICOM_INSTANCES = Counter(
    "rdc_dicom_instances_total", "DICOM objects received and indexed, by outcome", ["outcome"]
)
DICOM_BYTES = Counter("rdc_dicom_received_bytes_total", "Bytes of DICOM objects received")
DICOM_FAILURES = Counter(
    "rdc_dicom_failures_total", "C-STORE requests answered with a failure, by status", ["status"]
)
TASK_SECONDS = Histogram(
    "rdc_task_seconds",
    "Run time of background tasks",
    ["task"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120),
)
