"""Decoding and rendering the frames of stored DICOM objects.

Used by WADO-RS (raw frames, rendered frames, thumbnails) and the image viewer. Objects are
read from the object store as streams; pydicom reads only the header and the one frame it is
asked for (the native and encapsulated pixel data readers seek to the frame), so a large
multi-frame object or study is never loaded whole. Every transfer syntax pydicom can decode
with the installed plugins (pylibjpeg-libjpeg, -openjpeg, -rle; numpy for native and deflate)
works here; nothing in this module implements a codec.

Two caches, both keyed by the storage key, which is derived from the object's UIDs *and* a
hash of its content (``dicom_gateway.ingest.instance_key``), so an entry can never go stale:

- an in-process LRU of decoded frames (the viewer asks for the same frame raw and rendered,
  at several window settings);
- an on-disk cache of rendered images under ``<data_dir>/cache/frames``, written atomically
  and bounded in size (least recently used files are evicted first).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final, Literal

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames, get_frame
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    apply_windowing,
    convert_color_space,
    get_decoder,
    get_encoder,
    pack_bits,
    pixel_array,
)
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from rdc_core.errors import InvalidInputError, NotFoundError
from rdc_core.settings import Settings
from rdc_core.storage import ObjectStore

__all__ = [
    "DEFLATED_IMAGE_FRAME_COMPRESSION",
    "FRAME_CACHE_MAX_BYTES",
    "MAX_ENLARGED_SIDE",
    "EncodedFrame",
    "FrameCache",
    "FrameNotFoundError",
    "NoPixelDataError",
    "PixelDecodeError",
    "RawFrame",
    "RenderOptions",
    "RenderedFrame",
    "TranscodeError",
    "Window",
    "can_transcode",
    "clear_memory_caches",
    "decode_frame",
    "encoded_frame",
    "frame_cache",
    "frame_transcodable",
    "is_compressed",
    "is_encapsulated",
    "number_of_frames",
    "open_instance",
    "raw_frame",
    "read_instance_header",
    "render_frame",
    "render_pixels",
    "transcode_instance",
    "transcode_instance_chunks",
    "transcoded_frame",
]

log = logging.getLogger(__name__)

DEFLATED_IMAGE_FRAME_COMPRESSION: Final = UID("1.2.840.10008.1.2.8.1")
"""Deflated Image Frame Compression (PS3.5 A.4.11, 2023): each frame deflated (RFC 1951) on
its own, in encapsulated Pixel Data. pydicom 3.0 does not know it; frames are inflated here."""

FRAME_CACHE_MAX_BYTES: Final = 512 * 1024 * 1024
"""Upper bound of the on-disk cache of rendered frames (per data directory)."""

# Bumped whenever the rendering changes, so cached images of the old code are not served.
_RENDER_VERSION: Final = 2
_DECODED_CACHE_BYTES: Final = 128 * 1024 * 1024
_HEADER_CACHE_ENTRIES: Final = 1024
# S3 bodies are not seekable and pydicom needs to seek: they are spooled, in memory up to
# this size and on disk beyond it.
_SPOOL_IN_MEMORY: Final = 16 * 1024 * 1024
_JPEG_QUALITY_DEFAULT: Final = 90
# A viewport may shrink an image at will but enlarges it only up to this many pixels on the
# longer side (an original larger than that is never enlarged): scaling 128 x 128 up to the
# largest allowed viewport cost tens of seconds and ~100 MB per request, for pixels the
# browser can interpolate just as well.
MAX_ENLARGED_SIDE: Final = 2048

MediaType = Literal["image/png", "image/jpeg"]
_PIL_FORMAT: Final[dict[str, str]] = {"image/png": "PNG", "image/jpeg": "JPEG"}
_WINDOW_FUNCTIONS: Final = frozenset({"LINEAR", "LINEAR_EXACT", "SIGMOID"})


class PixelDecodeError(InvalidInputError):
    """The instance's pixel data cannot be decoded (unsupported or corrupt encoding)."""

    title = "Pixel data cannot be decoded"


class FrameNotFoundError(NotFoundError):
    """The requested frame number is outside 1..Number of Frames."""

    title = "No such frame"


class TranscodeError(InvalidInputError):
    """The object cannot be delivered in the transfer syntax asked for."""

    title = "Cannot transcode"


class NoPixelDataError(NotFoundError):
    """The instance has no pixel data (e.g. a structured report)."""

    title = "No pixel data"


@dataclass(frozen=True, slots=True)
class RawFrame:
    """One decoded frame as uncompressed little-endian bytes, with what is needed to read it.

    ``data`` holds ``rows * columns * samples_per_pixel`` samples of ``bits_allocated`` bits
    (bit-packed when that is 1), colour-by-pixel unless ``planar_configuration`` is 1.
    ``photometric_interpretation`` describes the samples as delivered: compressed
    YBR data comes out of the decoder as RGB.
    """

    data: bytes
    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    pixel_representation: int
    planar_configuration: int
    photometric_interpretation: str
    dtype: str  # numpy dtype string of one sample, e.g. "<u2"
    transfer_syntax_uid: str = ExplicitVRLittleEndian


