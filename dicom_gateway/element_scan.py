"""A fast walk over a Little Endian data set that picks out the top-level elements the index
needs, for the common case only.

Why not pydicom's reader: it builds an element for every element it meets and asks the file
for its position after nearly each one. That was most of the CPU time of reading a header,
and the DICOM listener reads one for every object received. This walk only unpacks element
headers from the file's bytes (or memory map), skips values by their length and reads items
by their elements, checking on the way that every value lies within the file and every
sequence and item is closed; values over 1 KiB are left unread, as pydicom leaves them.

It accepts only data it fully understands: Little Endian, valid VRs, sequences and items
that nest properly. Anything else (an unknown VR, a UN of undefined length, a value running
past the end, a wanted element with an unexpected VR or given twice) makes it return None,
and the caller reads the data set with pydicom, which then decides: it may read it or name
the defect.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Mapping
from typing import cast

from pydicom.dataelem import RawDataElement, empty_value_for_VR
from pydicom.tag import BaseTag

__all__ = ["file_meta_elements", "scan_top_level"]

_Buffer = bytes | mmap.mmap  # a Part-10 file read whole, or mapped
_EXPLICIT = struct.Struct("<HH2sH")
_IMPLICIT = struct.Struct("<HHI")
_UINT32 = struct.Struct("<I")
_UINT16 = struct.Struct("<H")
# VRs with a 4-byte length after two reserved bytes (PS3.5 7.1.2), and the other valid ones.
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split())
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_UNDEFINED = 0xFFFFFFFF
_SPECIFIC_CHARACTER_SET = 0x00080005
_DEFER_SIZE = 1024  # the ingest path's pydicom fallback reads with defer_size=1024


class _Unusual(Exception):
    """Structure this walk leaves to pydicom."""


def file_meta_elements(buffer: _Buffer, start: int) -> tuple[int, dict[int, bytes]]:
    """Where the data set starts and the raw values (up to 1 KiB each) of the File Meta
    Information elements from ``start`` (after the preamble and "DICM").

    File meta (PS3.10 7.1) is group 0002, always Explicit VR Little Endian; the data set
    starts at the first other group. Read here, not with pydicom: eight short elements, read
    for every object received.
    """
    offset, end, values = start, len(buffer), dict[int, bytes]()
    while offset + 8 <= end:
        group, element, vr, length = _EXPLICIT.unpack_from(buffer, offset)
        if group != 0x0002:
            break
        if vr in _LONG_VRS:
            if offset + 12 > end:
                break
            length = _UINT32.unpack_from(buffer, offset + 8)[0]
            offset += 12
        else:
            offset += 8
        values[element] = bytes(buffer[offset : offset + min(length, 1024)])
        offset += length
    return offset, values


def scan_top_level(
    buffer: _Buffer,
    start: int,
    *,
    implicit_vr: bool,
    wanted: Mapping[int, str],
) -> dict[BaseTag, RawDataElement] | None:
    """The raw top-level elements of ``wanted`` (tag -> its dictionary VR) in the Little
    Endian data set that starts at ``start`` of ``buffer`` (bytes or a memory map) and runs
    to its end, or None when the data set is not one this walk fully understands.

    As pydicom reads them: fewer than eight bytes left at the end are ignored, and values
    longer than 1024 bytes (but Specific Character Set) are left unread (None).
    """
    found: dict[BaseTag, RawDataElement] = {}
    try:
        _walk(buffer, start, len(buffer), implicit_vr, wanted, found)
    except (_Unusual, struct.error, RecursionError):
        return None
    return found


def _looks_implicit(buffer: _Buffer, position: int) -> bool:
    # pydicom's test on the first element of a data set: an explicit VR is two letters.
    first, second = buffer[position + 4], buffer[position + 5]
    return not (0x40 < first < 0x5B and 0x40 < second < 0x5B)


def _walk(
    buffer: _Buffer,
    position: int,
    end: int,
    implicit_vr: bool,
    wanted: Mapping[int, str] | None,
    found: dict[BaseTag, RawDataElement] | None,
    *,
    delimited: bool = False,
) -> int:
    """Walk the elements of a data set from ``position``: the top level (``wanted`` given)
    to the end of the buffer; an item of undefined length (``delimited``) to its delimiter;
    an item of defined length exactly to ``end``. Returns where the walk stopped."""
    # pydicom checks the first element of a data set (of an item too, in explicit VR) and
    # reads on in the encoding it finds: where that is not the declared one, it reads
    # differently from this walk.
    if (
        (wanted is not None or not implicit_vr)
        and position + 8 <= end
        and _UINT16.unpack_from(buffer, position)[0] != 0xFFFE
        and _looks_implicit(buffer, position) != implicit_vr
    ):
        raise _Unusual
    while position + 8 <= end:
        if implicit_vr:
            group, element, length = _IMPLICIT.unpack_from(buffer, position)
            vr = b""
        else:
            group, element, vr, length = _EXPLICIT.unpack_from(buffer, position)
            if group == 0xFFFE:  # items and delimiters have no VR
                group, element, length = _IMPLICIT.unpack_from(buffer, position)
            elif vr in _LONG_VRS:
                if position + 12 > end:
                    raise _Unusual
                length = _UINT32.unpack_from(buffer, position + 8)[0]
                position += 4
            elif vr not in _SHORT_VRS:
                raise _Unusual
        position += 8
        tag = group << 16 | element
        if group == 0xFFFE:
            if tag == _ITEM_END and delimited:
                return position
            raise _Unusual
        if length == _UNDEFINED:
            if implicit_vr or vr == b"SQ":
                position = _items(buffer, position, end, implicit_vr, fragments=False)
            elif tag == _PIXEL_DATA and vr in (b"OB", b"OW"):
                position = _items(buffer, position, end, implicit_vr, fragments=True)
            else:
                raise _Unusual  # e.g. UN of undefined length: implicit VR inside
            if wanted is not None and tag in wanted:
                raise _Unusual
            continue
        value_end = position + length
        if value_end > end:
            raise _Unusual
        if wanted is not None and found is not None:
            expected = wanted.get(tag)
            if expected is not None:
                if (vr and vr.decode("ascii") != expected) or tag in found:
                    raise _Unusual
                found[BaseTag(tag)] = _raw_element(
                    buffer, tag, expected, implicit_vr, position, length
                )
        position = value_end
    if delimited or (wanted is None and position != end):
        raise _Unusual  # an item without its delimiter, or elements not filling its length
    return position


def _raw_element(
    buffer: _Buffer, tag: int, vr: str, implicit_vr: bool, position: int, length: int
) -> RawDataElement:
    vr_name = None if implicit_vr else vr
    value: bytes | None
    if length > _DEFER_SIZE and tag != _SPECIFIC_CHARACTER_SET:
        value = None  # as pydicom with defer_size: not read
    elif length:
        value = bytes(buffer[position : position + length])
    else:
        value = cast(bytes | None, empty_value_for_VR(vr_name, raw=True))
    return RawDataElement(BaseTag(tag), vr_name, length, value, position, implicit_vr, True)


def _items(buffer: _Buffer, position: int, end: int, implicit_vr: bool, *, fragments: bool) -> int:
    """Walk the items of a sequence (or skip the fragments of encapsulated pixel data) of
    undefined length; returns the position after its delimiter."""
    while position + 8 <= end:
        group, element, length = _IMPLICIT.unpack_from(buffer, position)
        position += 8
        tag = group << 16 | element
        if tag == _SEQUENCE_END:
            return position
        if tag != _ITEM:
            raise _Unusual
        if length == _UNDEFINED:
            if fragments:
                raise _Unusual
            position = _walk(buffer, position, end, implicit_vr, None, None, delimited=True)
        elif fragments:
            position += length
        else:
            # pydicom reads an item's elements, not its length: they must fill it exactly.
            item_end = position + length
            if item_end > end:
                raise _Unusual
            position = _walk(buffer, position, item_end, implicit_vr, None, None)
        if position > end:
            raise _Unusual
    raise _Unusual  # no sequence delimiter before the end
