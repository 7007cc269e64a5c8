"""multipart/related (RFC 2387) for DICOMweb: streamed responses, streamed request parsing,
and the Accept header.

Responses are generators of byte chunks, so a study is sent object by object and never
held in memory. Requests are parsed with python-multipart's streaming parser, each part
written straight to a temporary file.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from rdc_core.errors import InvalidInputError

__all__ = [
    "MediaRange",
    "ReceivedPart",
    "UnsupportedMediaType",
    "multipart_body",
    "multipart_media_type",
    "new_boundary",
    "parse_accept",
    "receive_parts",
]

_CRLF: Final = b"\r\n"


@dataclass(frozen=True, slots=True)
class MediaRange:
    """One entry of an Accept header: ``media_type`` lower-case, parameters unquoted."""

    media_type: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    @property
    def part_type(self) -> str | None:
        """The ``type`` parameter of a multipart/related range, lower-case."""
        value = self.params.get("type")
        return value.lower() if value else None

    @property
    def transfer_syntax(self) -> str | None:
        return self.params.get("transfer-syntax")


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    # Media type parameters may be quoted strings; a separator inside quotes is not one.
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_accept(header: str | None) -> list[MediaRange]:
    """The Accept header's media ranges, most preferred first (``*/*`` when absent)."""
    if not header or not header.strip():
        return [MediaRange("*/*")]
    ranges: list[MediaRange] = []
    for entry in _split_outside_quotes(header, ","):
        media, raw_params = parse_options_header(entry)
        params = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw_params.items()}
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            q = 1.0
        if q > 0:
            ranges.append(MediaRange(media.decode("latin-1").lower(), params, q))
    # sorted() is stable: equal weights keep the client's order.
    return sorted(ranges, key=lambda r: -r.q)


def new_boundary() -> str:
    """A boundary that cannot occur in the parts by chance."""
    return f"rdc-{secrets.token_hex(16)}"


def multipart_media_type(part_type: str, boundary: str, transfer_syntax: str | None = None) -> str:
    """The Content-Type of a multipart/related response whose parts are ``part_type``."""
    value = f'multipart/related; type="{part_type}"; boundary={boundary}'
    if transfer_syntax:
        value += f"; transfer-syntax={transfer_syntax}"
    return value


def multipart_body(parts: Iterable[tuple[str, Iterable[bytes]]], boundary: str) -> Iterator[bytes]:
    """The chunks of a multipart/related body of ``(content type, chunks)`` parts."""
    delimiter = f"--{boundary}".encode("ascii")
    for content_type, chunks in parts:
        yield delimiter + _CRLF + f"Content-Type: {content_type}".encode("latin-1") + _CRLF * 2
        yield from chunks
        yield _CRLF
    yield delimiter + b"--" + _CRLF


@dataclass(slots=True)
class ReceivedPart:
    """One part of a request, spooled to ``path``; ``content_type`` lower-case, no params."""

    path: Path
    content_type: str
    size: int = 0


class _Spooler:
    """python-multipart callbacks that write each part to its own file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.parts: list[ReceivedPart] = []
        self.ended = False
        self._file: IO[bytes] | None = None
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[str, str] = {}

    def on_part_begin(self) -> None:
        self._headers = {}

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        self._headers[name] = self._value.decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def on_headers_finished(self) -> None:
        media, _ = parse_options_header(self._headers.get("content-type", "application/dicom"))
        path = self.directory / f"part-{len(self.parts) + 1:05d}.dcm"
        self.parts.append(ReceivedPart(path, media.decode("latin-1").lower()))
        self._file = open(path, "wb")  # noqa: SIM115 (closed in on_part_end / close)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        assert self._file is not None
        self._file.write(data[start:end])
        self.parts[-1].size += end - start

    def on_part_end(self) -> None:
        self.close()

    def on_end(self) -> None:
        self.ended = True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


async def receive_parts(
    *, content_type: str, body: AsyncIterator[bytes], directory: Path
) -> list[ReceivedPart]:
    """Spool a ``multipart/related`` (or single ``application/dicom``) request body into
    ``directory``, one file per part, without holding it in memory.

    Raises InvalidInputError for a body that is not well-formed multipart and
    :class:`UnsupportedMediaType` for other media types.
    """
    media_bytes, params = parse_options_header(content_type)
    media = media_bytes.decode("latin-1").lower()
    if media == "application/dicom":
        path = directory / "part-00001.dcm"
        part = ReceivedPart(path, media)
        with open(path, "wb") as out:
            async for chunk in body:
                await run_in_threadpool(out.write, chunk)
                part.size += len(chunk)
        return [part]
    if media != "multipart/related":
        raise UnsupportedMediaType(f"cannot store {media or 'a body without Content-Type'}")
    part_type = params.get(b"type", b"application/dicom").decode("latin-1").lower()
    if part_type != "application/dicom":
        raise UnsupportedMediaType(f"cannot store parts of type {part_type}")
    boundary = params.get(b"boundary")
    if not boundary:
        raise InvalidInputError("the multipart Content-Type has no boundary")
    spooler = _Spooler(directory)
    try:
        parser = _parser(boundary, spooler)
    except FormParserError as exc:  # e.g. a boundary longer than the parser takes
        raise InvalidInputError(f"unusable multipart boundary: {exc}") from exc
    try:
        async for chunk in body:
            # File writes happen in the callbacks: keep them off the event loop.
            await run_in_threadpool(parser.write, chunk)
        parser.finalize()
    except FormParserError as exc:
        raise InvalidInputError(f"malformed multipart body: {exc}") from exc
    finally:
        spooler.close()
    if not spooler.ended:
        raise InvalidInputError("the multipart body ends before its closing boundary")
    return spooler.parts


def _parser(boundary: bytes, spooler: _Spooler) -> MultipartParser:
    return MultipartParser(
        boundary,
        {
            "on_part_begin": spooler.on_part_begin,
            "on_header_field": spooler.on_header_field,
            "on_header_value": spooler.on_header_value,
            "on_header_end": spooler.on_header_end,
            "on_headers_finished": spooler.on_headers_finished,
            "on_part_data": spooler.on_part_data,
            "on_part_end": spooler.on_part_end,
            "on_end": spooler.on_end,
        },
    )


class UnsupportedMediaType(HTTPException):
    """The request body is not a media type this resource accepts (HTTP 415)."""

    def __init__(self, detail: str) -> None:
        super().__init__(status_code=415, detail=detail)
