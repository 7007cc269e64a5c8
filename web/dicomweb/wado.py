"""WADO-RS (PS3.18 10.4): stored objects, metadata, frames, rendered images and bulk data.

Every request first resolves the addressed study/series/instance on the index, scoped to
what the caller may see (another clinic's study is "not found"), and records the access in
the audit trail; only then are objects read from the store.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import pydicom
from fastapi import HTTPException
from pydicom.dataset import Dataset
from sqlalchemy import select

from dicom_gateway.models import Instance
from dicom_gateway.pixels import (
    FrameNotFoundError,
    RenderOptions,
    TranscodeError,
    Window,
    can_transcode,
    encoded_frame,
    frame_transcodable,
    is_compressed,
    number_of_frames,
    open_instance,
    raw_frame,
    read_instance_header,
    transcode_instance_chunks,
    transcoded_frame,
)
from rdc_core.db import read_session, session_scope
from rdc_core.errors import InvalidInputError, NotFoundError
from rdc_core.storage import ObjectStore
from web.dicomweb.dicomjson import BULK_THRESHOLD, bulk_value, dataset_json, element, tag_key
from web.dicomweb.multipart import MediaRange
from worklist.access import Principal
from worklist.audit import record_access
from worklist.models import Exam

__all__ = [
    "InstanceRef",
    "bulk_data",
    "dicom_transfer_syntaxes",
    "frame_parts",
    "instance_metadata",
    "instance_parts",
    "instance_url",
    "metadata_chunks",
    "object_chunks",
    "parse_frame_numbers",
    "pixel_data_parts",
    "render_options",
    "resolve",
]

_CHUNK: Final = 1 << 20
_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2.1"
_OCTET_STREAM: Final = "application/octet-stream"
_DICOM: Final = "application/dicom"
_MAX_FRAMES_PER_REQUEST: Final = 10_000
Action = Literal["view", "download"]


@dataclass(frozen=True, slots=True)
class InstanceRef:
    """A stored instance the caller may see."""

    exam_id: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    storage_key: str
    transfer_syntax_uid: str
    coerced: dict[str, str] | None


def resolve(
    *,
    principal: Principal,
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    action: Action,
    resource: str,
    detail: dict[str, Any] | None = None,
) -> list[InstanceRef]:
    """The instances addressed by the URL that ``principal`` may see, in series/instance
    order, after recording the access. Raises NotFoundError when there are none: another
    clinic's study is not found, never forbidden."""
    stmt = (
        select(Instance, Exam.study_instance_uid)
        .join(Exam, Exam.id == Instance.exam_id)
        .where(Exam.study_instance_uid == study_uid)
    )
    if principal.is_clinic_user:
        stmt = stmt.where(Exam.org_id == principal.org_id)
    if series_uid is not None:
        stmt = stmt.where(Instance.series_instance_uid == series_uid)
    if sop_uid is not None:
        stmt = stmt.where(Instance.sop_instance_uid == sop_uid)
    stmt = stmt.order_by(
        Instance.series_number,
        Instance.series_instance_uid,
        Instance.instance_number,
        Instance.sop_instance_uid,
    )
    with read_session() as session:
        refs = [
            InstanceRef(
                exam_id=instance.exam_id,
                study_instance_uid=study or study_uid,
                series_instance_uid=instance.series_instance_uid,
                sop_instance_uid=instance.sop_instance_uid,
                sop_class_uid=instance.sop_class_uid,
                storage_key=instance.storage_key,
                transfer_syntax_uid=instance.transfer_syntax_uid,
                coerced=instance.coerced,
            )
            for instance, study in session.execute(stmt).all()
        ]
    if not refs:
        what = (
            f"instance {sop_uid}"
            if sop_uid
            else f"series {series_uid}"
            if series_uid
            else f"study {study_uid}"
        )
        raise NotFoundError(f"no {what}")
    with session_scope() as session:
        record_access(
            session,
            principal,
            action=action,
            object_type="exam",
            object_id=refs[0].exam_id,
            detail={
                "via": "dicomweb",
                "resource": resource,
                "study": study_uid,
                **({"series": series_uid} if series_uid else {}),
                **({"sop_instance": sop_uid} if sop_uid else {}),
                "instances": len(refs),
                **(detail or {}),
            },
        )
    return refs


def instance_url(base_url: str, ref: InstanceRef) -> str:
    """The WADO-RS URL of the instance."""
    return (
        f"{base_url}/studies/{ref.study_instance_uid}/series/{ref.series_instance_uid}"
        f"/instances/{ref.sop_instance_uid}"
    )


# ---------------------------------------------------------------------------------------
# Objects and metadata


