"""Delivery of signed reports to clinics: portal and API fetches (recorded as delivered),
push-back by DICOM and HL7 with retries until acknowledged, notifications of new versions."""

from worklist.delivery.senders import (
    DeliveryFailedError,
    EndpointSpec,
    ReportPush,
    register_sender,
)

__all__ = ["DeliveryFailedError", "EndpointSpec", "ReportPush", "register_sender"]
