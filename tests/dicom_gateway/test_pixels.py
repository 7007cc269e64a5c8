"""Frame decoding and rendering (dicom_gateway.pixels) on real sample objects in a local
object store: windowing, MONOCHROME1, colour, functional groups, caches and errors."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import convert_color_space

from dicom_gateway import pixels
from dicom_gateway.pixels import (
    FrameCache,
    FrameNotFoundError,
    NoPixelDataError,
    PixelDecodeError,
    RenderOptions,
    Window,
)
from rdc_core.errors import InvalidInputError, NotFoundError
from rdc_core.storage import LocalObjectStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalObjectStore]:
    pixels.clear_memory_caches()
    yield LocalObjectStore(tmp_path / "objects")
    pixels.clear_memory_caches()


def put(store: LocalObjectStore, source: Path) -> str:
    """Store ``source`` under a content-addressed key, as ingest does."""
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    key = f"dicom/{digest}/{source.name}"
    store.put_file(key, source)
    return key


def sample(testdata: Path, name: str) -> Path:
    return testdata / "dicom" / name


def mono(values: list[list[int]], **attrs: object) -> Dataset:
    """A grey data set header with ``values`` as its (only) frame's pixel data."""
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = len(values), len(values[0])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel = 1
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def test_window_after_rescale_maps_linearly_to_eight_bits() -> None:
    arr = np.array([[0, 50, 100], [150, 200, 1000]], dtype=np.uint16)
    # Rescale: HU = 2 * stored - 100  ->  [-100, 0, 100], [200, 300, 1900]
    header = mono(arr.tolist(), RescaleSlope=2, RescaleIntercept=-100)
    out = pixels.render_pixels(arr, header, window=Window(center=100, width=201))
    assert out.dtype == np.uint8
    # LINEAR (PS3.3 C.11.2.1.2.1): x <= c-0.5-(w-1)/2 -> 0, x > c-0.5+(w-1)/2 -> 255,
    # else ((x - (c-0.5)) / (w-1) + 0.5) * 255: 0 HU -> 0.64, 100 HU -> 128.14.
    assert out.tolist() == [[0, 1, 128], [255, 255, 255]]
    # The header's window is used when none is given; the explicit one wins.
    with_header = mono(arr.tolist(), WindowCenter=[150, 10], WindowWidth=[100, 5])
    assert np.array_equal(
        pixels.render_pixels(arr, with_header),
        pixels.render_pixels(arr, with_header, window=Window(150, 100)),
    )
    assert not np.array_equal(
        pixels.render_pixels(arr, with_header),
        pixels.render_pixels(arr, with_header, window=Window(10, 5)),
    )


def test_without_a_window_the_frame_range_is_stretched() -> None:
    arr = np.array([[10, 20], [30, 40]], dtype=np.uint16)
    out = pixels.render_pixels(arr, mono(arr.tolist()))
    assert out.min() == 0 and out.max() == 255
    assert list(out.ravel()) == sorted(out.ravel())


def test_monochrome1_is_inverted() -> None:
    arr = np.array([[0, 100], [200, 300]], dtype=np.uint16)
    window = Window(150, 301)
    m2 = pixels.render_pixels(arr, mono(arr.tolist()), window=window)
    m1 = pixels.render_pixels(
        arr, mono(arr.tolist(), PhotometricInterpretation="MONOCHROME1"), window=window
    )
    assert np.array_equal(m1, 255 - m2)
    assert m1[0, 0] == 255  # lowest value is white


def test_window_validation() -> None:
    with pytest.raises(InvalidInputError):
        Window(40, 0)
    with pytest.raises(InvalidInputError):
        Window(40, 80, "CUBIC")
    with pytest.raises(FrameNotFoundError):
        RenderOptions(frame=0)
    with pytest.raises(InvalidInputError):
        RenderOptions(viewport=(0, 10))
    # Not-a-number and infinite values are no window (they rendered a blank image).
    for bad in ("nan", "inf", "-inf"):
        with pytest.raises(InvalidInputError):
            Window(float(bad), 400)
        with pytest.raises(InvalidInputError):
            Window(40, float(bad))


