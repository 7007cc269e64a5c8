"""HL7 v2 ORU^R01 lab result intake and auto-verification. Not built yet."""
