"""Delivery of signed reports to clinics: portal and API fetches (recorded as delivered),
push-back by DICOM and HL7 with retries until acknowledged, notifications of new versions."""