def test_colour_rgb_and_native_ybr(testdata: Path, store: LocalObjectStore) -> None:
    # RGB stored by plane (Planar Configuration 1): rendered as RGB, samples unchanged.
    path = sample(testdata, "color-pl.dcm")
    key = put(store, path)
    arr = pixels.decode_frame(store=store, storage_key=key, frame=1)
    header = pixels.read_instance_header(store, key)
    assert np.array_equal(pixels.render_pixels(arr, header), pydicom.dcmread(path).pixel_array)
    # Natively stored YBR_FULL is converted for display (and only for display).
    ds = pydicom.dcmread(path)
    ybr = convert_color_space(ds.pixel_array, "RGB", "YBR_FULL")
    ds.PhotometricInterpretation = "YBR_FULL"
    ds.PlanarConfiguration = 0
    ds.PixelData = ybr.tobytes()
    converted = store.root / "ybr.dcm"
    ds.save_as(converted)
    ybr_key = put(store, converted)
    raw = pixels.raw_frame(store=store, storage_key=ybr_key, frame=1)
    assert raw.photometric_interpretation == "YBR_FULL"
    assert raw.data == ybr.tobytes()
    rendered = pixels.render_pixels(
        pixels.decode_frame(store=store, storage_key=ybr_key, frame=1),
        pixels.read_instance_header(store, ybr_key),
    )
    assert np.abs(rendered.astype(int) - ds.pixel_array.astype(int)).max() <= 2


def test_enhanced_multiframe_uses_its_functional_groups(
    testdata: Path, store: LocalObjectStore, tmp_path: Path
) -> None:
    # emri_small is multi-frame MR without functional groups; give it the groups of an
    # Enhanced MR: one shared rescale, a window per frame.
    ds = pydicom.dcmread(sample(testdata, "emri_small.dcm"))
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept = 2, -10
    shared = Dataset()
    shared.PixelValueTransformationSequence = [transform]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for index in range(10):
        voi = Dataset()
        voi.WindowCenter, voi.WindowWidth = 100 + 50 * index, 200 + 20 * index
        group = Dataset()
        group.FrameVOILUTSequence = [voi]
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    enhanced = tmp_path / "enhanced.dcm"
    ds.save_as(enhanced)
    key = put(store, enhanced)
    header = pixels.read_instance_header(store, key)

    frame = 4
    arr = pixels.decode_frame(store=store, storage_key=key, frame=frame)
    assert np.array_equal(arr, ds.pixel_array[frame - 1])
    # The same as a plain header with that rescale and that frame's window given explicitly.
    plain = mono(arr.tolist(), RescaleSlope=2, RescaleIntercept=-10)
    expected = pixels.render_pixels(arr, plain, window=Window(100 + 50 * 3, 200 + 20 * 3))
    assert np.array_equal(pixels.render_pixels(arr, header, index=frame - 1), expected)
    assert not np.array_equal(pixels.render_pixels(arr, header, index=0), expected)


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_bigendian.dcm",
        "ExplVR_BigEnd.dcm",
        "examples_ybr_color.dcm",
        "rtdose.dcm",
        "image_dfl.dcm",
        "JPEG2000.dcm",
    ],
)
def test_raw_frames_are_little_endian_decodes(
    testdata: Path, store: LocalObjectStore, name: str
) -> None:
    path = sample(testdata, name)
    key = put(store, path)
    ds = pydicom.dcmread(path)
    count = pixels.number_of_frames(pixels.read_instance_header(store, key))
    assert count == int(ds.get("NumberOfFrames", 1) or 1)
    raw = pixels.raw_frame(store=store, storage_key=key, frame=count)
    expected = ds.pixel_array[count - 1] if count > 1 else ds.pixel_array
    got = np.frombuffer(raw.data, dtype=raw.dtype)
    assert raw.dtype.startswith(("<", "|"))
    if raw.planar_configuration == 1:
        got = got.reshape(raw.samples_per_pixel, raw.rows, raw.columns).transpose(1, 2, 0)
    assert np.array_equal(got.reshape(expected.shape), expected)
    assert (raw.rows, raw.columns) == (ds.Rows, ds.Columns)


