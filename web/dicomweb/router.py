"""DICOMweb routes under ``/dicomweb``: QIDO-RS, WADO-RS and STOW-RS (PS3.18).

Bearer-token authorised like the rest of the API. A clinic user sees only its own
organisation's studies (another clinic's study is 404); lead-hospital staff see all.
Handlers translate HTTP to the service calls in qido, wado and stow and back.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Annotated, Any, Final
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from dicom_gateway.pixels import frame_cache, render_frame
from rdc_core.settings import Settings, get_settings
from rdc_core.storage import ObjectStore, get_object_store
from web.dicomweb import qido, stow, wado
from web.dicomweb.multipart import (
    multipart_body,
    multipart_media_type,
    new_boundary,
    parse_accept,
)
from web.security import CurrentPrincipal

__all__ = ["router"]

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])

DICOM_JSON: Final = "application/dicom+json"
# Rendered images of a stored object never change (storage keys are content-addressed);
# "private" keeps shared caches from holding patient images.
_RENDERED_CACHE_CONTROL: Final = "private, max-age=86400"
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such object, or it belongs to another clinic"}
}

_stores: dict[int, tuple[Settings, ObjectStore]] = {}
_stores_lock = threading.Lock()


def object_store(settings: Annotated[Settings, Depends(get_settings)]) -> ObjectStore:
    """The configured object store, built once per settings object (an S3 store keeps its
    connection pool and bucket check)."""
    with _stores_lock:
        entry = _stores.get(id(settings))
        if entry is None or entry[0] is not settings:
            entry = _stores[id(settings)] = (settings, get_object_store(settings))
        return entry[1]


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[ObjectStore, Depends(object_store)]


def _header_text(text: str) -> str:
    """``text`` for a quoted-string header value: printable ASCII as is, except the quote and
    the backslash; anything else percent-encoded as UTF-8."""
    return quote(text, safe=" !#$&'()*+,-./:;<=>?@[]^_`{|}~")


def _base_url(request: Request) -> str:
    """The DICOMweb root that links in responses start with: ``RDC_PUBLIC_URL`` when set,
    else a path relative to this server (``/dicomweb``, after any ASGI root path). Never
    the Host header: clients leave the port out of it (dicomweb-client sends
    ``Host: 127.0.0.1``), and a link built from it could not be fetched."""
    public = get_settings().public_url
    if public:
        return f"{public.rstrip('/')}{router.prefix}"
    return f"{request.scope.get('root_path', '').rstrip('/')}{router.prefix}"


# ---------------------------------------------------------------------------------------
# QIDO-RS


def _search(
    request: Request,
    principal: CurrentPrincipal,
    store: ObjectStore,
    level: qido.Level,
    study: str | None = None,
    series: str | None = None,
) -> JSONResponse:
    query = qido.parse_qido_query(
        list(request.query_params.multi_items()), level=level, study_uid=study, series_uid=series
    )
    result = qido.search(principal=principal, query=query, store=store, base_url=_base_url(request))
    warnings = []
    if result.truncated:
        warnings.append('299 RDC "There are additional results that can be requested"')
    if result.unsupported:
        # The names come from the query string: only printable ASCII goes into the header
        # (a CR/LF would split it, a Chinese name is not Latin-1 and failed the response).
        names = ", ".join(_header_text(name) for name in result.unsupported)
        warnings.append(f'299 RDC "The following query parameters are not supported: {names}"')
    headers = {"Warning": ", ".join(warnings)} if warnings else None
    return JSONResponse(result.items, media_type=DICOM_JSON, headers=headers)


@router.get("/studies", summary="QIDO-RS: search for studies")
def search_studies(request: Request, principal: CurrentPrincipal, store: StoreDep) -> JSONResponse:
    """Studies matching the query (PatientName with wildcards, StudyDate ranges, ...)."""
    return _search(request, principal, store, "study")


@router.get("/series", summary="QIDO-RS: search for series in all studies")
def search_all_series(
    request: Request, principal: CurrentPrincipal, store: StoreDep
) -> JSONResponse:
    """Series matching the query, with their studies' attributes."""
    return _search(request, principal, store, "series")


