"""DICOMweb (QIDO-RS, WADO-RS, STOW-RS) against a running ``rdc serve``.

One deployment serves the whole module: clinic A's modality sends every sample object (the
six encodings of MR_small under their own SOP Instance UIDs, so each transfer syntax is an
instance of its own), clinic B's sends the DICOMDIR studies. The STOW test adds a study of
its own and runs last.
"""

from __future__ import annotations

import functools
import io
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import generate_frames
from pydicom.valuerep import BYTES_VR

from tests.helpers import (
    HTTP_TIMEOUT,
    Deployments,
    RdcServer,
    alliance_passwords,
    pass_database,
    same_dataset,
    storescu,
)

DICOM_JSON = "application/dicom+json"
OCTET_FRAMES = 'multipart/related; type="application/octet-stream"'
LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
BULK_VRS = {str(vr) for vr in BYTES_VR}
# MR_small in five more encodings shares MR_small's SOP Instance UID; these get their own.
RENAMED = {
    "MR_small_RLE.dcm": ".91",
    "MR_small_bigendian.dcm": ".92",
    "MR_small_implicit.dcm": ".93",
    "MR_small_jp2klossless.dcm": ".94",
    "MR_small_jpeg_ls_lossless.dcm": ".95",
}


@dataclass
class Deployment:
    server: RdcServer
    passwords: dict[str, str]
    clinic_a: list[Path]  # the objects as clinic A sent them
    clinic_b: list[Path]
    workdir: Path

    def client(self, username: str) -> httpx.Client:
        return self.server.client(username, self.passwords[username])


_postgres_database = pass_database  # for module fixtures not on ``deployments`` yet


def _clinic_a_files(testdata: Path, workdir: Path) -> list[Path]:
    files = []
    for path in sorted((testdata / "dicom").glob("*.dcm")):
        if path.name in RENAMED:
            ds = pydicom.dcmread(path)
            ds.SOPInstanceUID = ds.SOPInstanceUID + RENAMED[path.name]
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            copy = workdir / path.name
            ds.save_as(copy)  # same transfer syntax, same pixel data
            files.append(copy)
        else:
            files.append(path)
    return files


@pytest.fixture(scope="module")
def deployment_env(
    tmp_path_factory: pytest.TempPathFactory, deployments: Deployments
) -> Iterator[tuple[dict[str, str], Path]]:
    """Environment of the module's deployment (a fresh database with the alliance seeded,
    and on the production pass its own bucket and Celery queue) and its working directory."""
    workdir = tmp_path_factory.mktemp("dicomweb")
    with deployments.env(workdir) as env:
        yield env, workdir


@pytest.fixture(scope="module")
def deployment(
    deployment_env: tuple[dict[str, str], Path], testdata: Path, dcmtk: Path
) -> Iterator[Deployment]:
    """One ``rdc serve`` for the module, with both clinics' sample studies received."""
    env, workdir = deployment_env
    passwords = alliance_passwords()
    # STOW, QIDO and WADO answers and what is stored, nothing a background task does: on the
    # production pass no rdc worker and rdc beat beside rdc serve.
    server = RdcServer(env, workdir / "serve.log", workers=False)
    server.start()
    try:
        clinic_a = _clinic_a_files(testdata, workdir)
        folder = testdata / "dicom" / "study_dicomdir"
        clinic_b = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "DICOMDIR")
        for files, ae in ((clinic_a, "CLINIC_A_CT"), (clinic_b, "CLINIC_B_MR")):
            for result in storescu(dcmtk, files, port=server.dicom_port, calling_ae=ae):
                assert result.returncode == 0 and "Store Failed" not in result.stderr, result.stderr
        # Where the objects without Study/Series Instance UIDs were indexed.
        with server.db() as db:
            for path in clinic_a:
                if "StudyInstanceUID" not in header(path):
                    row = db.execute(
                        "SELECT e.study_instance_uid, i.series_instance_uid FROM instances i "
                        "JOIN exams e ON e.id = i.exam_id WHERE i.sop_instance_uid = ?",
                        (header(path).SOPInstanceUID,),
                    ).fetchone()
                    _made_up[header(path).SOPInstanceUID] = (row[0], row[1])
        yield Deployment(server, passwords, clinic_a, clinic_b, workdir)
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------
# Helpers