@dataclass(frozen=True, slots=True)
class EncodedFrame:
    """One frame exactly as encoded in the stored object (compressed transfer syntaxes)."""

    data: bytes
    transfer_syntax_uid: str


@dataclass(frozen=True, slots=True)
class Window:
    """A VOI window in modality units (after Rescale Slope/Intercept), PS3.3 C.11.2.1.2."""

    center: float
    width: float
    function: str = "LINEAR"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.center) and math.isfinite(self.width)):
            raise InvalidInputError("window center and width must be finite numbers")
        if self.function.upper() not in _WINDOW_FUNCTIONS:
            raise InvalidInputError(
                f"window function must be one of {', '.join(sorted(_WINDOW_FUNCTIONS))}"
            )
        if self.width <= 0 or (self.function.upper() == "LINEAR" and self.width < 1):
            raise InvalidInputError("window width must be positive (at least 1 for LINEAR)")


@dataclass(frozen=True, slots=True)
class RenderOptions:
    """How to render a frame: which one, window, viewport (fit within w×h), format."""

    frame: int = 1
    window: Window | None = None
    viewport: tuple[int, int] | None = None
    media_type: MediaType = "image/png"
    quality: int = _JPEG_QUALITY_DEFAULT

    def __post_init__(self) -> None:
        if self.frame < 1:
            raise FrameNotFoundError("frame numbers start at 1")
        if self.media_type not in _PIL_FORMAT:
            raise InvalidInputError(f"cannot render as {self.media_type}")
        if not 1 <= self.quality <= 100:
            raise InvalidInputError("quality must be between 1 and 100")
        if self.viewport is not None and (
            not all(1 <= v <= 8192 for v in self.viewport) or len(self.viewport) != 2
        ):
            raise InvalidInputError("viewport must be two sizes between 1 and 8192")

    def cache_key(self, storage_key: str) -> str:
        """A stable hex digest of the object and these options (cache file name and ETag)."""
        window = (
            None
            if self.window is None
            else [self.window.center, self.window.width, self.window.function.upper()]
        )
        parts = [
            _RENDER_VERSION,
            storage_key,
            self.frame,
            window,
            list(self.viewport) if self.viewport else None,
            self.media_type,
            self.quality if self.media_type == "image/jpeg" else None,
        ]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class RenderedFrame:
    """A rendered image and its media type; ``etag`` identifies the bytes."""

    data: bytes
    media_type: str
    etag: str


# ---------------------------------------------------------------------------------------
# Reading stored objects


@contextlib.contextmanager
def open_instance(store: ObjectStore, storage_key: str) -> Iterator[BinaryIO]:
    """A seekable binary stream of the stored object (closed when the block ends).

    The local store hands out files; streams that cannot seek (S3 bodies) are spooled to a
    temporary file first, because pydicom seeks while reading.
    """
    stream = store.open(storage_key)
    try:
        seekable = getattr(stream, "seekable", None)
        if callable(seekable) and seekable():
            yield stream
            return
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY) as spool:
            shutil.copyfileobj(stream, spool, 1 << 20)
            spool.seek(0)
            yield spool  # type: ignore[misc]
    finally:
        stream.close()