def test_encoded_frames_are_the_stored_fragments(testdata: Path, store: LocalObjectStore) -> None:
    path = sample(testdata, "examples_ybr_color.dcm")
    key = put(store, path)
    ds = pydicom.dcmread(path)
    frames = list(generate_frames(ds.PixelData, number_of_frames=30))
    for number in (1, 17, 30):
        encoded = pixels.encoded_frame(store=store, storage_key=key, frame=number)
        assert encoded is not None and encoded.data == frames[number - 1]
        assert encoded.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
    native = put(store, sample(testdata, "CT_small.dcm"))
    assert pixels.encoded_frame(store=store, storage_key=native, frame=1) is None


def test_errors_name_the_problem(testdata: Path, store: LocalObjectStore) -> None:
    key = put(store, sample(testdata, "emri_small.dcm"))
    with pytest.raises(FrameNotFoundError, match="has 10"):
        pixels.raw_frame(store=store, storage_key=key, frame=11)
    report = put(store, sample(testdata, "test-SR.dcm"))
    with pytest.raises(NoPixelDataError):
        pixels.raw_frame(store=store, storage_key=report, frame=1)
    truncated = put(store, testdata / "dicom" / "malformed" / "MR_truncated.dcm")
    with pytest.raises(PixelDecodeError, match="cannot decode"):
        pixels.raw_frame(store=store, storage_key=truncated, frame=1)
    bad_frames = put(store, testdata / "dicom" / "malformed" / "badVR.dcm")
    with pytest.raises(PixelDecodeError, match="Number of Frames"):
        pixels.raw_frame(store=store, storage_key=bad_frames, frame=1)
    with pytest.raises(NotFoundError):
        pixels.raw_frame(store=store, storage_key="dicom/none/missing.dcm", frame=1)
    assert issubclass(PixelDecodeError, InvalidInputError)
    assert issubclass(FrameNotFoundError, NotFoundError)


class _NonSeekableStore(LocalObjectStore):
    """Hands out streams that cannot seek, like S3 bodies."""

    class _Stream(io.RawIOBase):
        def __init__(self, inner: BinaryIO) -> None:
            self.inner = inner

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
            data = self.inner.read(len(buffer))
            buffer[: len(data)] = data
            return len(data)

        def close(self) -> None:
            self.inner.close()
            super().close()

    def open(self, key: str) -> BinaryIO:
        return self._Stream(super().open(key))  # type: ignore[return-value]


def test_streams_that_cannot_seek_are_spooled(testdata: Path, tmp_path: Path) -> None:
    pixels.clear_memory_caches()
    store = _NonSeekableStore(tmp_path / "s3-like")
    key = put(store, sample(testdata, "MR_small_RLE.dcm"))
    raw = pixels.raw_frame(store=store, storage_key=key, frame=1)
    assert (
        raw.data
        == pydicom.dcmread(sample(testdata, "MR_small_RLE.dcm")).pixel_array.astype("<i2").tobytes()
    )


def test_rendered_png_and_jpeg(testdata: Path, store: LocalObjectStore) -> None:
    key = put(store, sample(testdata, "JPEG-LL.dcm"))  # 1024 rows x 256 columns
    png = pixels.render_frame(store=store, storage_key=key, options=RenderOptions())
    image = Image.open(io.BytesIO(png.data))
    assert png.media_type == "image/png" and image.format == "PNG"
    assert image.size == (256, 1024) and image.mode == "L"
    small = pixels.render_frame(
        store=store,
        storage_key=key,
        options=RenderOptions(viewport=(100, 100), media_type="image/jpeg", quality=80),
    )
    image = Image.open(io.BytesIO(small.data))
    assert image.format == "JPEG" and image.size == (25, 100)  # fits, keeps the aspect
    assert small.etag != png.etag


