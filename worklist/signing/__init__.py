"""Signing final reports: the alliance CA, readers' keys and certificates, the canonical
signed JSON document and the PAdES-signed PDF, verification and later versions."""