class _LRU:
    """A small thread-safe LRU bounded by a total weight (bytes or entries)."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._items: OrderedDict[object, tuple[object, int]] = OrderedDict()
        self._weight = 0
        self._lock = threading.Lock()

    def get(self, key: object) -> object | None:
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                return None
            self._items.move_to_end(key)
            return entry[0]

    def put(self, key: object, value: object, weight: int = 1) -> None:
        if weight > self._capacity:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._weight -= old[1]
            self._items[key] = (value, weight)
            self._weight += weight
            while self._weight > self._capacity:
                _, (_, dropped) = self._items.popitem(last=False)
                self._weight -= dropped

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._weight = 0


_headers = _LRU(_HEADER_CACHE_ENTRIES)
_decoded = _LRU(_DECODED_CACHE_BYTES)


def clear_memory_caches() -> None:
    """Forget the in-process caches of headers and decoded frames (the disk cache stays)."""
    _headers.clear()
    _decoded.clear()


def read_instance_header(store: ObjectStore, storage_key: str) -> Dataset:
    """The stored object's data set up to (not including) its pixel data, with file meta.

    Cached per storage key (keys are content-addressed). The returned data set is shared:
    callers must not modify it. Raises NotFoundError (no such object), StorageError and
    PixelDecodeError (unreadable header).
    """
    cached = _headers.get(storage_key)
    if isinstance(cached, Dataset):
        return cached
    with open_instance(store, storage_key) as stream:
        try:
            header = pydicom.dcmread(stream, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many kinds of error on corrupt input
            raise PixelDecodeError(
                f"cannot read the header of {storage_key}: {type(exc).__name__}: {exc}"
            ) from exc
    _headers.put(storage_key, header)
    return header


def number_of_frames(header: Dataset) -> int:
    """Number of Frames (1 when absent); raises PixelDecodeError when it is not a number."""
    value = header.get("NumberOfFrames")
    if value in (None, ""):
        return 1
    try:
        count = int(value)
    except (TypeError, ValueError) as exc:
        raise PixelDecodeError(f"Number of Frames {value!r} is not a number") from exc
    return max(count, 1)


def _transfer_syntax(header: Dataset) -> UID:
    ts = header.get("file_meta", Dataset()).get("TransferSyntaxUID")
    if not ts:
        raise PixelDecodeError("the object has no Transfer Syntax UID")
    return UID(str(ts))


def is_compressed(transfer_syntax: str) -> bool:
    """A transfer syntax whose frames are compressed (JPEG, JPEG-LS, JPEG 2000, RLE, HTJ2K,
    deflated frames, ...); False for native and for syntaxes nobody knows."""
    ts = UID(transfer_syntax)
    if ts == DEFLATED_IMAGE_FRAME_COMPRESSION:
        return True
    return bool(ts.is_transfer_syntax and ts.is_compressed)


def is_encapsulated(transfer_syntax: str) -> bool:
    """Pixel data in fragments, one frame each (or more): every compressed syntax."""
    return is_compressed(transfer_syntax)


def _decoded_by_pydicom(ts: UID) -> bool:
    # Compressed syntaxes whose decoders deliver colour as RGB, colour-by-pixel.
    return ts != DEFLATED_IMAGE_FRAME_COMPRESSION and is_compressed(ts)


def _inflate_frame(header: Dataset, data: bytes) -> np.ndarray:
    """A Deflated Image Frame Compression frame as the native frame it deflates: little
    endian, laid out as the header says; returned colour-by-pixel like pydicom's native
    reader."""
    try:
        native = zlib.decompress(data, -zlib.MAX_WBITS)
    except zlib.error:
        native = zlib.decompress(data)  # a zlib-wrapped stream, as some writers produce
    rows, columns = int(header.Rows), int(header.Columns)
    samples = int(header.get("SamplesPerPixel", 1) or 1)
    bits = int(header.BitsAllocated)
    if bits not in (8, 16, 32):
        raise PixelDecodeError(f"deflated frames of {bits}-bit samples are not supported")
    kind = "i" if int(header.get("PixelRepresentation", 0) or 0) else "u"
    dtype = np.dtype(f"<{kind}{bits // 8}")
    expected = rows * columns * samples * dtype.itemsize
    if len(native) < expected:
        raise PixelDecodeError(f"a deflated frame holds {len(native)} bytes, {expected} expected")
    arr = np.frombuffer(native[:expected], dtype=dtype)
    if samples == 1:
        return arr.reshape(rows, columns)
    if int(header.get("PlanarConfiguration", 0) or 0) == 1:
        return np.transpose(arr.reshape(samples, rows, columns), (1, 2, 0))
    return arr.reshape(rows, columns, samples)


def _check_frame(header: Dataset, frame: int) -> int:
    count = number_of_frames(header)
    if not 1 <= frame <= count:
        raise FrameNotFoundError(f"frame {frame} does not exist; the object has {count}")
    return frame - 1


def _decode_error(header: Dataset, exc: Exception) -> PixelDecodeError:
    ts = _transfer_syntax(header)
    return PixelDecodeError(
        f"cannot decode the pixel data ({ts.name or ts}): {type(exc).__name__}: {exc}"
    )


def decode_frame(*, store: ObjectStore, storage_key: str, frame: int) -> np.ndarray:
    """Frame ``frame`` (1-based) of the stored object as pydicom decodes it.

    Natively encoded data keeps its samples exactly (``raw=True``: no colour conversion),
    so the frame matches the header; compressed data is returned as pydicom's decoders
    deliver it (YBR converted to RGB). The returned array is shared: do not modify it.
    Raises FrameNotFoundError, NoPixelDataError, PixelDecodeError, NotFoundError.
    """
    header = read_instance_header(store, storage_key)
    index = _check_frame(header, frame)
    cached = _decoded.get((storage_key, index))
    if isinstance(cached, np.ndarray):
        return cached
    ts = _transfer_syntax(header)
    if ts == DEFLATED_IMAGE_FRAME_COMPRESSION:
        encoded = encoded_frame(store=store, storage_key=storage_key, frame=frame)
        assert encoded is not None
        try:
            arr = _inflate_frame(header, encoded.data)
        except PixelDecodeError:
            raise
        except Exception as exc:
            raise _decode_error(header, exc) from exc
        arr.flags.writeable = False
        _decoded.put((storage_key, index), arr, max(int(arr.nbytes), 1))
        return arr
    native = not is_compressed(ts)
    with open_instance(store, storage_key) as stream:
        try:
            if ts == DeflatedExplicitVRLittleEndian:
                # pydicom's frame reader cannot inflate a stream; the data set is inflated
                # in memory (deflated objects are small, the encoding is rare).
                source: BinaryIO | Dataset = pydicom.dcmread(stream)
            else:
                source = stream
            arr = pixel_array(source, index=index, raw=native)
        except AttributeError as exc:
            if "no pixel data" in str(exc).lower() or "has no" in str(exc).lower():
                raise NoPixelDataError("the instance has no pixel data") from exc
            raise _decode_error(header, exc) from exc
        except Exception as exc:  # decoders raise RuntimeError, ValueError, ...
            raise _decode_error(header, exc) from exc
    arr.flags.writeable = False
    _decoded.put((storage_key, index), arr, max(int(arr.nbytes), 1))
    return arr


def raw_frame(*, store: ObjectStore, storage_key: str, frame: int) -> RawFrame:
    """Frame ``frame`` (1-based) as uncompressed little-endian bytes (WADO-RS frames).

    The layout follows the header: colour-by-plane when Planar Configuration is 1 and the
    data was stored natively, 1-bit data bit-packed.
    """
    header = read_instance_header(store, storage_key)
    arr = decode_frame(store=store, storage_key=storage_key, frame=frame)
    ts = _transfer_syntax(header)
    samples = int(header.get("SamplesPerPixel", 1) or 1)
    planar = int(header.get("PlanarConfiguration", 0) or 0) if samples > 1 else 0
    photometric = str(header.get("PhotometricInterpretation", "") or "")
    if _decoded_by_pydicom(ts):
        # The decoders deliver colour-by-pixel and convert YBR to RGB.
        planar = 0
        if samples == 3 and photometric.startswith("YBR"):
            photometric = "RGB"
    little = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    if planar == 1 and little.ndim == 3:
        little = np.transpose(little, (2, 0, 1))
    bits_allocated = int(header.get("BitsAllocated", little.dtype.itemsize * 8) or 8)
    if bits_allocated == 1:
        data = pack_bits(little, pad=False)
    else:
        bits_allocated = little.dtype.itemsize * 8
        data = np.ascontiguousarray(little).tobytes()
    return RawFrame(
        data=data,
        rows=int(arr.shape[0]),
        columns=int(arr.shape[1]),
        samples_per_pixel=samples,
        bits_allocated=bits_allocated,
        pixel_representation=int(header.get("PixelRepresentation", 0) or 0),
        planar_configuration=planar,
        photometric_interpretation=photometric,
        dtype=little.dtype.str,
    )


def encoded_frame(*, store: ObjectStore, storage_key: str, frame: int) -> EncodedFrame | None:
    """Frame ``frame`` (1-based) exactly as compressed in the stored object, or None when
    the object is not stored in a compressed (encapsulated) transfer syntax."""
    header = read_instance_header(store, storage_key)
    index = _check_frame(header, frame)
    ts = _transfer_syntax(header)
    if not is_encapsulated(ts):
        return None
    count = number_of_frames(header)
    with open_instance(store, storage_key) as stream:
        try:
            # A deferred read parses the header and notes where Pixel Data starts without
            # reading it; get_frame then follows the offset tables (or the fragments) there.
            ds = pydicom.dcmread(stream, defer_size=256)
            elem = ds.get_item(0x7FE00010, keep_deferred=True)
            if not isinstance(elem, RawDataElement) or elem.value_tell is None:
                raise NoPixelDataError("the instance has no pixel data")
            extended: tuple[bytes, bytes] | None = None
            if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
                extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
            stream.seek(elem.value_tell)
            data = get_frame(stream, index, extended_offsets=extended, number_of_frames=count)
        except NoPixelDataError:
            raise
        except Exception as exc:
            raise _decode_error(header, exc) from exc
    return EncodedFrame(data=data, transfer_syntax_uid=str(ts))


# ---------------------------------------------------------------------------------------
# Frames in another (compressed) transfer syntax: one frame decoded and encoded at a time

JPEG_BASELINE: Final = UID("1.2.840.10008.1.2.4.50")
JPEG_2000_LOSSLESS: Final = UID("1.2.840.10008.1.2.4.90")
_FRAME_QUALITY: Final = 95


def _eight_bit(header: Dataset) -> bool:
    return (
        int(header.get("BitsStored", 8) or 8) <= 8
        and int(header.get("PixelRepresentation", 0) or 0) == 0
        and int(header.get("SamplesPerPixel", 1) or 1) in (1, 3)
    )


def frame_transcodable(header: Dataset, target: str) -> bool:
    """Whether frames of an object with ``header`` can be sent encoded in ``target``: JPEG
    2000 lossless from any decodable pixel data (not 1-bit), JPEG baseline (lossy) from
    8-bit unsigned grey or colour data."""
    target_uid = UID(target)
    if int(header.get("BitsAllocated", 8) or 8) == 1 or not _decodable(_transfer_syntax(header)):
        return False
    if target_uid == JPEG_2000_LOSSLESS:
        try:
            return bool(get_encoder(target_uid).is_available)
        except NotImplementedError:
            return False
    return target_uid == JPEG_BASELINE and _eight_bit(header)


def transcoded_frame(
    *, store: ObjectStore, storage_key: str, frame: int, transfer_syntax: str
) -> EncodedFrame:
    """Frame ``frame`` (1-based) encoded in ``transfer_syntax`` (see
    :func:`frame_transcodable`): only that frame is read and decoded, so a large multi-frame
    object is never held whole. Raises TranscodeError (and what :func:`decode_frame` raises)."""
    header = read_instance_header(store, storage_key)
    target = UID(transfer_syntax)
    if not frame_transcodable(header, target):
        ts = _transfer_syntax(header)
        raise TranscodeError(f"frames of {ts.name or ts} cannot be sent as {target.name or target}")
    from PIL import Image

    arr = decode_frame(store=store, storage_key=storage_key, frame=frame)
    samples = int(header.get("SamplesPerPixel", 1) or 1)
    photometric = str(header.get("PhotometricInterpretation", "") or "MONOCHROME2")
    try:
        native = not _decoded_by_pydicom(_transfer_syntax(header))
        if samples == 3 and native and photometric.startswith("YBR"):
            arr = convert_color_space(arr, photometric, "RGB")  # encoders are given RGB
        if target == JPEG_BASELINE:
            image = Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8, copy=False)))
            out = io.BytesIO()
            # 4:4:4: no chroma subsampling (small images and fine colour detail survive).
            image.save(out, format="JPEG", quality=_FRAME_QUALITY, subsampling=0)
            data = out.getvalue()
        else:
            bits_allocated = arr.dtype.itemsize * 8
            data = get_encoder(target).encode(
                np.ascontiguousarray(arr),
                rows=int(arr.shape[0]),
                columns=int(arr.shape[1]),
                samples_per_pixel=samples,
                number_of_frames=1,
                bits_allocated=bits_allocated,
                bits_stored=min(int(header.get("BitsStored", bits_allocated)), bits_allocated),
                pixel_representation=int(header.get("PixelRepresentation", 0) or 0),
                photometric_interpretation=photometric if samples == 1 else "RGB",
                planar_configuration=0,
            )
    except Exception as exc:  # encoders raise many kinds of error
        raise TranscodeError(
            f"cannot encode frame {frame} as {target.name or target}: {type(exc).__name__}: {exc}"
        ) from exc
    return EncodedFrame(data=data, transfer_syntax_uid=str(target))


# ---------------------------------------------------------------------------------------
# Transcoding whole objects (WADO-RS retrieve in another transfer syntax)

_WORD_SIZES: Final = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}
# Compressed syntaxes objects are re-encoded in (lossless; pixel-exact in the tests).
_ENCODED_TARGETS: Final = frozenset({UID("1.2.840.10008.1.2.4.90")})  # JPEG 2000 lossless


def _decodable(ts: UID) -> bool:
    if ts == DEFLATED_IMAGE_FRAME_COMPRESSION:
        return True
    if not ts.is_transfer_syntax:
        return False
    if not ts.is_compressed:
        return True
    try:
        return bool(get_decoder(ts).is_available)
    except NotImplementedError:
        return False


def can_transcode(source: str, target: str, *, has_pixels: bool = True) -> bool:
    """Whether an object stored in ``source`` can be sent in ``target``: the same syntax,
    Explicit VR Little Endian from anything pydicom reads and decodes, or a compressed syntax
    whose encoder is installed (from data that can be decoded)."""
    src, dst = UID(source), UID(target)
    if src == dst:
        return True
    if not dst.is_transfer_syntax or dst.is_deflated:
        return False
    if not has_pixels:
        return not dst.is_compressed
    if not _decodable(src):
        return False
    if dst == ExplicitVRLittleEndian:
        return True
    if dst not in _ENCODED_TARGETS:
        return False
    try:
        return bool(get_encoder(dst).is_available)
    except NotImplementedError:
        return False


def _swap_words(ds: Dataset) -> None:
    # Binary values of a big-endian object, brought to little endian (the writer does not).
    for elem in ds.iterall():
        size = _WORD_SIZES.get(str(elem.VR))
        if size and isinstance(elem.value, bytes) and len(elem.value) % size == 0:
            if elem.tag == 0x7FE00010:
                continue
            elem.value = np.frombuffer(elem.value, dtype=f">u{size}").astype(f"<u{size}").tobytes()


def _native_little_endian(ds: Dataset, source: UID, header: Dataset) -> None:
    """Replace the Pixel Data of ``ds`` by its native little-endian encoding."""
    if "PixelData" not in ds:
        return
    if source == DEFLATED_IMAGE_FRAME_COMPRESSION:
        count = number_of_frames(header)
        frames = [
            np.ascontiguousarray(_inflate_frame(header, frame)).tobytes()
            for frame in generate_frames(ds.PixelData, number_of_frames=count)
        ]
        ds.PixelData = b"".join(frames)
        ds["PixelData"].VR = "OB" if int(header.BitsAllocated) <= 8 else "OW"
        ds["PixelData"].is_undefined_length = False
        if int(header.get("SamplesPerPixel", 1) or 1) > 1:
            ds.PlanarConfiguration = 0
    elif source.is_compressed:
        ds.decompress(generate_instance_uid=False)
    elif not source.is_little_endian:
        arr = ds.pixel_array
        if int(ds.get("BitsAllocated", 8) or 8) == 1:
            raise TranscodeError("big-endian 1-bit pixel data cannot be transcoded")
        ds.PixelData = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"))).tobytes()
        ds["PixelData"].VR = "OB" if arr.dtype.itemsize == 1 else "OW"
        if int(ds.get("SamplesPerPixel", 1) or 1) > 1:
            ds.PlanarConfiguration = 0


def transcode_instance(*, store: ObjectStore, storage_key: str, transfer_syntax: str) -> bytes:
    """The stored object as a Part-10 file in ``transfer_syntax`` (see :func:`can_transcode`),
    with the same SOP Instance UID. The object is read whole: it is meant for the single
    objects of a WADO-RS retrieve. Raises TranscodeError."""
    header = read_instance_header(store, storage_key)
    source = _transfer_syntax(header)
    target = UID(transfer_syntax)
    if not can_transcode(source, target, has_pixels=True):
        raise TranscodeError(f"cannot transcode {source.name or source} to {target.name or target}")
    with open_instance(store, storage_key) as stream:
        try:
            ds = pydicom.dcmread(stream)
            ds.file_meta.TransferSyntaxUID = source  # as stored (pydicom may guess otherwise)
            big_endian = source.is_transfer_syntax and not source.is_little_endian
            _native_little_endian(ds, source, header)
            if big_endian:
                _swap_words(ds)
                # Every value is little endian now; the writer may encode it as such.
                ds.set_original_encoding(ds.original_encoding[0], True, ds.original_character_set)
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            if target != ExplicitVRLittleEndian and "PixelData" in ds:
                ds.compress(target, generate_instance_uid=False)
            ds.file_meta.TransferSyntaxUID = target
            out = io.BytesIO()
            pydicom.dcmwrite(
                out,
                ds,
                implicit_vr=target.is_implicit_VR,
                little_endian=True,
                enforce_file_format=True,
            )
        except TranscodeError:
            raise
        except Exception as exc:  # decoders and encoders raise many kinds of error
            raise TranscodeError(
                f"cannot transcode {source.name or source} to {target.name or target}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    return out.getvalue()


def _frame_by_frame(header: Dataset, source: UID, target: UID) -> bool:
    """Whether a multi-frame object is transcoded frame by frame (see
    :func:`transcode_instance_chunks`): little-endian or encapsulated sources, to Explicit
    VR Little Endian, or (grey data) to JPEG 2000 lossless; not 1-bit data."""
    if number_of_frames(header) < 2 or int(header.get("BitsAllocated", 8) or 8) == 1:
        return False
    if not source.is_transfer_syntax or not source.is_little_endian or source.is_deflated:
        return False
    if target == ExplicitVRLittleEndian:
        return True
    return target == JPEG_2000_LOSSLESS and int(header.get("SamplesPerPixel", 1) or 1) == 1


def _pixel_data_header(vr: bytes, length: int) -> bytes:
    return b"\xe0\x7f\x10\x00" + vr + b"\x00\x00" + length.to_bytes(4, "little")


def _item(data: bytes, tag: bytes = b"\xfe\xff\x00\xe0") -> bytes:
    return tag + len(data).to_bytes(4, "little") + data


def transcode_instance_chunks(
    *, store: ObjectStore, storage_key: str, transfer_syntax: str
) -> Iterator[bytes]:
    """The stored object as a Part-10 file in ``transfer_syntax``, in chunks. A multi-frame
    object is transcoded one frame at a time (its header first, then each frame decoded and
    written, or encoded, as the response is sent), so it is never held whole; other objects
    go through :func:`transcode_instance`. The header is read (and errors raised as
    TranscodeError) before this returns."""
    header = read_instance_header(store, storage_key)
    source = _transfer_syntax(header)
    target = UID(transfer_syntax)
    if not can_transcode(source, target, has_pixels=True):
        raise TranscodeError(f"cannot transcode {source.name or source} to {target.name or target}")
    if not _frame_by_frame(header, source, target):
        return iter(
            [transcode_instance(store=store, storage_key=storage_key, transfer_syntax=target)]
        )
    count = number_of_frames(header)
    try:
        first = raw_frame(store=store, storage_key=storage_key, frame=1)
        with open_instance(store, storage_key) as stream:
            ds = pydicom.dcmread(stream, stop_before_pixels=True)
        ds.file_meta.TransferSyntaxUID = target
        # The frames as they are written: what decoding made of colour and planes.
        ds.PhotometricInterpretation = first.photometric_interpretation
        if first.samples_per_pixel > 1:
            ds.PlanarConfiguration = first.planar_configuration
        for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
            if keyword in ds:
                delattr(ds, keyword)
        if target != ExplicitVRLittleEndian:
            ds.LossyImageCompression = ds.get("LossyImageCompression", "00") or "00"
        out = io.BytesIO()
        pydicom.dcmwrite(out, ds, implicit_vr=False, little_endian=True, enforce_file_format=True)
    except (TranscodeError, NotFoundError):
        raise
    except Exception as exc:
        raise TranscodeError(
            f"cannot transcode {source.name or source} to {target.name or target}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    head = out.getvalue()

    def chunks() -> Iterator[bytes]:
        if target == ExplicitVRLittleEndian:
            frame_size = len(first.data)
            total = frame_size * count
            vr = b"OB" if first.bits_allocated <= 8 else b"OW"
            yield head + _pixel_data_header(vr, total + total % 2)
            yield first.data
            for number in range(2, count + 1):
                data = raw_frame(store=store, storage_key=storage_key, frame=number).data
                if len(data) != frame_size:
                    raise TranscodeError(f"frame {number} is not the size of frame 1")
                yield data
            if total % 2:
                yield b"\x00"
            return
        # Encapsulated: an empty Basic Offset Table, one item per frame, the delimiter.
        yield head + _pixel_data_header(b"OB", 0xFFFFFFFF) + _item(b"")
        for number in range(1, count + 1):
            encoded = transcoded_frame(
                store=store, storage_key=storage_key, frame=number, transfer_syntax=target
            ).data
            yield _item(encoded + b"\x00" * (len(encoded) % 2))
        yield b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"

    return chunks()


# ---------------------------------------------------------------------------------------
# Rendering


def _first_number(value: object) -> float | None:
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        value = value[0] if len(value) else None
    try:
        return float(value) if value not in (None, "") else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _frame_view(header: Dataset, index: int) -> Dataset:
    """The pixel-transformation attributes that apply to one frame.

    Enhanced (multi-frame) objects keep Rescale Slope/Intercept and the window in the
    shared or per-frame functional groups instead of the top level; those win here.
    """
    view = Dataset()
    for keyword in (
        "PhotometricInterpretation",
        "BitsStored",
        "PixelRepresentation",
        "RescaleSlope",
        "RescaleIntercept",
        "ModalityLUTSequence",
        "WindowCenter",
        "WindowWidth",
        "VOILUTFunction",
        "VOILUTSequence",
    ):
        if keyword in header:
            setattr(view, keyword, header.get(keyword))
    if hasattr(header, "file_meta"):
        view.file_meta = header.file_meta
    groups: list[Dataset] = []
    shared = header.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        groups.append(per_frame[index])
    for group in groups:
        for sequence, keywords in (
            ("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept")),
            ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction")),
        ):
            items = group.get(sequence)
            if not items:
                continue
            for keyword in keywords:
                if keyword in items[0]:
                    setattr(view, keyword, items[0].get(keyword))
    return view


def _header_window(view: Dataset) -> Window | None:
    center = _first_number(view.get("WindowCenter"))
    width = _first_number(view.get("WindowWidth"))
    if center is None or width is None:
        return None
    function = str(view.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    try:
        return Window(center, width, function)
    except InvalidInputError:
        return None  # a nonsensical header window: fall back to the frame's range


def _to_eight_bits(values: np.ndarray, window: Window) -> np.ndarray:
    # pydicom's windowing maps onto the output range of the data set it is given; a data
    # set describing unsigned 8-bit output makes that range 0..255.
    target = Dataset()
    target.PhotometricInterpretation = "MONOCHROME2"
    target.BitsStored = 8
    target.PixelRepresentation = 0
    target.WindowCenter = window.center
    target.WindowWidth = window.width
    target.VOILUTFunction = window.function.upper()
    out = apply_windowing(values.astype(np.float64), target)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _grayscale(arr: np.ndarray, view: Dataset, window: Window | None) -> np.ndarray:
    values = apply_modality_lut(arr, view)
    if window is None:
        window = _header_window(view)
    if window is None and view.get("VOILUTSequence"):
        lut = apply_voi(values.astype(np.int64), view)
        bits = int(view.VOILUTSequence[0].LUTDescriptor[2])
        scaled = lut.astype(np.float64) * (255.0 / (2**bits - 1))
        out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    else:
        if window is None:
            # No window anywhere: stretch the frame's own range.
            low, high = float(np.min(values)), float(np.max(values))
            window = Window(
                center=(low + high + 1) / 2, width=max(high - low + 1, 1), function="LINEAR"
            )
        out = _to_eight_bits(values, window)
    if str(view.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        out = 255 - out  # MONOCHROME1: the lowest value is white
    return out


def _scale_to_eight_bits(arr: np.ndarray, bits: int) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    top = float(2**bits - 1) if bits > 0 else float(np.max(arr) or 1)
    return np.clip(np.rint(arr.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def render_pixels(
    arr: np.ndarray, header: Dataset, *, index: int = 0, window: Window | None = None
) -> np.ndarray:
    """An 8-bit display image (rows×columns grey, or rows×columns×3 RGB) of one frame.

    Grey: modality LUT (Rescale Slope/Intercept), then the VOI window — ``window``, else
    the header's first Window Center/Width, else its VOI LUT, else the frame's min/max —
    and MONOCHROME1 inverted. Colour: YBR converted to RGB, palette colour looked up,
    samples scaled to 8 bits; ``window`` does not apply to colour (PS3.18 8.3.5.1.2).
    ``arr`` is the frame as :func:`decode_frame` returns it.
    """
    photometric = str(header.get("PhotometricInterpretation", "MONOCHROME2") or "")
    bits_stored = int(header.get("BitsStored", 8) or 8)
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, header)
        lut_bits = 16 if rgb.dtype == np.uint16 else 8
        return _scale_to_eight_bits(rgb, lut_bits)
    if arr.ndim == 3:
        if photometric in ("YBR_FULL", "YBR_FULL_422") and not _decoded_by_pydicom(
            _transfer_syntax(header)
        ):
            # Natively stored YBR is decoded as stored (raw); the decoders of compressed
            # data already deliver RGB.
            arr = convert_color_space(arr, photometric, "RGB")
        return _scale_to_eight_bits(arr, bits_stored)
    return _grayscale(arr, _frame_view(header, index), window)


def _bounded_viewport(size: tuple[int, int], viewport: tuple[int, int]) -> tuple[int, int]:
    """The viewport to fit ``size`` into: as asked when that shrinks the image, else
    limited so that the enlarged image's longer side stays within MAX_ENLARGED_SIDE."""
    width, height = size
    scale = min(viewport[0] / width, viewport[1] / height)
    if scale <= 1:
        return viewport
    limit = max(1.0, MAX_ENLARGED_SIDE / max(width, height))
    if scale <= limit:
        return viewport
    return (max(1, round(width * limit)), max(1, round(height * limit)))


