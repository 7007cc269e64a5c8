"""Changing single bytes of the CMS container inside a PAdES PDF's /Contents, for tamper tests.

The container is the DER blob at the start of /Contents (the rest is zero padding). The
named offsets are the bytes pyHanko's validation reads no meaning from: the SignedData and
SignerInfo versions, the digest algorithm set, an algorithm identifier's tags.
"""

from __future__ import annotations

import re
from typing import NamedTuple


class _Tlv(NamedTuple):
    tag_at: int
    content_at: int
    end: int


def _tlv(blob: bytes, at: int) -> _Tlv:
    first = blob[at + 1]
    if first < 0x80:
        return _Tlv(at, at + 2, at + 2 + first)
    size = first & 0x7F
    length = int.from_bytes(blob[at + 2 : at + 2 + size], "big")
    return _Tlv(at, at + 2 + size, at + 2 + size + length)


def container(pdf: bytes) -> tuple[int, bytes]:
    """Where the /Contents hex digits start in ``pdf``, and the bytes they spell."""
    found = re.search(rb"/Contents\s*<([0-9a-fA-F]+)>", pdf)
    assert found is not None
    return found.start(1), bytes.fromhex(found.group(1).decode())


def container_length(pdf: bytes) -> int:
    """The length of the DER container (without the padding)."""
    return _tlv(container(pdf)[1], 0).end


def named_offsets(pdf: bytes) -> dict[str, int]:
    """Offsets in the container of the bytes no signature check covers by itself."""
    blob = container(pdf)[1]
    info = _tlv(blob, 0)
    oid = _tlv(blob, info.content_at)
    explicit = _tlv(blob, oid.end)
    signed = _tlv(blob, explicit.content_at)
    version = _tlv(blob, signed.content_at)
    digests = _tlv(blob, version.end)
    digest = _tlv(blob, digests.content_at)
    digest_oid = _tlv(blob, digest.content_at)
    digest_null = _tlv(blob, digest_oid.end)
    encap = _tlv(blob, digests.end)
    certificates = _tlv(blob, encap.end)
    signer_infos = _tlv(blob, certificates.end)
    signer = _tlv(blob, signer_infos.content_at)
    signer_version = _tlv(blob, signer.content_at)
    sid = _tlv(blob, signer_version.end)
    signer_digest = _tlv(blob, sid.end)
    signed_attrs = _tlv(blob, signer_digest.end)
    signature_algorithm = _tlv(blob, signed_attrs.end)
    return {
        "SignedData version": version.content_at,
        "digestAlgorithms SET tag": digests.tag_at,
        "digest AlgorithmIdentifier tag": digest.tag_at,
        "digest algorithm OID tag": digest_oid.tag_at,
        "digest algorithm parameters (NULL) tag": digest_null.tag_at,
        "encapContentInfo content type": _tlv(blob, encap.content_at).end - 1,
        "SignerInfo version": signer_version.content_at,
        "SignerInfo digest AlgorithmIdentifier tag": signer_digest.tag_at,
        "signature AlgorithmIdentifier tag": signature_algorithm.tag_at,
        "signature algorithm OID tag": signature_algorithm.content_at,
    }


def change_byte(pdf: bytes, offset: int, xor: int) -> bytes:
    """``pdf`` with byte ``offset`` of its /Contents container XORed with ``xor``, written
    back in hex as pyHanko writes it (upper case)."""
    start, contents = container(pdf)
    changed = bytearray(contents)
    changed[offset] ^= xor
    hexed = changed.hex().upper().encode()
    return pdf[:start] + hexed + pdf[start + len(hexed) :]
