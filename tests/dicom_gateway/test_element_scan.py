"""The fast element walk of the ingest path (dicom_gateway.element_scan) against pydicom's
reader, on every sample object and on data sets cut short at every byte."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_gateway.element_scan import scan_top_level

# Elements before, between and after sequences, text of several VRs, one wanted element
# that is usually absent.
KEYWORDS = (
    "SpecificCharacterSet",
    "SOPInstanceUID",
    "StudyDate",
    "Modality",
    "PatientName",
    "PatientID",
    "StudyInstanceUID",
    "SeriesNumber",
    "InstanceNumber",
    "NumberOfFrames",
    "RequestedProcedurePriority",
)
WANTED = {int(tag_for_keyword(k) or 0): dictionary_VR(k) for k in KEYWORDS}


def _data_set_start(raw: bytes) -> tuple[int, UID]:
    """Where the data set begins after the file meta, and its transfer syntax (pydicom)."""
    stream = io.BytesIO(raw)
    stream.seek(132)
    meta = read_dataset(stream, False, True, stop_when=lambda tag, vr, length: tag.group != 2)
    return stream.tell(), UID(meta.TransferSyntaxUID)


def _pydicom_elements(raw: bytes, start: int, implicit: bool) -> dict[int, tuple[bytes, int]]:
    ds = read_dataset(io.BytesIO(raw[start:]), implicit, True)
    return {
        int(tag): (elem.value, elem.value_tell + start)
        for tag, elem in ds._dict.items()
        if int(tag) in WANTED
    }


def _part10_files(testdata: Path) -> list[Path]:
    paths = []
    for path in sorted((testdata / "dicom").rglob("*")):
        if path.is_file() and path.read_bytes()[128:132] == b"DICM":
            paths.append(path)
    return paths


def test_every_well_formed_sample_is_read_as_pydicom_reads_it(testdata: Path) -> None:
    scanned = []
    for path in _part10_files(testdata):
        raw = path.read_bytes()
        try:
            start, syntax = _data_set_start(raw)
        except Exception:
            continue  # file meta pydicom cannot read: not the walk's concern
        if not syntax.is_transfer_syntax or syntax.is_deflated or not syntax.is_little_endian:
            continue
        found = scan_top_level(raw, start, implicit_vr=syntax.is_implicit_VR, wanted=WANTED)
        if "truncated" in path.name:
            assert found is None, f"{path.name}: a truncated object was accepted"
            continue
        assert found is not None, f"{path.name}: the walk gave up on a well-formed object"
        expected = _pydicom_elements(raw, start, syntax.is_implicit_VR)
        got = {int(tag): (elem.value, elem.value_tell) for tag, elem in found.items()}
        assert got == expected, path.name
        for elem in found.values():
            assert elem.VR in (None if syntax.is_implicit_VR else WANTED[int(elem.tag)],)
        scanned.append(path.name)
    # Uncompressed, implicit VR, encapsulated pixel data, sequences of undefined length.
    for name in ("CT_small.dcm", "MR_small_implicit.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm"):
        assert name in scanned


def _nested_object(syntax: UID, *, defined_item: bool = False) -> bytes:
    """Elements around a sequence of undefined length whose items (one of undefined
    length, or of defined length with ``defined_item``) hold another such sequence."""
    inner_item = Dataset()
    inner_item.CodeValue = "T-04000"
    inner = Sequence([inner_item])
    outer_item = Dataset()
    outer_item.PatientID = "NESTED-ID"  # a wanted tag inside an item: not top level
    outer_item.ConceptNameCodeSequence = inner
    outer = Sequence([outer_item, Dataset()])
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3.4"
    ds.PatientName = "Li^Lei"
    ds.ReferencedStudySequence = outer
    ds.StudyInstanceUID = "1.2.3"
    ds.InstanceNumber = "7"
    ds["ReferencedStudySequence"].is_undefined_length = True
    outer_item["ConceptNameCodeSequence"].is_undefined_length = True
    inner_item.is_undefined_length_sequence_item = True
    outer_item.is_undefined_length_sequence_item = not defined_item
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_sequences_of_undefined_length_are_walked_and_cuts_inside_them_refused(
    syntax: UID,
) -> None:
    raw = _nested_object(syntax)
    start, _ = _data_set_start(raw)
    implicit = syntax.is_implicit_VR
    found = scan_top_level(raw, start, implicit_vr=implicit, wanted=WANTED)
    assert found is not None
    values = {elem.tag: elem.value for elem in found.values()}
    assert values == {
        0x00080018: b"1.2.3.4\x00",
        0x00100010: b"Li^Lei",
        0x0020000D: b"1.2.3\x00",
        0x00200013: b"7 ",
    }
    sequence_at = raw.index(b"\x08\x00\x10\x11")  # (0008,1110) Referenced Study Sequence
    sequence_end = raw.rindex(b"\xfe\xff\xdd\xe0") + 8  # the outer sequence's delimiter
    assert raw.count(b"\xfe\xff\xdd\xe0") == 2
    for cut in range(sequence_at + 8, sequence_end):
        assert scan_top_level(raw[:cut], start, implicit_vr=implicit, wanted=WANTED) is None, cut
    # Cut after a whole top-level element: a shorter data set, read up to there (and as in
    # pydicom, fewer than eight bytes after it are no element).
    for cut in (sequence_at, sequence_at + 7, sequence_end):
        shorter = scan_top_level(raw[:cut], start, implicit_vr=implicit, wanted=WANTED)
        assert shorter is not None
        assert {int(tag) for tag in shorter} == {0x00080018}


def test_what_the_walk_leaves_to_pydicom() -> None:
    raw = _nested_object(ExplicitVRLittleEndian)
    start, _ = _data_set_start(raw)
    at = raw.index(b"\x10\x00\x10\x00PN")  # Patient's Name, explicit VR
    unknown_vr = raw[: at + 4] + b"QQ" + raw[at + 6 :]
    assert scan_top_level(unknown_vr, start, implicit_vr=False, wanted=WANTED) is None
    other_vr = raw[: at + 4] + b"LO" + raw[at + 6 :]  # a wanted element with another VR
    assert scan_top_level(other_vr, start, implicit_vr=False, wanted=WANTED) is None
    element = raw[at : at + 8 + int.from_bytes(raw[at + 6 : at + 8], "little")]
    twice = raw[:at] + element + raw[at:]
    assert scan_top_level(twice, start, implicit_vr=False, wanted=WANTED) is None
    # Not wanted, it is skipped whatever its VR says.
    at = raw.index(b"\x20\x00\x13\x00IS")
    assert scan_top_level(raw, start, implicit_vr=False, wanted={0x00100010: "PN"}) is not None


def _saved(ds: Dataset, syntax: UID) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _explicit(tag: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"SQ"):
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def test_an_item_whose_length_disagrees_with_its_elements_is_left_to_pydicom() -> None:
    # An item that says 8 bytes but holds a longer element. Skipped by its length, the
    # object would read Patient ID "GOOD"; pydicom reads the element and then "EVIL".
    sequence_end = b"\xfe\xff\xdd\xe0" + b"\0" * 4
    good = _explicit(0x00100020, b"LO", b"GOOD")
    evil = _explicit(0x00100020, b"LO", b"EVIL")
    private = struct.pack("<HH2sHI", 0x0011, 0x1010, b"OB", 0, len(sequence_end + evil))
    element = struct.pack("<HH2sH", 0x0008, 0x1150, b"UI", len(sequence_end + good + private))
    data = (
        _explicit(0x00080018, b"UI", b"1.2.3.4\0")
        + struct.pack("<HH2sHI", 0x0008, 0x1115, b"SQ", 0, 0xFFFFFFFF)
        + struct.pack("<HHI", 0xFFFE, 0xE000, 8)
        + element
        + sequence_end
        + good
        + private
        + sequence_end
        + evil
    )
    raw = _saved(Dataset(), ExplicitVRLittleEndian)
    start, _ = _data_set_start(raw)
    raw = raw[:start] + data
    assert read_dataset(io.BytesIO(data), False, True).PatientID == "EVIL"
    assert scan_top_level(raw, start, implicit_vr=False, wanted=WANTED) is None


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_an_item_of_defined_length_is_read_by_its_elements_as_pydicom_does(syntax: UID) -> None:
    raw = _nested_object(syntax, defined_item=True)
    start, _ = _data_set_start(raw)
    implicit = syntax.is_implicit_VR
    found = scan_top_level(raw, start, implicit_vr=implicit, wanted=WANTED)
    assert found is not None
    assert found[0x00100010].value == b"Li^Lei"
    # pydicom reads an item's elements, whatever its length says; where the two disagree the
    # walk gives up rather than read something else than pydicom would.
    at = raw.index(b"\xfe\xff\x00\xe0", raw.index(b"\x08\x00\x10\x11")) + 4
    length = int.from_bytes(raw[at : at + 4], "little")
    for wrong in (length - 2, length + 2):
        patched = raw[:at] + wrong.to_bytes(4, "little") + raw[at + 4 :]
        assert scan_top_level(patched, start, implicit_vr=implicit, wanted=WANTED) is None


def test_a_data_set_in_another_encoding_than_declared_is_left_to_pydicom() -> None:
    # Declared implicit, encoded explicit: pydicom notices and reads it as explicit. Read
    # as implicit, "CS" and the length of the first element make a length of 676,675
    # bytes, which this object is long enough to hold.
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.PatientID = "PID1"
    ds.PixelData = b"\0" * 800_000
    ds["PixelData"].VR = "OW"
    raw = _saved(ds, ExplicitVRLittleEndian)
    start, _ = _data_set_start(raw)
    assert scan_top_level(raw, start, implicit_vr=False, wanted=WANTED) is not None
    assert scan_top_level(raw, start, implicit_vr=True, wanted=WANTED) is None
    raw = _nested_object(ImplicitVRLittleEndian)
    start, _ = _data_set_start(raw)
    assert scan_top_level(raw, start, implicit_vr=False, wanted=WANTED) is None


def test_long_values_are_left_unread_as_pydicom_leaves_them() -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100\\" + "\\".join(["ISO_IR 100"] * 120)  # > 1024 bytes
    ds.SOPInstanceUID = "1.2.3.4"
    with pytest.warns(UserWarning, match="PN component length"):
        ds.PatientName = "Doe^" + "J" * 1500
    ds.PatientID = "ID1"
    raw = _saved(ds, ExplicitVRLittleEndian)
    start, _ = _data_set_start(raw)
    found = scan_top_level(raw, start, implicit_vr=False, wanted=WANTED)
    assert found is not None
    pydicom_ds = read_dataset(io.BytesIO(raw[start:]), False, True, defer_size=1024)
    for tag in (0x00080005, 0x00100010, 0x00100020):
        assert found[tag].value == pydicom_ds._dict[tag].value, hex(tag)
    assert found[0x00100010].value is None  # deferred
    assert found[0x00080005].value is not None  # the character set is always read