def _encode_image(image8: np.ndarray, options: RenderOptions) -> bytes:
    from PIL import Image, ImageOps

    image = Image.fromarray(image8, mode="RGB" if image8.ndim == 3 else "L")
    if options.viewport is not None:
        # PS3.18 viewport: scale to fit within it, keeping the aspect ratio.
        image = ImageOps.contain(
            image, _bounded_viewport(image.size, options.viewport), method=Image.Resampling.LANCZOS
        )
    buffer = io.BytesIO()
    if options.media_type == "image/jpeg":
        image.save(buffer, format="JPEG", quality=options.quality)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def render_frame(
    *,
    store: ObjectStore,
    storage_key: str,
    options: RenderOptions,
    cache: FrameCache | None = None,
) -> RenderedFrame:
    """Frame ``options.frame`` of the stored object rendered as PNG or JPEG.

    With ``cache``, a rendering made before with the same options is returned from disk.
    Raises FrameNotFoundError, NoPixelDataError, PixelDecodeError, NotFoundError.
    """
    key = options.cache_key(storage_key)
    if cache is not None and (hit := cache.get(key)) is not None:
        return RenderedFrame(data=hit, media_type=options.media_type, etag=key)
    header = read_instance_header(store, storage_key)
    arr = decode_frame(store=store, storage_key=storage_key, frame=options.frame)
    try:
        image8 = render_pixels(arr, header, index=options.frame - 1, window=options.window)
    except (ValueError, NotImplementedError, AttributeError, KeyError, IndexError) as exc:
        # Inconsistent pixel-module attributes (e.g. a LUT that does not fit the data).
        raise PixelDecodeError(f"cannot render the frame: {exc}") from exc
    data = _encode_image(image8, options)
    if cache is not None:
        cache.put(key, data)
    return RenderedFrame(data=data, media_type=options.media_type, etag=key)