@functools.cache
def header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def value(item: dict[str, Any], tag: str) -> Any:
    """The first value of ``tag`` in a DICOM JSON object (None when empty)."""
    values = item.get(tag, {}).get("Value")
    return values[0] if values else None


def study_uids(items: list[dict[str, Any]]) -> set[str]:
    return {value(item, "0020000D") for item in items}


def multipart(response: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related response: (headers, body)."""
    match = re.search(r'boundary="?([^";]+)"?', response.headers["content-type"])
    assert match, response.headers["content-type"]
    delimiter = b"--" + match.group(1).encode()
    chunks = response.content.split(delimiter)
    assert chunks[0] == b"" and chunks[-1].startswith(b"--"), "malformed multipart"
    parts = []
    for chunk in chunks[1:-1]:
        head, _, body = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        assert body.endswith(b"\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        parts.append(({k.lower(): v for k, v in headers.items()}, body[:-2]))
    return parts


_made_up: dict[str, tuple[str, str]] = {}


def instance_path(path: Path) -> str:
    """The WADO-RS URL path of the instance sent from ``path``."""
    ds = header(path)
    if "StudyInstanceUID" not in ds:
        study, series = _made_up[ds.SOPInstanceUID]
        return f"/dicomweb/studies/{study}/series/{series}/instances/{ds.SOPInstanceUID}"
    return (
        f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )


def has_pixels(path: Path) -> bool:
    return "PixelData" in pydicom.dcmread(path)


def expected_frame(path: Path, frame: int) -> bytes:
    """pydicom's decoding of the original file's frame as uncompressed little endian, laid
    out as the header says (colour-by-plane when stored natively with Planar Configuration
    1)."""
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[frame - 1]
    arr = arr.astype(arr.dtype.newbyteorder("<"))
    native = not ds.file_meta.TransferSyntaxUID.is_compressed
    if native and arr.ndim == 3 and int(ds.get("PlanarConfiguration", 0) or 0) == 1:
        arr = np.transpose(arr, (2, 0, 1))
    return np.ascontiguousarray(arr).tobytes()


# ---------------------------------------------------------------------------------------
# QIDO-RS


def test_qido_study_search_filters_paging_and_includefield(deployment: Deployment) -> None:
    reader = deployment.client("reader")
    everything = reader.get("/dicomweb/studies", params={"limit": 1000})
    assert everything.status_code == 200, everything.text
    assert everything.headers["content-type"].startswith(DICOM_JSON)
    files = deployment.clinic_a + deployment.clinic_b
    known = {str(header(p).get("StudyInstanceUID")) for p in files} - {"None"}
    found = study_uids(everything.json())
    assert known <= found and len(found) == len(known) + 1  # + the one made up (UID missing)

    def search(**params: Any) -> set[str]:
        response = reader.get("/dicomweb/studies", params=params)
        assert response.status_code == 200, response.text
        return study_uids(response.json())

    def studies(predicate: Any) -> set[str]:
        return {
            str(header(p).StudyInstanceUID)
            for p in files
            if "StudyInstanceUID" in header(p) and predicate(header(p))
        }

    # PatientName: DICOM wildcards, case-insensitive.
    does = studies(lambda d: str(d.get("PatientName", "")).startswith("Doe^"))
    assert len(does) == 6
    assert search(PatientName="doe*") == does
    assert search(PatientName="*PETER") == studies(
        lambda d: str(d.get("PatientName")) == "Doe^Peter"
    )
    assert search(PatientName="Doe^Archibal?") == studies(
        lambda d: str(d.get("PatientName")) == "Doe^Archibald"
    )
    assert search(PatientName="nobody*") == set()
    assert search(PatientID="77654033") == studies(lambda d: d.get("PatientID") == "77654033")

    # StudyDate: single dates, closed and open ranges (as the clinic's local date).
    def dated(low: str, high: str) -> set[str]:
        return studies(lambda d: len(d.get("StudyDate", "")) == 8 and low <= d.StudyDate <= high)

    assert search(StudyDate="20010101") == dated("20010101", "20010101") != set()
    assert search(StudyDate="19950101-20011231") == dated("19950101", "20011231")
    assert search(StudyDate="-19991231") == dated("00000000", "19991231") != set()
    assert search(StudyDate="20030101-") == dated("20030101", "99999999") != set()
    # The calendar's first and last days bound nothing on their side (east of Greenwich the
    # start of 0001-01-01 and the end of 9999-12-31 are off the calendar in UTC): no 500.
    assert search(StudyDate="00010101-99991231") == dated("00000000", "99999999") != set()
    assert search(StudyDate="99991231") == search(StudyDate="00010101") == set()
    assert reader.get("/dicomweb/studies", params={"StudyDate": "2001-13"}).status_code == 422

    # ModalitiesInStudy (any of a list), Study Instance UID lists, accession number.
    assert search(ModalitiesInStudy="CR") == studies(lambda d: d.get("Modality") == "CR")
    assert search(ModalitiesInStudy="RTDOSE,SR") == studies(
        lambda d: d.get("Modality") in ("RTDOSE", "SR")
    )
    two = sorted(does)[:2]
    assert search(StudyInstanceUID=",".join(two)) == set(two)
    assert study_uids(
        reader.get("/dicomweb/studies", params=[("StudyInstanceUID", u) for u in two]).json()
    ) == set(two)
    assert search(AccessionNumber="428") == studies(lambda d: d.get("AccessionNumber") == "428")

    # Paging: limit/offset pages are disjoint and cover the whole list; a truncated page
    # says so in a Warning header.
    first = reader.get("/dicomweb/studies", params={"limit": 5, "offset": 0})
    assert len(first.json()) == 5 and "additional results" in first.headers["warning"]
    pages = [
        study_uids(reader.get("/dicomweb/studies", params={"limit": 5, "offset": o}).json())
        for o in range(0, 25, 5)
    ]
    assert set().union(*pages) == found and sum(len(p) for p in pages) == len(found)
    assert reader.get("/dicomweb/studies", params={"offset": 1000}).json() == []

    # Default attributes, values from the index and the headers, includefield.
    mr = header(deployment.clinic_a[[p.name for p in deployment.clinic_a].index("MR_small.dcm")])
    (study,) = reader.get(
        "/dicomweb/studies", params={"StudyInstanceUID": mr.StudyInstanceUID}
    ).json()
    for tag in ("00080020", "00080050", "00080061", "00100010", "00100020", "00201208"):
        assert tag in study, tag
    assert value(study, "00100010") == {"Alphabetic": str(mr.PatientName)}
    assert value(study, "00080020") == mr.StudyDate
    assert study["00080061"]["Value"] == ["MR"]
    assert value(study, "00201206") == 1 and value(study, "00201208") == 6
    assert value(study, "00081190").endswith(f"/dicomweb/studies/{mr.StudyInstanceUID}")
    assert "00180050" not in study  # SliceThickness: not a study attribute
    for include in ("SliceThickness", "00180050"):
        (extended,) = reader.get(
            "/dicomweb/studies",
            params={"StudyInstanceUID": mr.StudyInstanceUID, "includefield": include},
        ).json()
        assert value(extended, "00180050") == float(mr.SliceThickness)
    (everything_of,) = reader.get(
        "/dicomweb/studies",
        params={"StudyInstanceUID": mr.StudyInstanceUID, "includefield": "all"},
    ).json()
    assert value(everything_of, "00080070") == mr.Manufacturer

    unsupported = reader.get("/dicomweb/studies", params={"OperatorsName": "x"})
    assert unsupported.status_code == 200 and "OperatorsName" in unsupported.headers["warning"]

    # Names of unsupported parameters are echoed in the Warning header, but never as raw
    # text: not a Chinese name (not Latin-1), not CR/LF (header injection), not a quote.
    for name in ("患者姓名", "x\r\nSet-Cookie: rdc_session=evil", 'a"b'):
        odd = reader.get("/dicomweb/studies", params={name: "1"})
        assert odd.status_code == 200, (name, odd.status_code)
        assert "set-cookie" not in odd.headers
        warning = odd.headers["warning"]
        assert warning.startswith('299 RDC "') and warning.count('"') == 2, warning
        assert all(0x20 <= ord(c) < 0x7F for c in warning), warning


def test_qido_series_and_instances(deployment: Deployment) -> None:
    reader = deployment.client("reader")
    by_series: dict[str, list[pydicom.Dataset]] = {}
    mr_study = None
    for path in deployment.clinic_b:
        ds = header(path)
        if ds.PatientName == "Doe^Peter" and ds.Modality == "MR" and ds.StudyID == "2":
            mr_study = ds.StudyInstanceUID
        by_series.setdefault(ds.SeriesInstanceUID, []).append(ds)
    assert mr_study is not None
    in_study = {k: v for k, v in by_series.items() if v[0].StudyInstanceUID == mr_study}

    series = reader.get(f"/dicomweb/studies/{mr_study}/series").json()
    assert {value(s, "0020000E") for s in series} == set(in_study)
    for item in series:
        datasets = in_study[value(item, "0020000E")]
        assert value(item, "00201209") == len(datasets)
        assert value(item, "0008103E") == datasets[0].SeriesDescription
        assert value(item, "00080060") == "MR"
        assert value(item, "0020000D") == mr_study
        assert "00100010" not in item  # scoped to a study: no study attributes
    assert (
        reader.get(f"/dicomweb/studies/{mr_study}/series", params={"Modality": "CT"}).json() == []
    )

    # Unscoped series search carries the study attributes too.
    some_series = sorted(in_study)[0]
    (found,) = reader.get("/dicomweb/series", params={"SeriesInstanceUID": some_series}).json()
    assert value(found, "00100010") == {"Alphabetic": "Doe^Peter"}

    instances = reader.get(f"/dicomweb/studies/{mr_study}/series/{some_series}/instances").json()
    expected = {ds.SOPInstanceUID: ds for ds in in_study[some_series]}
    assert {value(i, "00080018") for i in instances} == set(expected)
    for item in instances:
        ds = expected[value(item, "00080018")]
        assert value(item, "00080016") == ds.SOPClassUID
        assert value(item, "00280010") == ds.Rows and value(item, "00280011") == ds.Columns
        assert value(item, "00200013") == int(ds.InstanceNumber)
        assert value(item, "00083002") == LITTLE_ENDIAN
    one = sorted(expected)[0]
    only = reader.get(
        f"/dicomweb/studies/{mr_study}/instances", params={"SOPInstanceUID": one}
    ).json()
    assert [value(i, "00080018") for i in only] == [one]
    assert value(only[0], "0020000E") == some_series  # series attributes when unscoped

    # Multi-frame: Number of Frames from the header.
    emri = header(next(p for p in deployment.clinic_a if p.name == "emri_small.dcm"))
    (item,) = reader.get(
        f"/dicomweb/studies/{emri.StudyInstanceUID}/instances",
        params={"SOPInstanceUID": emri.SOPInstanceUID},
    ).json()
    assert value(item, "00280008") == 10

    # An object without Study/Series Instance UIDs is listed under the ones made up for it.
    sop = header(next(p for p in deployment.clinic_a if "NearLossless" in p.name)).SOPInstanceUID
    (orphan,) = reader.get("/dicomweb/instances", params={"SOPInstanceUID": sop}).json()
    study, series = value(orphan, "0020000D"), value(orphan, "0020000E")
    assert study and series
    listed = reader.get(f"/dicomweb/studies/{study}/series/{series}/instances").json()
    assert [value(i, "00080018") for i in listed] == [sop]


# ---------------------------------------------------------------------------------------
# WADO-RS


def _strip_bulk(data: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for tag, elem in data.items():
        mine = ours.get(tag, {})
        if "BulkDataURI" in mine:
            continue
        if elem.get("vr") == "SQ" and "Value" in elem and "Value" in mine:
            elem = {
                "vr": "SQ",
                "Value": [
                    _strip_bulk(item, mine_item)
                    for item, mine_item in zip(elem["Value"], mine["Value"], strict=True)
                ],
            }
        out[tag] = elem
    return out


def test_metadata_matches_the_stored_datasets(deployment: Deployment) -> None:
    reader = deployment.client("reader")
    for path in deployment.clinic_a + deployment.clinic_b[:5]:
        ds = pydicom.dcmread(path)
        url = instance_path(path)
        response = reader.get(f"{url}/metadata")
        assert response.status_code == 200, (path.name, response.text)
        assert response.headers["content-type"].startswith(DICOM_JSON)
        (ours,) = response.json()
        original = ds.to_json_dict()
        # Data Set Trailing Padding carries no data; dcmtk drops it when sending.
        original.pop("FFFCFFFC", None)
        if "PixelData" in ds:
            # Without RDC_PUBLIC_URL, links are relative to the server (never built from
            # the Host header, which clients send without the port).
            assert ours["7FE00010"]["BulkDataURI"] == f"{url}/bulkdata/7FE00010"
        for elem in ours.values():
            if "BulkDataURI" in elem:
                assert elem["vr"] in BULK_VRS
        # Apart from bulk data (sent as URIs) the JSON is that of the stored data set; the
        # made-up UIDs are added only where the object had none.
        added = {"0020000D", "0020000E"} - set(original)
        assert _strip_bulk(original, ours) == {
            k: v for k, v in _strip_bulk(ours, ours).items() if k not in added
        }, path.name
        # And it reads back as a data set with the same values.
        back = pydicom.Dataset.from_json(ours, bulk_data_uri_handler=lambda *_: b"")
        assert back.SOPInstanceUID == ds.SOPInstanceUID
        assert back.get("PatientName") == ds.get("PatientName")

    # Study metadata: every instance of the study, in one array.
    mr = header(deployment.clinic_a[[p.name for p in deployment.clinic_a].index("MR_small.dcm")])
    study = reader.get(f"/dicomweb/studies/{mr.StudyInstanceUID}/metadata").json()
    assert len(study) == 6
    assert len({value(i, "00080018") for i in study}) == 6
    series = reader.get(
        f"/dicomweb/studies/{mr.StudyInstanceUID}/series/{mr.SeriesInstanceUID}/metadata"
    ).json()
    assert len(series) == 6

    # A bulk data URI other than the pixel data answers with the element's value.
    overlay = next(p for p in deployment.clinic_a if p.name == "examples_overlay.dcm")
    (meta,) = reader.get(f"{instance_path(overlay)}/metadata").json()
    uri = meta["60003000"]["BulkDataURI"]
    response = reader.get(uri, headers={"Accept": OCTET_FRAMES})
    assert response.status_code == 200, response.text
    ((_, data),) = multipart(response)
    assert data == pydicom.dcmread(overlay)[0x60003000].value


def test_frames_decode_for_every_transfer_syntax(deployment: Deployment) -> None:
    reader = deployment.client("reader")
    syntaxes = set()
    for path in deployment.clinic_a:
        if not has_pixels(path):
            continue
        ds = header(path)
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
        count = int(ds.get("NumberOfFrames", 1) or 1)
        for frame in sorted({1, count}):
            response = reader.get(
                f"{instance_path(path)}/frames/{frame}", headers={"Accept": OCTET_FRAMES}
            )
            assert response.status_code == 200, (path.name, response.text)
            ((part_headers, data),) = multipart(response)
            assert part_headers["content-type"] == (
                f"application/octet-stream; transfer-syntax={LITTLE_ENDIAN}"
            )
            assert data == expected_frame(path, frame), f"{path.name} frame {frame}"
    assert len(syntaxes) == 12  # every transfer syntax of the sample data

    emri = next(p for p in deployment.clinic_a if p.name == "emri_small.dcm")
    # Several frames at once, in the order asked; any Accept; no Accept.
    for accept in ("*/*", None):
        headers = {"Accept": accept} if accept else {}
        parts = multipart(reader.get(f"{instance_path(emri)}/frames/3,1", headers=headers))
        assert [d for _, d in parts] == [expected_frame(emri, 3), expected_frame(emri, 1)]
    assert reader.get(f"{instance_path(emri)}/frames/11").status_code == 404
    assert reader.get(f"{instance_path(emri)}/frames/0").status_code == 422
    # PS3.18: one or more non-duplicate frame numbers. A list repeating one frame thousands
    # of times was decoded into memory whole; every number is checked before any decoding.
    assert reader.get(f"{instance_path(emri)}/frames/1,2,1").status_code == 422
    repeated = reader.get(f"{instance_path(emri)}/frames/" + ",".join(["1"] * 2000))
    assert repeated.status_code == 422
    backwards = ",".join(str(n) for n in range(10, 0, -1))
    all_ten = multipart(reader.get(f"{instance_path(emri)}/frames/{backwards}"))
    assert [d for _, d in all_ten] == [expected_frame(emri, n) for n in range(10, 0, -1)]
    assert reader.get(f"{instance_path(emri)}/frames/1,11").status_code == 404
    refused = reader.get(f"{instance_path(emri)}/frames/1", headers={"Accept": "image/jpeg"})
    assert refused.status_code == 406
    assert refused.headers["content-type"] == "application/problem+json"

    # transfer-syntax=* (what OHIF asks for): compressed frames as stored, not transcoded.
    ybr = next(p for p in deployment.clinic_a if p.name == "examples_ybr_color.dcm")
    response = reader.get(
        f"{instance_path(ybr)}/frames/2",
        headers={"Accept": f"{OCTET_FRAMES}; transfer-syntax=*"},
    )
    ((part_headers, data),) = multipart(response)
    stored = pydicom.dcmread(ybr)
    assert part_headers["content-type"].endswith(str(stored.file_meta.TransferSyntaxUID))
    assert data == list(generate_frames(stored.PixelData, number_of_frames=30))[1]

    report = next(p for p in deployment.clinic_a if p.name == "test-SR.dcm")
    assert reader.get(f"{instance_path(report)}/frames/1").status_code == 404


def test_rendered_frames(deployment: Deployment) -> None:
    reader = deployment.client("reader")
    ct = next(p for p in deployment.clinic_a if p.name == "CT_small.dcm")
    url = f"{instance_path(ct)}/rendered"
    response = reader.get(url)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG" and image.size == (128, 128) and image.mode == "L"
    assert response.headers["cache-control"].startswith("private, max-age=")
    etag = response.headers["etag"]
    assert reader.get(url, headers={"If-None-Match": etag}).status_code == 304

    # The window changes the picture; a narrow window saturates more pixels.
    default = np.asarray(image)
    narrow = np.asarray(
        Image.open(io.BytesIO(reader.get(url, params={"window": "40,80,linear"}).content))
    )
    assert not np.array_equal(default, narrow)
    assert np.count_nonzero((narrow == 0) | (narrow == 255)) > np.count_nonzero(
        (default == 0) | (default == 255)
    )
    assert reader.get(url, params={"window": "40"}).status_code == 422
    assert reader.get(url, params={"window": "40,0"}).status_code == 422

    # Viewport (fit within, keep aspect), JPEG by Accept, quality.
    jpeg = reader.get(url, params={"viewport": "64,32"}, headers={"Accept": "image/jpeg"})
    assert jpeg.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(jpeg.content)).size == (32, 32)
    low = reader.get(url, params={"quality": "10"}, headers={"Accept": "image/jpeg"})
    assert len(low.content) < len(reader.get(url, headers={"Accept": "image/jpeg"}).content)
    assert reader.get(url, headers={"Accept": "image/gif"}).status_code == 406

    # Colour stays colour; frames of a multi-frame object; a missing frame is 404.
    colour = next(p for p in deployment.clinic_a if p.name == "SC_rgb_jpeg_dcmtk.dcm")
    rgb = Image.open(io.BytesIO(reader.get(f"{instance_path(colour)}/rendered").content))
    assert rgb.mode == "RGB" and rgb.size == (100, 100)
    emri = next(p for p in deployment.clinic_a if p.name == "emri_small.dcm")
    assert reader.get(f"{instance_path(emri)}/frames/10/rendered").status_code == 200
    assert reader.get(f"{instance_path(emri)}/frames/11/rendered").status_code == 404

    cached = list((deployment.server.data_dir / "cache" / "frames").rglob("*"))
    assert any(p.is_file() for p in cached)


def test_retrieve_instances_as_stored(deployment: Deployment) -> None:
    reader = deployment.client("reader")
    for name in ("CT_small.dcm", "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm"):
        path = next(p for p in deployment.clinic_a if p.name == name)
        response = reader.get(
            instance_path(path),
            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        )
        assert response.status_code == 200, response.text
        ((part_headers, data),) = multipart(response)
        ts = header(path).file_meta.TransferSyntaxUID
        assert part_headers["content-type"] == f"application/dicom; transfer-syntax={ts}"
        received = deployment.workdir / f"received-{name}"
        received.write_bytes(data)
        assert same_dataset(path, received), name
        # Without a transfer syntax: the DICOMweb default, Explicit VR Little Endian.
        response = reader.get(
            instance_path(path), headers={"Accept": 'multipart/related; type="application/dicom"'}
        )
        ((part_headers, data),) = multipart(response)
        assert part_headers["content-type"] == f"application/dicom; transfer-syntax={LITTLE_ENDIAN}"
        decoded = pydicom.dcmread(io.BytesIO(data))
        assert decoded.file_meta.TransferSyntaxUID == LITTLE_ENDIAN
        assert np.array_equal(decoded.pixel_array, pydicom.dcmread(path).pixel_array), name

    mr = header(deployment.clinic_a[[p.name for p in deployment.clinic_a].index("MR_small.dcm")])
    parts = multipart(reader.get(f"/dicomweb/studies/{mr.StudyInstanceUID}"))
    sops = {pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID for _, data in parts}
    assert len(parts) == 6 and mr.SOPInstanceUID in sops
    refused = reader.get(
        f"/dicomweb/studies/{mr.StudyInstanceUID}", headers={"Accept": "text/html"}
    )
    assert refused.status_code == 406


def test_clinics_see_only_their_own_studies(deployment: Deployment) -> None:
    tech_a, tech_b = deployment.client("tech_a"), deployment.client("tech_b")
    a_studies = {str(header(p).get("StudyInstanceUID")) for p in deployment.clinic_a}
    b_studies = {str(header(p).StudyInstanceUID) for p in deployment.clinic_b}
    seen_by_b = study_uids(tech_b.get("/dicomweb/studies", params={"limit": 1000}).json())
    assert seen_by_b == b_studies
    seen_by_a = study_uids(tech_a.get("/dicomweb/studies", params={"limit": 1000}).json())
    assert seen_by_a.isdisjoint(b_studies) and a_studies - {"None"} <= seen_by_a

    ct = next(p for p in deployment.clinic_a if p.name == "CT_small.dcm")
    ds = header(ct)
    assert (
        tech_b.get("/dicomweb/studies", params={"StudyInstanceUID": ds.StudyInstanceUID}).json()
        == []
    )
    assert tech_b.get(f"/dicomweb/studies/{ds.StudyInstanceUID}/series").json() == []
    url = instance_path(ct)
    for path in (
        f"{url}/metadata",
        f"{url}/frames/1",
        f"{url}/rendered",
        url,
        f"/dicomweb/studies/{ds.StudyInstanceUID}",
        f"/dicomweb/studies/{ds.StudyInstanceUID}/metadata",
    ):
        foreign = tech_b.get(path)
        assert foreign.status_code == 404, path
        assert foreign.headers["content-type"] == "application/problem+json"
        assert tech_a.get(path).status_code == 200, path
    assert (
        httpx.get(f"{deployment.server.http}/dicomweb/studies", timeout=HTTP_TIMEOUT).status_code
        == 401
    )

    # Every access is in the audit trail.
    with deployment.server.db() as db:
        rows = db.execute(
            "SELECT actor, action, object_type, detail FROM audit_events WHERE actor = ?",
            ("user:tech_a",),
        ).fetchall()
    details = [
        r["detail"] if isinstance(r["detail"], dict) else json.loads(r["detail"]) for r in rows
    ]
    resources = {(r["action"], d.get("resource")) for r, d in zip(rows, details, strict=True)}
    for expected in (
        ("list", None),
        ("view", "metadata"),
        ("view", "frames"),
        ("view", "rendered"),
        ("download", "instances"),
    ):
        assert expected in resources, expected


def test_bulk_data_reads_only_the_element_asked_for(testdata: Path, tmp_path: Path) -> None:
    from web.dicomweb.dicomjson import bulk_value

    ds = pydicom.dcmread(testdata / "dicom" / "CT_small.dcm")
    ds.add_new(0x00091010, "OB", bytes(range(256)) * 8)  # a 2 KiB private bulk value
    big = np.zeros((1024, 1024), dtype=np.uint16)  # 2 MiB of pixel data after it
    ds.Rows, ds.Columns = big.shape
    ds.PixelData = big.tobytes()
    path = tmp_path / "bulk.dcm"
    ds.save_as(path)

    class Counting(io.BytesIO):
        read_bytes = 0

        def read(self, size: int | None = -1) -> bytes:
            data = super().read(size)
            self.read_bytes += len(data)
            return data

    stream = Counting(path.read_bytes())
    assert bulk_value(stream, "00091010") == bytes(range(256)) * 8
    # The pixel data is not read to answer for another element.
    assert stream.read_bytes < len(ds.PixelData) // 4, stream.read_bytes


# ---------------------------------------------------------------------------------------
# STOW-RS (last: it adds a study)


def _multipart_request(parts: list[bytes]) -> tuple[bytes, str]:
    boundary = f"test-{uuid.uuid4().hex}"
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n"
        for part in parts
    )
    body += b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def _new_copy(source: Path, target: Path, study: str, index: int) -> Path:
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = f"{study}.{index}"
    ds.SOPInstanceUID = f"{study}.{index}.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(target)
    return target


def test_stow_stores_good_parts_quarantines_bad_ones(
    deployment: Deployment, testdata: Path
) -> None:
    study = f"2.25.{uuid.uuid4().int}"
    good = [
        _new_copy(
            testdata / "dicom" / "CT_small.dcm", deployment.workdir / "stow-ct.dcm", study, 1
        ),
        _new_copy(
            testdata / "dicom" / "MR_small.dcm", deployment.workdir / "stow-mr.dcm", study, 2
        ),
    ]
    bad = testdata / "dicom" / "malformed" / "no_meta.dcm"
    body, content_type = _multipart_request(
        [good[0].read_bytes(), bad.read_bytes(), good[1].read_bytes()]
    )

    tech_a = deployment.client("tech_a")
    response = tech_a.post(
        "/dicomweb/studies", content=body, headers={"Content-Type": content_type}
    )
    assert response.status_code == 202, response.text
    assert response.headers["content-type"].startswith(DICOM_JSON)
    result = response.json()
    referenced = result["00081199"]["Value"]
    assert {value(r, "00081155") for r in referenced} == {header(g).SOPInstanceUID for g in good}
    assert all(value(r, "00081190").endswith(value(r, "00081155")) for r in referenced)
    (failed,) = result["00081198"]["Value"]
    assert value(failed, "00081197") == 0xC000

    # The stored instances are found by QIDO, for the clinic; the bad part is quarantined.
    found = tech_a.get(f"/dicomweb/studies/{study}/instances").json()
    assert {value(i, "00080018") for i in found} == {header(g).SOPInstanceUID for g in good}
    assert deployment.client("tech_b").get(f"/dicomweb/studies/{study}/instances").json() == []
    with deployment.server.db() as db:
        (count,) = db.execute(
            "SELECT count(*) FROM quarantine WHERE source = 'stow' AND size_bytes = ?",
            (bad.stat().st_size,),
        ).fetchone()
    assert count == 1

    # A part of another study than the one addressed fails; nothing stored answers 409.
    other = _new_copy(
        testdata / "dicom" / "CT_small.dcm", deployment.workdir / "stow-other.dcm", f"{study}.9", 1
    )
    body, content_type = _multipart_request([other.read_bytes()])
    mismatch = tech_a.post(
        f"/dicomweb/studies/{study}", content=body, headers={"Content-Type": content_type}
    )
    assert mismatch.status_code == 409, mismatch.text
    assert value(mismatch.json()["00081198"]["Value"][0], "00081197") == 0xA900

    # One application/dicom body; the same instance again is fine (idempotent).
    single = tech_a.post(
        f"/dicomweb/studies/{study}",
        content=good[0].read_bytes(),
        headers={"Content-Type": "application/dicom"},
    )
    assert single.status_code == 200, single.text
    assert single.json()["00081198"].get("Value", []) == []

    # Readers do not upload; other media types are refused.
    body, content_type = _multipart_request([good[0].read_bytes()])
    forbidden = deployment.client("reader").post(
        "/dicomweb/studies", content=body, headers={"Content-Type": content_type}
    )
    assert forbidden.status_code == 403
    assert forbidden.headers["content-type"] == "application/problem+json"
    wrong = tech_a.post(
        "/dicomweb/studies", content=b"{}", headers={"Content-Type": "application/json"}
    )
    assert wrong.status_code == 415
    cut = tech_a.post(
        "/dicomweb/studies", content=body[:-20], headers={"Content-Type": content_type}
    )
    assert cut.status_code == 422