@router.get("/instances", summary="QIDO-RS: search for instances in all studies")
def search_all_instances(
    request: Request, principal: CurrentPrincipal, store: StoreDep
) -> JSONResponse:
    """Instances matching the query, with their series' and studies' attributes."""
    return _search(request, principal, store, "instance")


@router.get("/studies/{study}/series", summary="QIDO-RS: search for series of a study")
def search_series(
    study: str, request: Request, principal: CurrentPrincipal, store: StoreDep
) -> JSONResponse:
    """Series of the study matching the query."""
    return _search(request, principal, store, "series", study)


@router.get("/studies/{study}/instances", summary="QIDO-RS: search for instances of a study")
def search_study_instances(
    study: str, request: Request, principal: CurrentPrincipal, store: StoreDep
) -> JSONResponse:
    """Instances of the study matching the query."""
    return _search(request, principal, store, "instance", study)


@router.get(
    "/studies/{study}/series/{series}/instances",
    summary="QIDO-RS: search for instances of a series",
)
def search_series_instances(
    study: str, series: str, request: Request, principal: CurrentPrincipal, store: StoreDep
) -> JSONResponse:
    """Instances of the series matching the query."""
    return _search(request, principal, store, "instance", study, series)


# ---------------------------------------------------------------------------------------
# WADO-RS: objects and metadata


def _retrieve(
    request: Request,
    principal: CurrentPrincipal,
    store: ObjectStore,
    study: str,
    series: str | None = None,
    sop: str | None = None,
) -> StreamingResponse:
    accept = parse_accept(request.headers.get("accept"))
    refs = wado.resolve(
        principal=principal,
        study_uid=study,
        series_uid=series,
        sop_uid=sop,
        action="download",
        resource="instances",
    )
    syntaxes = wado.dicom_transfer_syntaxes(accept, refs)
    parts = wado.instance_parts(store=store, refs=refs, transfer_syntaxes=syntaxes)
    boundary = new_boundary()
    return StreamingResponse(
        multipart_body(parts, boundary),
        media_type=multipart_media_type("application/dicom", boundary),
    )


@router.get("/studies/{study}", summary="WADO-RS: retrieve a study", responses=_NOT_FOUND)
def retrieve_study(
    study: str, request: Request, principal: CurrentPrincipal, store: StoreDep
) -> StreamingResponse:
    """Every stored object of the study, as multipart/related application/dicom."""
    return _retrieve(request, principal, store, study)


@router.get(
    "/studies/{study}/series/{series}", summary="WADO-RS: retrieve a series", responses=_NOT_FOUND
)
def retrieve_series(
    study: str, series: str, request: Request, principal: CurrentPrincipal, store: StoreDep
) -> StreamingResponse:
    """Every stored object of the series."""
    return _retrieve(request, principal, store, study, series)


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}",
    summary="WADO-RS: retrieve an instance",
    responses=_NOT_FOUND,
)
def retrieve_instance(
    study: str,
    series: str,
    sop: str,
    request: Request,
    principal: CurrentPrincipal,
    store: StoreDep,
) -> StreamingResponse:
    """The stored object, as a one-part multipart/related application/dicom."""
    return _retrieve(request, principal, store, study, series, sop)


def _metadata(
    request: Request,
    principal: CurrentPrincipal,
    store: ObjectStore,
    study: str,
    series: str | None = None,
    sop: str | None = None,
) -> Response:
    refs = wado.resolve(
        principal=principal,
        study_uid=study,
        series_uid=series,
        sop_uid=sop,
        action="view",
        resource="metadata",
    )
    base = _base_url(request)
    if len(refs) == 1:
        # One object: build it before answering, so a failure is a proper error.
        return JSONResponse([wado.instance_metadata(store, refs[0], base)], media_type=DICOM_JSON)
    return StreamingResponse(wado.metadata_chunks(store, refs, base), media_type=DICOM_JSON)


@router.get("/studies/{study}/metadata", summary="WADO-RS: study metadata", responses=_NOT_FOUND)
def study_metadata(
    study: str, request: Request, principal: CurrentPrincipal, store: StoreDep
) -> Response:
    """The data sets of the study's objects in DICOM JSON, bulk data as BulkDataURIs."""
    return _metadata(request, principal, store, study)