# ---------------------------------------------------------------------------------------
# On-disk cache of rendered frames


class FrameCache:
    """Rendered images on disk, bounded in total size; least recently used evicted first.

    Files are written to a temporary name and renamed into place, so a reader sees a whole
    image or none. A hit refreshes the file's modification time, which is what eviction
    sorts by. The running size is tracked in process and corrected by the directory scan
    each eviction does, so several processes sharing the directory stay roughly bounded.
    """

    def __init__(self, root: Path, *, max_bytes: int = FRAME_CACHE_MAX_BYTES) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._size: int | None = None
        self._lock = threading.Lock()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str) -> bytes | None:
        """The cached bytes for ``key``, or None."""
        path = self._path(key)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        with contextlib.suppress(OSError):
            os.utime(path)
        return data

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` (atomically), then evict if over the bound.

        A cache that cannot be written is logged and ignored: rendering does not need it.
        """
        path = self._path(key)
        tmp: str | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, path)
            tmp = None
        except OSError as exc:
            log.warning("frame cache %s not written: %s", self.root, exc)
            return
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        with self._lock:
            if self._size is None:
                self._size = self._scan_size()
            else:
                self._size += len(data)
            if self._size > self.max_bytes:
                self._size = self._evict()

    def _entries(self) -> list[tuple[float, int, Path]]:
        entries = []
        for path in self.root.glob("*/*"):
            if path.name.startswith(".tmp-"):
                continue
            with contextlib.suppress(OSError):
                stat = path.stat()
                entries.append((stat.st_mtime, stat.st_size, path))
        return entries

    def _scan_size(self) -> int:
        return sum(size for _, size, _ in self._entries())

    def _evict(self) -> int:
        # Down to 90 % of the bound, so that the next writes do not each trigger a scan.
        entries = sorted(self._entries())
        total = sum(size for _, size, _ in entries)
        target = int(self.max_bytes * 0.9)
        for _, size, path in entries:
            if total <= target:
                break
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            total -= size
        return total

    def size(self) -> int:
        """Bytes currently cached (scans the directory)."""
        return self._scan_size()


_frame_caches: dict[Path, FrameCache] = {}
_frame_caches_lock = threading.Lock()


def frame_cache(settings: Settings) -> FrameCache:
    """The rendered-frame cache of this deployment (``<data_dir>/cache/frames``)."""
    root = (settings.data_dir / "cache" / "frames").resolve()
    with _frame_caches_lock:
        cache = _frame_caches.get(root)
        if cache is None:
            cache = _frame_caches[root] = FrameCache(root)
        return cache