def object_chunks(store: ObjectStore, ref: InstanceRef) -> Iterator[bytes]:
    """The stored Part-10 object, in chunks (opened only when the first chunk is wanted)."""
    with store.open(ref.storage_key) as stream:
        while chunk := stream.read(_CHUNK):
            yield chunk


def instance_metadata(store: ObjectStore, ref: InstanceRef, base_url: str) -> dict[str, Any]:
    """The stored data set in the DICOM JSON model, bulk data as URIs to this service."""
    url = instance_url(base_url, ref)
    with open_instance(store, ref.storage_key) as stream:
        # Values longer than the bulk threshold are left unread; the stream stays open
        # while converting, for deferred text values that do need reading.
        ds = pydicom.dcmread(stream, defer_size=BULK_THRESHOLD)
        out = dataset_json(ds, bulk_uri=lambda path: f"{url}/bulkdata/{path}")
    # Objects indexed under a made-up UID (it was missing) still say where they belong,
    # so that viewers can group them; present values are never changed.
    for tag, value in (
        (0x0020000D, ref.study_instance_uid),
        (0x0020000E, ref.series_instance_uid),
    ):
        out.setdefault(tag_key(tag), element(tag, value).to_json_dict(None, 0))
    return dict(sorted(out.items()))


def metadata_chunks(
    store: ObjectStore, refs: Sequence[InstanceRef], base_url: str
) -> Iterator[bytes]:
    """A JSON array of the instances' metadata, produced one instance at a time."""
    yield b"["
    for index, ref in enumerate(refs):
        if index:
            yield b","
        yield json.dumps(instance_metadata(store, ref, base_url), ensure_ascii=False).encode()
    yield b"]"


def bulk_data(store: ObjectStore, ref: InstanceRef, path: str) -> bytes:
    """The value of the binary element at ``path`` (as in the metadata's BulkDataURI)."""
    with open_instance(store, ref.storage_key) as stream:
        try:
            return bulk_value(stream, path)
        except (NotFoundError, InvalidInputError):
            raise
        except Exception as exc:  # a stored object pydicom cannot read to that element
            raise NotFoundError(f"bulk data {path} cannot be read: {exc}") from exc


# ---------------------------------------------------------------------------------------
# Frames


def parse_frame_numbers(text: str) -> list[int]:
    """``1`` or ``1,3,5`` (PS3.18 frame list); raises InvalidInputError."""
    try:
        numbers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise InvalidInputError(f"frame list {text!r} must be comma-separated numbers") from exc
    if not numbers or any(n < 1 for n in numbers):
        raise InvalidInputError("frame numbers start at 1")
    if len(numbers) > _MAX_FRAMES_PER_REQUEST:
        raise InvalidInputError(f"at most {_MAX_FRAMES_PER_REQUEST} frames per request")
    if len(set(numbers)) != len(numbers):
        # PS3.18 frame-list: "one or more non-duplicate frame numbers". Repeats would
        # let a short URL ask for the same large frame thousands of times.
        raise InvalidInputError("each frame may be asked for once")
    return numbers


# Frames as images (PS3.18 Table 8.7.3-5): the media type and the stored syntaxes whose
# frames are that kind of image, sent as stored.
_FRAME_IMAGE_TYPES: Final[dict[str, frozenset[str]]] = {
    "image/jpeg": frozenset(
        {
            "1.2.840.10008.1.2.4.50",
            "1.2.840.10008.1.2.4.51",
            "1.2.840.10008.1.2.4.57",
            "1.2.840.10008.1.2.4.70",
        }
    ),
    "image/jls": frozenset({"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}),
    "image/jp2": frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}),
}


# Frames as images in a syntax they are not stored in: encoded one frame at a time.
_FRAME_TRANSCODE_TARGETS: Final[dict[str, str]] = {
    "image/jp2": "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless, from any pixel data
    "image/jpeg": "1.2.840.10008.1.2.4.50",  # JPEG baseline (lossy), from 8-bit data
}