@router.get(
    "/studies/{study}/series/{series}/metadata",
    summary="WADO-RS: series metadata",
    responses=_NOT_FOUND,
)
def series_metadata(
    study: str, series: str, request: Request, principal: CurrentPrincipal, store: StoreDep
) -> Response:
    """The data sets of the series' objects in DICOM JSON."""
    return _metadata(request, principal, store, study, series)


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/metadata",
    summary="WADO-RS: instance metadata",
    responses=_NOT_FOUND,
)
def instance_metadata(
    study: str,
    series: str,
    sop: str,
    request: Request,
    principal: CurrentPrincipal,
    store: StoreDep,
) -> Response:
    """The instance's data set in DICOM JSON (an array of one)."""
    return _metadata(request, principal, store, study, series, sop)


# ---------------------------------------------------------------------------------------
# WADO-RS: frames, bulk data, rendered


def _multipart_frames(content_type: str, frames: Iterator[bytes]) -> StreamingResponse:
    # One part per frame, streamed: a request for many frames is never held in memory.
    boundary = new_boundary()
    transfer_syntax = content_type.rpartition("=")[2]
    return StreamingResponse(
        multipart_body(((content_type, [data]) for data in frames), boundary),
        media_type=multipart_media_type("application/octet-stream", boundary, transfer_syntax),
    )


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/frames/{frames}",
    summary="WADO-RS: frames",
    responses=_NOT_FOUND,
)
def frames(
    study: str,
    series: str,
    sop: str,
    frames: str,
    request: Request,
    principal: CurrentPrincipal,
    store: StoreDep,
) -> Response:
    """Frames ``n`` or ``n,m,...`` (from 1, each at most once) as multipart/related
    application/octet-stream: uncompressed little endian by default, as stored with
    ``transfer-syntax=*``."""
    numbers = wado.parse_frame_numbers(frames)
    (ref,) = wado.resolve(
        principal=principal,
        study_uid=study,
        series_uid=series,
        sop_uid=sop,
        action="view",
        resource="frames",
        detail={"frames": numbers},
    )
    accept = parse_accept(request.headers.get("accept"))
    content_type, data = wado.frame_parts(store=store, ref=ref, numbers=numbers, accept=accept)
    return _multipart_frames(content_type, data)


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/bulkdata/{path:path}",
    summary="WADO-RS: bulk data",
    responses=_NOT_FOUND,
)
def bulkdata(
    study: str,
    series: str,
    sop: str,
    path: str,
    request: Request,
    principal: CurrentPrincipal,
    store: StoreDep,
) -> Response:
    """A BulkDataURI of the metadata: the element's value as application/octet-stream
    (Pixel Data: every frame, one part each)."""
    (ref,) = wado.resolve(
        principal=principal,
        study_uid=study,
        series_uid=series,
        sop_uid=sop,
        action="download",
        resource="bulkdata",
        detail={"path": path},
    )
    accept = parse_accept(request.headers.get("accept"))
    boundary = new_boundary()
    if path.strip("/").upper() == "7FE00010":
        parts: Iterator[tuple[str, Iterator[bytes]]] = wado.pixel_data_parts(
            store=store, ref=ref, accept=accept
        )
        return StreamingResponse(
            multipart_body(parts, boundary),
            media_type=multipart_media_type("application/octet-stream", boundary),
        )
    data = wado.bulk_data(store, ref, path)
    body = b"".join(multipart_body([("application/octet-stream", [data])], boundary))
    return Response(body, media_type=multipart_media_type("application/octet-stream", boundary))