def test_a_huge_viewport_does_not_blow_the_image_up(
    testdata: Path, store: LocalObjectStore
) -> None:
    # Scaling 128 x 128 up to 8192 x 8192 took tens of seconds and ~100 MB per request:
    # enlargement stops at 2048 pixels on the longer side (larger originals stay as they are).
    def size(name: str, viewport: tuple[int, int]) -> tuple[int, int]:
        key = put(store, sample(testdata, name))
        options = RenderOptions(viewport=viewport)
        rendered = pixels.render_frame(store=store, storage_key=key, options=options)
        return Image.open(io.BytesIO(rendered.data)).size

    assert size("CT_small.dcm", (8192, 8192)) == (2048, 2048)
    assert size("JPEG-LL.dcm", (8192, 8192)) == (512, 2048)  # 256 x 1024, aspect kept
    assert size("CT_small.dcm", (512, 256)) == (256, 256)  # a modest enlargement still fits
    assert size("JPEG-LL.dcm", (100, 100)) == (25, 100)


def test_disk_cache_hit_needs_no_decode(
    testdata: Path, store: LocalObjectStore, tmp_path: Path
) -> None:
    cache = FrameCache(tmp_path / "cache")
    source = sample(testdata, "CT_small.dcm")
    key = put(store, source)
    options = RenderOptions(window=Window(40, 400))
    first = pixels.render_frame(store=store, storage_key=key, options=options, cache=cache)
    assert cache.get(options.cache_key(key)) == first.data
    assert not list((tmp_path / "cache").rglob(".tmp-*"))
    # With the object gone and the in-process caches cleared, only the disk cache can answer.
    store.delete(key)
    pixels.clear_memory_caches()
    again = pixels.render_frame(store=store, storage_key=key, options=options, cache=cache)
    assert again.data == first.data and again.etag == first.etag
    with pytest.raises(NotFoundError):
        pixels.render_frame(
            store=store, storage_key=key, options=RenderOptions(window=Window(40, 401)), cache=cache
        )


def test_disk_cache_evicts_least_recently_used(tmp_path: Path) -> None:
    cache = FrameCache(tmp_path / "cache", max_bytes=1000)
    for index in range(4):
        cache.put(f"{index:064x}", bytes(300))
        path = cache.root / f"{index:064x}"[:2] / f"{index:064x}"
        os.utime(path, (time.time() - 100 + index, time.time() - 100 + index))
    # Four entries of 300 bytes exceed 1000: the oldest went; reading refreshes an entry.
    assert cache.get(f"{0:064x}") is None
    assert cache.get(f"{1:064x}") is not None  # now the most recently used
    cache.put(f"{9:064x}", bytes(300))
    assert cache.get(f"{1:064x}") is not None
    assert cache.get(f"{2:064x}") is None
    assert cache.size() <= 1000


def test_frame_cache_per_data_directory(tmp_path: Path) -> None:
    from rdc_core.settings import Settings

    settings = Settings(data_dir=tmp_path / "data")
    cache = pixels.frame_cache(settings)
    assert cache is pixels.frame_cache(settings)
    assert cache.root == (tmp_path / "data" / "cache" / "frames").resolve()
    assert cache.max_bytes == pixels.FRAME_CACHE_MAX_BYTES
    shutil.rmtree(tmp_path / "data", ignore_errors=True)