def _frame_content_type_for(
    accept: Sequence[MediaRange], ref: InstanceRef, header: Dataset | None = None
) -> str:
    """The part content type of the frames, from the Accept header (PS3.18 8.7.3.5).

    Uncompressed little endian is the default and always offered.
    ``application/octet-stream; transfer-syntax=*`` (what OHIF asks for) or the stored
    syntax gets compressed frames as stored, so the viewer decodes them itself;
    ``image/jpeg``, ``image/jls`` and ``image/jp2`` get them as stored when they are of that
    kind; otherwise ``image/jp2`` gets them encoded in JPEG 2000 lossless and ``image/jpeg``
    (8-bit data) in JPEG baseline, one frame at a time (with ``header``, the object's).
    Anything else is 406.
    """
    stored = ref.transfer_syntax_uid
    compressed = is_compressed(stored)
    raw = f"{_OCTET_STREAM}; transfer-syntax={_LITTLE_ENDIAN}"
    for media in accept:
        if media.media_type in ("*/*", "multipart/*"):
            return raw
        if media.media_type != "multipart/related":
            continue
        part = media.part_type or _OCTET_STREAM
        ts = media.transfer_syntax
        if part in _FRAME_IMAGE_TYPES:
            if stored in _FRAME_IMAGE_TYPES[part] and ts in (None, "*", stored):
                return f"{part}; transfer-syntax={stored}"
            target = _FRAME_TRANSCODE_TARGETS.get(part)
            if (
                target is not None
                and ts in (None, target)
                and header is not None
                and frame_transcodable(header, target)
            ):
                return f"{part}; transfer-syntax={target}"
            continue
        if part not in (_OCTET_STREAM, "*/*", "application/*"):
            continue
        if ts in (None, _LITTLE_ENDIAN):
            return raw
        if ts == "*" or ts == stored:
            return f"{_OCTET_STREAM}; transfer-syntax={stored}" if compressed else raw
    kinds = [kind for kind, syntaxes in _FRAME_IMAGE_TYPES.items() if stored in syntaxes]
    also = f" or {kinds[0]}" if kinds else ""
    raise HTTPException(
        status_code=406,
        detail='frames are available as multipart/related; type="application/octet-stream" '
        f"in transfer syntax {_LITTLE_ENDIAN} or as stored ({stored}){also}",
    )


def _frame_bytes(store: ObjectStore, ref: InstanceRef, number: int, content_type: str) -> bytes:
    if content_type.endswith(_LITTLE_ENDIAN):
        return raw_frame(store=store, storage_key=ref.storage_key, frame=number).data
    syntax = content_type.rsplit("transfer-syntax=", 1)[-1]
    if syntax != ref.transfer_syntax_uid:  # encoded here, frame by frame
        key = ref.storage_key
        return transcoded_frame(
            store=store, storage_key=key, frame=number, transfer_syntax=syntax
        ).data
    encoded = encoded_frame(store=store, storage_key=ref.storage_key, frame=number)
    assert encoded is not None  # the stored syntax is compressed (see _frame_content_type_for)
    return encoded.data


def frame_parts(
    *, store: ObjectStore, ref: InstanceRef, numbers: Sequence[int], accept: Sequence[MediaRange]
) -> tuple[str, Iterator[bytes]]:
    """The part content type of the requested frames and their bytes, one frame at a time.

    Every frame number is checked against the object's Number of Frames, and the first frame
    is decoded, before this returns, so that a bad frame number or undecodable pixel data is
    a proper error, not a broken stream; the other frames are decoded while the response is
    sent, so a request for many frames never holds them all in memory.
    """
    header = read_instance_header(store, ref.storage_key)
    content_type = _frame_content_type_for(accept, ref, header)
    count = number_of_frames(header)
    missing = [n for n in numbers if n > count]
    if missing:
        raise FrameNotFoundError(f"frame {missing[0]} does not exist; the object has {count}")
    first = _frame_bytes(store, ref, numbers[0], content_type)

    def frames() -> Iterator[bytes]:
        yield first
        for number in numbers[1:]:
            yield _frame_bytes(store, ref, number, content_type)

    return content_type, frames()


# ---------------------------------------------------------------------------------------
# Rendered


def _numbers(name: str, text: str, count: tuple[int, ...]) -> list[str]:
    values = [v.strip() for v in text.split(",")]
    if len(values) not in count:
        raise InvalidInputError(f"{name} needs {' or '.join(map(str, count))} values")
    return values


