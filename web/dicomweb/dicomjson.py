"""The DICOM JSON model (PS3.18 F.2): attribute names, stored data sets as JSON with bulk
data replaced by URIs, and reading a bulk data value back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, BinaryIO, Final

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import BYTES_VR

from rdc_core.errors import InvalidInputError, NotFoundError

__all__ = [
    "BULK_THRESHOLD",
    "PIXEL_DATA_TAGS",
    "bulk_value",
    "dataset_json",
    "element",
    "parse_tag",
    "tag_key",
]

BULK_THRESHOLD: Final = 1024
"""Binary values longer than this many bytes are sent as BulkDataURI, shorter ones inline."""

PIXEL_DATA_TAGS: Final = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
_BULK_VRS: Final = frozenset(str(vr) for vr in BYTES_VR)
_UNDEFINED_LENGTH: Final = 0xFFFFFFFF
# Bytes per value of the binary VRs, to bring big-endian bulk data to little endian.
_WORD_SIZE: Final = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}


def tag_key(tag: int) -> str:
    """The DICOM JSON attribute name of ``tag`` (eight upper-case hex digits)."""
    return f"{tag:08X}"


def parse_tag(name: str) -> BaseTag:
    """A tag given as keyword (``PatientName``) or eight hex digits (``00100010``)."""
    value = name.strip()
    if len(value) == 8 and all(c in "0123456789abcdefABCDEF" for c in value):
        return Tag(int(value, 16))
    tag = tag_for_keyword(value)
    if tag is None:
        raise InvalidInputError(f"{name!r} is neither a DICOM keyword nor a tag")
    return Tag(tag)


def element(tag: int, value: Any = None, vr: str | None = None) -> DataElement:
    """A data element with the dictionary VR of ``tag`` (None or "" gives an empty value)."""
    if vr is None:
        vr = dictionary_VR(tag)
        if " or " in vr:
            vr = vr.split(" or ")[0]
    if value in (None, ""):
        value = [] if vr == "SQ" else None
    return DataElement(tag, vr, value)


def _resolved_vr(ds: Dataset, tag: BaseTag, raw: RawDataElement | DataElement) -> str | None:
    # The VR of a value we will not read: from the element (explicit VR) or the dictionary.
    if raw.VR:
        vr = str(raw.VR)
    elif tag.is_private:
        vr = "UN"
    else:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return None
    if " or " not in vr:
        return vr
    if tag == 0x7FE00010:
        # PS3.5 8.2: encapsulated or <= 8 bits is OB, otherwise OW.
        if _length(raw) == _UNDEFINED_LENGTH or int(ds.get("BitsAllocated", 16) or 16) <= 8:
            return "OB"
        return "OW"
    return "OW" if "OW" in vr else vr.split(" or ")[0]


def _length(raw: RawDataElement | DataElement) -> int:
    if isinstance(raw, RawDataElement):
        return int(raw.length)
    value = raw.value
    return len(value) if isinstance(value, bytes | bytearray) else 0


def dataset_json(ds: Dataset, *, bulk_uri: Callable[[str], str], _path: str = "") -> dict[str, Any]:
    """``ds`` in the DICOM JSON model with bulk data replaced by ``BulkDataURI``.

    Pixel data, and binary values longer than :data:`BULK_THRESHOLD`, become
    ``{"vr": ..., "BulkDataURI": bulk_uri(path)}`` where ``path`` is ``tag`` or, inside
    sequences, ``tag/item/tag...``. Their values are never read, so a data set read with
    deferred values (``defer_size``) stays small. Everything else is converted by pydicom.
    """
    out: dict[str, Any] = {}
    for key in list(ds.keys()):
        tag = Tag(key)
        if tag.group == 0x0002:
            continue  # file meta is not part of the data set
        raw = ds.get_item(tag, keep_deferred=True)
        if raw is None:
            continue
        path = f"{_path}{tag_key(tag)}"
        vr = _resolved_vr(ds, tag, raw)
        if vr in _BULK_VRS and (tag in PIXEL_DATA_TAGS or _length(raw) > BULK_THRESHOLD):
            out[tag_key(tag)] = {"vr": vr, "BulkDataURI": bulk_uri(path)}
            continue
        elem = ds[tag]
        if elem.VR == "SQ":
            items = [
                dataset_json(item, bulk_uri=bulk_uri, _path=f"{path}/{index}/")
                for index, item in enumerate(elem.value)
            ]
            out[tag_key(tag)] = {"vr": "SQ", "Value": items}
            continue
        out[tag_key(tag)] = elem.to_json_dict(None, BULK_THRESHOLD)
    return out


def _walk(ds: Dataset, path: list[str]) -> DataElement:
    # path alternates tag, item index, tag, ... and ends with a tag.
    try:
        tag = Tag(int(path[0], 16))
    except ValueError as exc:
        raise InvalidInputError(f"{path[0]!r} is not a tag") from exc
    if tag not in ds:
        raise NotFoundError(f"no bulk data at {tag_key(tag)}")
    elem = ds[tag]
    if len(path) == 1:
        return elem
    if elem.VR != "SQ" or not path[1].isdigit() or int(path[1]) >= len(elem.value):
        raise NotFoundError(f"no item {path[1]} in {tag_key(tag)}")
    return _walk(elem.value[int(path[1])], path[2:])


def bulk_value(stream: BinaryIO, path: str) -> bytes:
    """The value of the binary element at ``path`` (as in :func:`dataset_json`) of the
    Part-10 object in ``stream``, little endian. Raises NotFoundError."""
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) % 2 == 0:
        raise NotFoundError(f"no bulk data at {path}")
    # Values longer than the bulk threshold stay unread until asked for (the stream is open
    # meanwhile): only the addressed element is read, never a whole multi-frame object.
    ds = pydicom.dcmread(stream, defer_size=BULK_THRESHOLD)
    elem = _walk(ds, parts)
    if elem.VR not in _BULK_VRS or not isinstance(elem.value, bytes | bytearray):
        raise NotFoundError(f"{path} is not bulk data")
    data = bytes(elem.value)
    size = _WORD_SIZE.get(str(elem.VR))
    if size and not ds.original_encoding[1] and len(data) % size == 0:
        # Bulk data is always sent little endian (PS3.18 8.7.3.3.2).
        data = np.frombuffer(data, dtype=f">u{size}").astype(f"<u{size}").tobytes()
    return data