def test_frames_are_transcoded_one_at_a_time(
    tmp_path: Path, testdata: Path, store: LocalObjectStore
) -> None:
    """Frames of a multi-frame object in another syntax (JPEG 2000 lossless; JPEG baseline
    for 8-bit data): pixel-exact (lossless) or close (baseline), and only the one frame is
    read and decoded: the memory used stays far below the object's pixel data."""
    import tracemalloc

    import openjpeg
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(22)
    frames, rows, columns = 48, 256, 256
    volume = rng.integers(0, 4096, size=(frames, rows, columns), dtype=np.uint16)
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = volume.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / "multiframe.dcm"
    ds.save_as(path, enforce_file_format=True)
    key = put(store, path)

    tracemalloc.start()
    try:
        encoded = pixels.transcoded_frame(
            store=store, storage_key=key, frame=31, transfer_syntax=pixels.JPEG_2000_LOSSLESS
        )
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(openjpeg.decode(encoded.data), volume[30])
    assert encoded.transfer_syntax_uid == pixels.JPEG_2000_LOSSLESS
    assert peak < volume.nbytes // 8, f"{peak} bytes for one frame of {volume.nbytes}"
    # 12-bit data has no JPEG baseline form.
    header = pixels.read_instance_header(store, key)
    assert not pixels.frame_transcodable(header, pixels.JPEG_BASELINE)
    with pytest.raises(pixels.TranscodeError):
        pixels.transcoded_frame(
            store=store, storage_key=key, frame=1, transfer_syntax=pixels.JPEG_BASELINE
        )

    # 8-bit colour, stored natively: JPEG baseline (lossy, close to the original).
    colour = put(store, sample(testdata, "SC_rgb_small_odd.dcm"))
    jpeg = pixels.transcoded_frame(
        store=store, storage_key=colour, frame=1, transfer_syntax=pixels.JPEG_BASELINE
    )
    original = pydicom.dcmread(sample(testdata, "SC_rgb_small_odd.dcm")).pixel_array
    decoded = np.asarray(Image.open(io.BytesIO(jpeg.data)).convert("RGB"))
    assert decoded.shape == original.shape
    assert float(np.abs(decoded.astype(int) - original.astype(int)).mean()) < 12


@pytest.mark.parametrize("name", ["emri_small.dcm", "examples_ybr_color.dcm"])
def test_multiframe_objects_are_transcoded_frame_by_frame(
    testdata: Path, store: LocalObjectStore, name: str
) -> None:
    """A multi-frame object to Explicit VR Little Endian in chunks: the same pixels and
    attributes as the whole-object transcoding."""
    from pydicom.uid import ExplicitVRLittleEndian

    key = put(store, sample(testdata, name))
    chunks = list(
        pixels.transcode_instance_chunks(
            store=store, storage_key=key, transfer_syntax=ExplicitVRLittleEndian
        )
    )
    assert len(chunks) > 3  # header, then frame by frame
    streamed = pydicom.dcmread(io.BytesIO(b"".join(chunks)))
    whole = pydicom.dcmread(
        io.BytesIO(
            pixels.transcode_instance(
                store=store, storage_key=key, transfer_syntax=ExplicitVRLittleEndian
            )
        )
    )
    assert streamed.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(streamed.pixel_array, whole.pixel_array)
    for keyword in ("SOPInstanceUID", "NumberOfFrames", "PhotometricInterpretation", "Rows"):
        assert streamed.get(keyword) == whole.get(keyword), keyword


def test_a_large_multiframe_object_is_never_held_whole(
    tmp_path: Path, store: LocalObjectStore
) -> None:
    """48 frames of 256 x 256 x 16 bits to JPEG 2000 lossless, read while the chunks are
    consumed: pixel-exact, and the memory used stays far below the pixel data's size."""
    import tracemalloc

    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    volume = np.random.default_rng(7).integers(0, 4096, size=(48, 256, 256), dtype=np.uint16)
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.Rows, ds.Columns, ds.NumberOfFrames = 256, 256, 48
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = volume.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / "volume.dcm"
    ds.save_as(path, enforce_file_format=True)
    key = put(store, path)
    pixels.clear_memory_caches()  # the decoded-frame cache would count as held frames
    out = tmp_path / "volume-j2k.dcm"
    tracemalloc.start()
    try:
        with out.open("wb") as sink:
            for chunk in pixels.transcode_instance_chunks(
                store=store, storage_key=key, transfer_syntax=pixels.JPEG_2000_LOSSLESS
            ):
                sink.write(chunk)
                pixels.clear_memory_caches()
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # One frame is 128 KiB; with the encoder's buffers about 0.9 MB, against 6.3 MB whole.
    assert peak < volume.nbytes // 4, f"{peak} bytes while transcoding {volume.nbytes}"
    result = pydicom.dcmread(out)
    assert result.file_meta.TransferSyntaxUID == pixels.JPEG_2000_LOSSLESS
    assert np.array_equal(result.pixel_array, volume)