def render_options(
    *,
    frame: int,
    accept: Sequence[MediaRange],
    window: str | None,
    viewport: str | None,
    quality: int | None,
) -> RenderOptions:
    """RenderOptions from the PS3.18 8.3.5 query parameters and the Accept header.

    ``window=center,width[,linear|linear-exact|sigmoid]``; ``viewport=vw,vh`` (the image
    is scaled to fit, keeping its aspect); ``quality`` 1-100 for JPEG. Raises
    InvalidInputError, or 406 when neither PNG nor JPEG is acceptable.
    """
    media_type: Literal["image/png", "image/jpeg"] | None = None
    for media in accept:
        if media.media_type in ("image/png", "image/*", "*/*"):
            media_type = "image/png"
        elif media.media_type in ("image/jpeg", "image/jpg"):
            media_type = "image/jpeg"
        if media_type:
            break
    if media_type is None:
        raise HTTPException(status_code=406, detail="rendered images are image/png or image/jpeg")
    parsed_window: Window | None = None
    if window:
        values = _numbers("window", window, (2, 3))
        function = (values[2] if len(values) == 3 else "linear").upper().replace("-", "_")
        try:
            parsed_window = Window(float(values[0]), float(values[1]), function)
        except ValueError as exc:
            raise InvalidInputError("window center and width must be numbers") from exc
    size: tuple[int, int] | None = None
    if viewport:
        values = _numbers("viewport", viewport, (2,))
        try:
            size = (int(values[0]), int(values[1]))
        except ValueError as exc:
            raise InvalidInputError("viewport width and height must be integers") from exc
    return RenderOptions(
        frame=frame,
        window=parsed_window,
        viewport=size,
        media_type=media_type,
        quality=quality if quality is not None else 90,
    )


def dicom_transfer_syntaxes(accept: Sequence[MediaRange], refs: Sequence[InstanceRef]) -> list[str]:
    """The transfer syntax each instance is sent in, from the Accept header (PS3.18 8.7.3.5).

    ``transfer-syntax=*`` or the stored syntax: as stored. No transfer syntax (or ``*/*``):
    Explicit VR Little Endian, the DICOMweb default, transcoded when stored otherwise.
    Another syntax: transcoded when that is possible (JPEG 2000 lossless). Raises 406 when
    no acceptable syntax works for some instance, before anything is sent.
    """
    ranges: list[str | None] = []
    for media in accept:
        if media.media_type in ("*/*", "multipart/*"):
            ranges.append(None)
        elif media.media_type == "multipart/related" and (media.part_type or _DICOM) in (
            _DICOM,
            "application/*",
            "*/*",
        ):
            ranges.append(media.transfer_syntax)
    if not ranges:
        raise HTTPException(
            status_code=406,
            detail='instances are available as multipart/related; type="application/dicom"',
        )
    chosen = []
    for ref in refs:
        stored = ref.transfer_syntax_uid
        for ts in ranges:
            wanted = stored if ts == "*" else (ts or _LITTLE_ENDIAN)
            if wanted == stored or can_transcode(stored, wanted):
                chosen.append(wanted)
                break
        else:
            asked = ", ".join(ts or _LITTLE_ENDIAN for ts in ranges)
            raise HTTPException(
                status_code=406,
                detail=f"instance {ref.sop_instance_uid} is stored as {stored} and cannot be "
                f"sent as {asked}; ask for transfer-syntax=* to get it as stored",
            )
    return chosen


def instance_parts(
    *, store: ObjectStore, refs: Sequence[InstanceRef], transfer_syntaxes: Sequence[str]
) -> Iterator[tuple[str, Iterator[bytes]]]:
    """The multipart parts of a retrieve: each object as stored or transcoded. The first
    object's transcoding starts before this returns (a single-frame object whole, a
    multi-frame one up to its header and first frame), so that its failure is a 406, not a
    broken stream; the rest while the response is sent, a multi-frame object one frame at a
    time."""
    pairs = list(zip(refs, transfer_syntaxes, strict=True))

    def body(ref: InstanceRef, ts: str) -> Iterator[bytes]:
        if ts == ref.transfer_syntax_uid:
            return object_chunks(store, ref)
        try:
            # Multi-frame objects frame by frame, as the response is sent.
            return transcode_instance_chunks(
                store=store, storage_key=ref.storage_key, transfer_syntax=ts
            )
        except TranscodeError as exc:
            raise HTTPException(status_code=406, detail=str(exc)) from exc

    first = body(*pairs[0]) if pairs else iter(())

    def parts() -> Iterator[tuple[str, Iterator[bytes]]]:
        for index, (ref, ts) in enumerate(pairs):
            chunks = first if index == 0 else body(ref, ts)
            yield f"{_DICOM}; transfer-syntax={ts}", chunks

    return parts()


def pixel_data_parts(
    *, store: ObjectStore, ref: InstanceRef, accept: Sequence[MediaRange]
) -> Iterator[tuple[str, Iterator[bytes]]]:
    """Every frame of the instance as multipart parts, decoded one at a time while the
    response is sent (what the Pixel Data BulkDataURI of the metadata points to)."""
    header = read_instance_header(store, ref.storage_key)
    count = number_of_frames(header)
    content_type = _frame_content_type_for(accept, ref, header)

    def one(number: int) -> Iterator[bytes]:
        yield _frame_bytes(store, ref, number, content_type)

    for number in range(1, count + 1):
        yield content_type, one(number)
