"""DICOMweb as standard clients use it: dicomweb-client (the Python DICOMweb client) against
a running ``rdc serve`` with ``RDC_PUBLIC_URL`` set.

Clinic A sends CT_small, an object without Modality (JPEGLSNearLossless_16), MR_small in
JPEG 2000, JPEG2000.dcm, the overlay example, CT_small under Chinese names
(``Wang^Fang=王^芳=ワン^ファン``, ...) and emri_small in Deflated Image Frame Compression
(by STOW-RS).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openjpeg
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import generate_uid
from requests import HTTPError

from tests.helpers import (
    Deployments,
    RdcServer,
    alliance_passwords,
    free_port,
    storescu,
    wait_for,
)

SENT = (
    "CT_small.dcm",
    "JPEGLSNearLossless_16.dcm",
    "MR_small_jp2klossless.dcm",
    "JPEG2000.dcm",
    "examples_overlay.dcm",
)
EXPLICIT_LE = "1.2.840.10008.1.2.1"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
DEFLATED_FRAMES = "1.2.840.10008.1.2.8.1"
# Chinese names: (PatientName as sent, PatientID).
NAMES = (("Wang^Fang=王^芳=ワン^ファン", "CN-1"), ("Li^Wei=李^伟", "CN-2"), ("Wang^Lei", "CN-3"))

# PS3.18 Table 10.6.3-3/-4/-5: attributes every result of a level carries.
REQUIRED = {
    "study": [
        "00080020",
        "00080030",
        "00080050",
        "00080056",
        "00080061",
        "00080090",
        "00081190",
        "00100010",
        "00100020",
        "00100030",
        "00100040",
        "0020000D",
        "00200010",
        "00201206",
        "00201208",
    ],
    "series": [
        "00080060",
        "0008103E",
        "00081190",
        "0020000E",
        "00200011",
        "00201209",
        "00400244",
        "00400245",
    ],
    "instance": [
        "00080016",
        "00080018",
        "00080056",
        "00081190",
        "00200013",
        "00280010",
        "00280011",
        "00280100",
    ],
}


@dataclass
class Deployment:
    server: RdcServer
    passwords: dict[str, str]
    files: dict[str, Path]
    public_url: str

    def token(self, username: str = "reader") -> str:
        return self.server.token(username, self.passwords[username])

    def dicomweb(self, username: str = "reader") -> DICOMwebClient:
        return DICOMwebClient(
            url=f"{self.public_url}/dicomweb",
            headers={"Authorization": f"Bearer {self.token(username)}"},
        )

    def client(self, username: str = "reader") -> httpx.Client:
        return self.server.client(username, self.passwords[username])


def _deflated_frames(source: Path, target: Path) -> Path:
    """``source`` (multi-frame, native) re-encoded in Deflated Image Frame Compression:
    each frame deflated on its own (RFC 1951), encapsulated."""
    ds = pydicom.dcmread(source)
    frames = []
    for frame in ds.pixel_array:
        packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        frames.append(packer.compress(frame.astype("<u2").tobytes()) + packer.flush())
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = DEFLATED_FRAMES
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    # pydicom 3.0 does not know the syntax: the data set is written Explicit VR Little Endian.
    pydicom.dcmwrite(target, ds, implicit_vr=False, little_endian=True, force_encoding=True)
    return target


def _chinese_copies(source: Path, workdir: Path) -> list[Path]:
    copies = []
    for index, (name, patient_id) in enumerate(NAMES):
        ds = pydicom.dcmread(source)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = name
        ds.PatientID = patient_id
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = workdir / f"chinese_{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        copies.append(path)
    return copies


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, deployments: Deployments, testdata: Path, dcmtk: Path
) -> Iterator[Deployment]:
    workdir = tmp_path_factory.mktemp("dicomweb_clients")
    port = free_port()
    public_url = f"http://127.0.0.1:{port}"
    with (
        deployments.env(workdir, RDC_HTTP_PORT=str(port), RDC_PUBLIC_URL=public_url) as env,
        RdcServer(env, workdir / "serve.log") as server,
    ):
        passwords = alliance_passwords()
        files = {name: testdata / "dicom" / name for name in SENT}
        chinese = _chinese_copies(testdata / "dicom" / "CT_small.dcm", workdir)
        files.update({p.name: p for p in chinese})
        for result in storescu(
            dcmtk, files.values(), port=server.dicom_port, calling_ae="CLINIC_A_CT"
        ):
            assert result.returncode == 0 and "Store Failed" not in result.stderr, result.stderr
        deflated = _deflated_frames(testdata / "dicom" / "emri_small.dcm", workdir / "dfl.dcm")
        with server.client("tech_a", passwords["tech_a"]) as http:
            stored = http.post(
                "/dicomweb/studies",
                content=deflated.read_bytes(),
                headers={"Content-Type": "application/dicom"},
            )
            assert stored.status_code == 200, stored.text
        files["deflated_frames.dcm"] = deflated
        yield Deployment(server, passwords, files, public_url)


def header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def first(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value")
    return values[0] if values else None


# ---------------------------------------------------------------------------------------
# Item 9: QIDO results carry PS3.18's attributes, never an empty Modalities in Study


def test_qido_results_have_the_required_attributes_and_no_empty_modalities(
    deployment: Deployment,
) -> None:
    client = deployment.dicomweb()
    studies = client.search_for_studies()
    assert len(studies) >= 5
    for study in studies:
        missing = [t for t in REQUIRED["study"] if t not in study and t != "00080061"]
        assert not missing, (missing, study)
        # OHIF's study list read ModalitiesInStudy.Value and crashed on an empty one.
        if "00080061" in study:
            assert study["00080061"].get("Value"), study
    uids = {first(s, "0020000D"): s for s in studies}
    ct = header(deployment.files["CT_small.dcm"])
    assert uids[ct.StudyInstanceUID]["00080061"]["Value"] == ["CT"]
    # The object without Modality: its study has no modality to list, so none is listed.
    orphan = next(s for s in studies if "00080061" not in s)
    series = client.search_for_series(study_instance_uid=first(orphan, "0020000D"))
    assert len(series) == 1 and "00080060" not in series[0]
    for item in series:
        assert not [t for t in REQUIRED["series"] if t not in item and t != "00080060"]
    for item in client.search_for_instances(study_instance_uid=ct.StudyInstanceUID):
        assert not [t for t in REQUIRED["instance"] if t not in item], item
        assert first(item, "00280010") == ct.Rows


# ---------------------------------------------------------------------------------------
# Item 12: links from RDC_PUBLIC_URL, never from the Host header


def test_bulk_data_links_are_fetchable_with_dicomweb_client(deployment: Deployment) -> None:
    client = deployment.dicomweb()
    overlay = header(deployment.files["examples_overlay.dcm"])
    meta = client.retrieve_instance_metadata(
        overlay.StudyInstanceUID, overlay.SeriesInstanceUID, overlay.SOPInstanceUID
    )
    uri = meta["60003000"]["BulkDataURI"]
    assert uri.startswith(f"{deployment.public_url}/dicomweb/studies/"), uri
    (data,) = client.retrieve_bulkdata(uri)
    assert data == pydicom.dcmread(deployment.files["examples_overlay.dcm"])[0x60003000].value
    pixels = client.retrieve_bulkdata(meta["7FE00010"]["BulkDataURI"])
    assert len(pixels) == 1
    expected = pydicom.dcmread(deployment.files["examples_overlay.dcm"]).pixel_array
    little = expected.astype(expected.dtype.newbyteorder("<"))
    assert pixels[0] == np.ascontiguousarray(little).tobytes()

    # Without RDC_CORS_ORIGINS, no origin is allowed: no CORS headers, preflight refused.
    preflight = httpx.options(
        f"{deployment.public_url}/dicomweb/studies",
        headers={"Origin": "http://127.0.0.1:1", "Access-Control-Request-Method": "GET"},
    )
    assert preflight.status_code == 405
    assert "access-control-allow-origin" not in preflight.headers

    # A client that leaves the port out of Host still gets links it can follow.
    with deployment.client() as http:
        response = http.get(
            f"/dicomweb/studies/{overlay.StudyInstanceUID}/metadata",
            headers={"Host": "127.0.0.1"},
        )
        assert response.status_code == 200, response.text
        assert response.json()[0]["7FE00010"]["BulkDataURI"].startswith(deployment.public_url)
        (study,) = http.get(
            "/dicomweb/studies",
            params={"StudyInstanceUID": overlay.StudyInstanceUID},
            headers={"Host": "127.0.0.1"},
        ).json()
        assert first(study, "00081190") == (
            f"{deployment.public_url}/dicomweb/studies/{overlay.StudyInstanceUID}"
        )


# ---------------------------------------------------------------------------------------
# Item 10: Chinese names, group by group, in QIDO, the exam list and the worklist


def test_person_names_match_each_group(deployment: Deployment) -> None:
    client = deployment.dicomweb()

    def qido(name: str) -> set[str]:
        found = client.search_for_studies(search_filters={"PatientName": name})
        return {first(s, "00100020") for s in found}

    assert qido("王*") == {"CN-1"}
    assert qido("=王*") == {"CN-1"}
    assert qido("王^芳") == {"CN-1"}
    assert qido("Wang^Fang=王^芳") == {"CN-1"}
    assert qido("wang*") == {"CN-1", "CN-3"}  # the alphabetic group, any case
    assert qido("WANG^FANG") == {"CN-1"}
    assert qido("*^伟") == {"CN-2"}
    assert qido("ワン*") == {"CN-1"}  # the phonetic group
    assert qido("==ワン*") == {"CN-1"}
    assert qido("=李*") == {"CN-2"}
    assert qido("Wang^Fang=李*") == set()  # each group given must match its own group
    assert qido("W*芳") == set()  # a wildcard never spans two groups
    (study,) = client.search_for_studies(search_filters={"PatientName": "王^芳"})
    assert first(study, "00100010") == {
        "Alphabetic": "Wang^Fang",
        "Ideographic": "王^芳",
        "Phonetic": "ワン^ファン",
    }

    with deployment.client() as http:
        for name, expected in (("王*", {"CN-1"}), ("=李*", {"CN-2"}), ("wang*", {"CN-1", "CN-3"})):
            exams = http.get("/api/v1/exams", params={"patient_name": name, "limit": 500})
            assert exams.status_code == 200, exams.text
            assert {e["patient"]["patient_id"] for e in exams.json()["items"]} == expected, name

            def listed(name: str = name, expected: set[str] = expected) -> set[str] | None:
                page = http.get("/api/v1/worklist", params={"patient_name": name}).json()
                ids = {i["patient_id"] for i in page["items"]}
                return ids if ids >= expected else None

            assert wait_for(listed, timeout=60) == expected, name


# ---------------------------------------------------------------------------------------
# Item 11: the transfer syntax asked for on retrieve


def _uids(path: Path) -> tuple[str, str, str]:
    ds = header(path)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def _status(call: Any) -> int:
    with pytest.raises(HTTPError) as info:
        call()
    return int(info.value.response.status_code)


def test_retrieve_in_the_transfer_syntax_asked_for(deployment: Deployment) -> None:
    client = deployment.dicomweb()
    j2k = deployment.files["JPEG2000.dcm"]
    original = pydicom.dcmread(j2k)

    # No transfer syntax: the DICOMweb default, Explicit VR Little Endian, decoded.
    ds = client.retrieve_instance(*_uids(j2k), media_types=(("application/dicom",),))
    assert ds.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert ds.SOPInstanceUID == original.SOPInstanceUID
    assert np.array_equal(ds.pixel_array, original.pixel_array)
    # Explicitly, and for the whole study (every instance of it, each decoded).
    ds = client.retrieve_instance(*_uids(j2k), media_types=(("application/dicom", EXPLICIT_LE),))
    assert ds.file_meta.TransferSyntaxUID == EXPLICIT_LE
    study = client.retrieve_study(
        header(j2k).StudyInstanceUID, media_types=(("application/dicom",),)
    )
    assert {str(d.file_meta.TransferSyntaxUID) for d in study} == {EXPLICIT_LE}
    # "*" (dicomweb-client's default): as stored, byte for byte.
    ds = client.retrieve_instance(*_uids(j2k))
    assert ds.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert ds.PixelData == original.PixelData

    # Native to JPEG 2000 lossless: transcoded, pixel for pixel.
    ct = deployment.files["CT_small.dcm"]
    ds = client.retrieve_instance(*_uids(ct), media_types=(("application/dicom", J2K_LOSSLESS),))
    assert ds.file_meta.TransferSyntaxUID == J2K_LOSSLESS
    assert np.array_equal(ds.pixel_array, pydicom.dcmread(ct).pixel_array)
    # A syntax nothing here encodes: 406, nothing sent.
    jpeg_ls = "1.2.840.10008.1.2.4.80"
    assert (
        _status(
            lambda: client.retrieve_instance(
                *_uids(ct), media_types=(("application/dicom", jpeg_ls),)
            )
        )
        == 406
    )

    # Frames as images of their kind, as stored; another kind is 406.
    mr = deployment.files["MR_small_jp2klossless.dcm"]
    (frame,) = client.retrieve_instance_frames(*_uids(mr), [1], media_types=(("image/jp2",),))
    assert frame == next(generate_frames(pydicom.dcmread(mr).PixelData, number_of_frames=1))
    assert (
        _status(
            lambda: client.retrieve_instance_frames(*_uids(mr), [1], media_types=(("image/jpeg",),))
        )
        == 406
    )
    # Frames of a native object as image/jp2: encoded (JPEG 2000 lossless) frame by frame.
    (frame,) = client.retrieve_instance_frames(*_uids(ct), [1], media_types=(("image/jp2",),))
    assert frame[:4] == b"\xffO\xffQ"  # a JPEG 2000 codestream
    expected = pydicom.dcmread(ct).pixel_array
    assert np.array_equal(openjpeg.decode(frame).reshape(expected.shape), expected)


def test_deflated_image_frames_are_decoded(deployment: Deployment, testdata: Path) -> None:
    client = deployment.dicomweb()
    deflated = deployment.files["deflated_frames.dcm"]
    expected = pydicom.dcmread(testdata / "dicom" / "emri_small.dcm").pixel_array
    frames = client.retrieve_instance_frames(*_uids(deflated), [1, 10])
    assert frames == [expected[0].astype("<u2").tobytes(), expected[9].astype("<u2").tobytes()]
    ds = client.retrieve_instance(*_uids(deflated), media_types=(("application/dicom",),))
    assert ds.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert np.array_equal(ds.pixel_array, expected)
    with deployment.client() as http:
        study, series, sop = _uids(deflated)
        rendered = http.get(
            f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/frames/3/rendered"
        )
        assert rendered.status_code == 200 and rendered.headers["content-type"] == "image/png"