def _rendered(
    request: Request,
    principal: CurrentPrincipal,
    store: ObjectStore,
    settings: Settings,
    location: tuple[str, str, str],
    frame: int,
    window: str | None,
    viewport: str | None,
    quality: int | None,
) -> Response:
    options = wado.render_options(
        frame=frame,
        accept=parse_accept(request.headers.get("accept")),
        window=window,
        viewport=viewport,
        quality=quality,
    )
    study, series, sop = location
    (ref,) = wado.resolve(
        principal=principal,
        study_uid=study,
        series_uid=series,
        sop_uid=sop,
        action="view",
        resource="rendered",
        detail={"frame": frame},
    )
    etag = f'"{options.cache_key(ref.storage_key)}"'
    headers = {"ETag": etag, "Cache-Control": _RENDERED_CACHE_CONTROL, "Vary": "Accept"}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    image = render_frame(
        store=store, storage_key=ref.storage_key, options=options, cache=frame_cache(settings)
    )
    return Response(image.data, media_type=image.media_type, headers=headers)


_WINDOW = Query(description="center,width[,linear|linear-exact|sigmoid] in modality units")
_VIEWPORT = Query(description="vw,vh: scale to fit within, keeping the aspect ratio")
_QUALITY = Query(ge=1, le=100, description="JPEG quality")


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/rendered",
    summary="WADO-RS: rendered instance (first frame)",
    responses=_NOT_FOUND,
)
def rendered_instance(
    study: str,
    series: str,
    sop: str,
    request: Request,
    principal: CurrentPrincipal,
    store: StoreDep,
    settings: SettingsDep,
    window: Annotated[str | None, _WINDOW] = None,
    viewport: Annotated[str | None, _VIEWPORT] = None,
    quality: Annotated[int | None, _QUALITY] = None,
) -> Response:
    """The first frame as image/png (default) or image/jpeg."""
    return _rendered(
        request, principal, store, settings, (study, series, sop), 1, window, viewport, quality
    )


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/frames/{frame}/rendered",
    summary="WADO-RS: rendered frame",
    responses=_NOT_FOUND,
)
def rendered_frame(
    study: str,
    series: str,
    sop: str,
    frame: int,
    request: Request,
    principal: CurrentPrincipal,
    store: StoreDep,
    settings: SettingsDep,
    window: Annotated[str | None, _WINDOW] = None,
    viewport: Annotated[str | None, _VIEWPORT] = None,
    quality: Annotated[int | None, _QUALITY] = None,
) -> Response:
    """Frame ``frame`` (from 1) as image/png (default) or image/jpeg."""
    return _rendered(
        request, principal, store, settings, (study, series, sop), frame, window, viewport, quality
    )


# ---------------------------------------------------------------------------------------
# STOW-RS


async def _stow(
    request: Request,
    principal: CurrentPrincipal,
    store: ObjectStore,
    settings: Settings,
    study: str | None,
    clinic: str | None,
) -> JSONResponse:
    outcome = await stow.stow_request(
        principal=principal,
        content_type=request.headers.get("content-type", ""),
        body=request.stream(),
        study_uid=study,
        clinic=clinic,
        settings=settings,
        store=store,
    )
    return JSONResponse(
        outcome.to_json(_base_url(request)), status_code=outcome.status, media_type=DICOM_JSON
    )


_CLINIC = Query(description="administrators: code of the clinic the instances come from")
_STOW_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {"description": "some instances stored, some failed (see FailedSOPSequence)"},
    403: {"description": "only clinic staff and administrators may store"},
    409: {"description": "no instance stored"},
    415: {"description": 'the body is not multipart/related; type="application/dicom"'},
}


@router.post("/studies", summary="STOW-RS: store instances", responses=_STOW_RESPONSES)
async def store_studies(
    request: Request,
    principal: CurrentPrincipal,
    store: StoreDep,
    settings: SettingsDep,
    clinic: Annotated[str | None, _CLINIC] = None,
) -> JSONResponse:
    """Store the instances of a multipart/related application/dicom body (or one
    application/dicom body) for the caller's clinic; answers 200, 202 or 409."""
    return await _stow(request, principal, store, settings, None, clinic)


@router.post(
    "/studies/{study}", summary="STOW-RS: store instances of a study", responses=_STOW_RESPONSES
)
async def store_study(
    study: str,
    request: Request,
    principal: CurrentPrincipal,
    store: StoreDep,
    settings: SettingsDep,
    clinic: Annotated[str | None, _CLINIC] = None,
) -> JSONResponse:
    """Like POST /studies; instances of another study fail (reason 0xA900)."""
    return await _stow(request, principal, store, settings, study, clinic)
