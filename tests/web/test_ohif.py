"""OHIF, the open-source DICOMweb viewer, served from another origin, against ``rdc serve``.

The prebuilt ``@ohif/app`` package from npm (its ``dist/``, installed by ``scripts/test``
under ``~/.cache/rdc-tests/ohif/<version>``, or ``RDC_OHIF_DIR``) is served on a port of its
own with an app-config.js whose data source is the deployment's DICOMweb root; the reader's
token reaches OHIF as its ``?token=`` URL parameter (OHIF sends it as a bearer token).
Debian's Chromium, driven by Playwright, loads the study list, opens a CT and scrolls it.
Also: CORS preflight answers and their absence without ``RDC_CORS_ORIGINS``.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pydicom
import pytest

from tests.helpers import (
    HTTP_TIMEOUT,
    Deployments,
    RdcServer,
    alliance_passwords,
    free_port,
    storescu,
)

OHIF_VERSION = "3.13.2"
CHROMIUM = "/usr/bin/chromium"


def ohif_dir() -> Path:
    default = Path.home() / ".cache" / "rdc-tests" / "ohif" / OHIF_VERSION
    return Path(os.environ.get("RDC_OHIF_DIR", default))


def _app_config(rdc: str) -> str:
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "useSharedArrayBuffer": "FALSE",
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "rdc",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "rdc",
                "configuration": {
                    "friendlyName": "RDC",
                    "name": "rdc",
                    "wadoUriRoot": f"{rdc}/dicomweb",
                    "qidoRoot": f"{rdc}/dicomweb",
                    "wadoRoot": f"{rdc}/dicomweb",
                    "qidoSupportsIncludeField": False,
                    "imageRendering": "wadors",
                    "thumbnailRendering": "wadors",
                    "enableStudyLazyLoad": True,
                    "supportsFuzzyMatching": False,
                    "supportsWildcard": True,
                    "staticWado": False,
                    "singlepart": "bulkdata,video",
                    "bulkDataURI": {"enabled": True},
                    "omitQuotationForMultipartRequest": True,
                },
            }
        ],
    }
    return f"window.config = {json.dumps(config)};\n"


class _OhifHandler(http.server.SimpleHTTPRequestHandler):
    """The OHIF build, index.html for the app's own routes, our app-config.js."""

    extensions_map: ClassVar[dict[str, str]] = {
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".wasm": "application/wasm",
        ".js": "text/javascript",
    }
    config = b""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/app-config.js":
            self.send_response(200)
            self.send_header("Content-Type", "text/javascript")
            self.send_header("Content-Length", str(len(self.config)))
            self.end_headers()
            self.wfile.write(self.config)
            return
        if not Path(self.translate_path(path)).is_file():
            self.path = "/index.html"
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Deployment:
    server: RdcServer
    passwords: dict[str, str]
    ohif: str
    ct_study: str
    ct_slices: int
    ct_series_description: str


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, deployments: Deployments, testdata: Path, dcmtk: Path
) -> Iterator[Deployment]:
    dist = ohif_dir() / "dist"
    if not (dist / "index.html").is_file():
        pytest.fail(f"OHIF {OHIF_VERSION} is not installed in {dist.parent} (run scripts/test)")
    workdir = tmp_path_factory.mktemp("ohif")
    ohif_port = free_port()
    ohif = f"http://127.0.0.1:{ohif_port}"
    ct_files = []
    for path in sorted((testdata / "dicom" / "study_dicomdir").rglob("*")):
        if path.is_file() and path.name != "DICOMDIR":
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if ds.get("Modality") == "CT" and str(ds.PatientName) == "Doe^Peter":
                ct_files.append((ds, path))
    by_series: dict[str, list[Path]] = {}
    for ds, path in ct_files:
        by_series.setdefault(ds.SeriesInstanceUID, []).append(path)
    series_files = max(by_series.values(), key=len)
    first = pydicom.dcmread(series_files[0], stop_before_pixels=True)
    study, description = str(first.StudyInstanceUID), str(first.SeriesDescription)
    cors = f"https://viewer.example.org, {ohif}"
    with deployments.env(workdir, RDC_CORS_ORIGINS=cors) as env:
        handler = functools.partial(_OhifHandler, directory=str(dist))
        _OhifHandler.config = _app_config(f"http://127.0.0.1:{env['RDC_HTTP_PORT']}").encode()
        static = http.server.ThreadingHTTPServer(("127.0.0.1", ohif_port), handler)
        static.daemon_threads = True
        thread = threading.Thread(target=static.serve_forever, daemon=True)
        thread.start()
        try:
            with RdcServer(env, workdir / "serve.log") as server:
                # JPEGLSNearLossless_16 has no Modality: OHIF's study list failed on the
                # empty Modalities in Study it used to get.
                files = [p for _, p in ct_files] + [
                    testdata / "dicom" / "CT_small.dcm",
                    testdata / "dicom" / "JPEGLSNearLossless_16.dcm",
                ]
                ae = "CLINIC_A_CT"
                for result in storescu(dcmtk, files, port=server.dicom_port, calling_ae=ae):
                    assert result.returncode == 0, result.stderr
                    assert "Store Failed" not in result.stderr, result.stderr
                passwords = alliance_passwords()
                yield Deployment(server, passwords, ohif, study, len(series_files), description)
        finally:
            static.shutdown()
            static.server_close()


# ---------------------------------------------------------------------------------------
# CORS on the wire


def test_preflight_and_cors_headers(deployment: Deployment) -> None:
    http = deployment.server.http
    token = deployment.server.token("reader", deployment.passwords["reader"])
    preflight_headers = {
        "Origin": deployment.ohif,
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization,accept",
    }
    for path in ("/dicomweb/studies", f"/dicomweb/studies/{deployment.ct_study}/metadata",
                 "/api/v1/worklist"):  # fmt: skip
        preflight = httpx.options(f"{http}{path}", headers=preflight_headers)
        assert preflight.status_code == 200, (path, preflight.status_code, preflight.text)
        assert preflight.headers["access-control-allow-origin"] == deployment.ohif
        allowed = preflight.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed and "accept" in allowed
        assert "GET" in preflight.headers["access-control-allow-methods"]
        assert "access-control-allow-credentials" not in preflight.headers
    studies = httpx.get(
        f"{http}/dicomweb/studies",
        headers={"Origin": deployment.ohif, "Authorization": f"Bearer {token}"},
        timeout=HTTP_TIMEOUT,
    )
    assert studies.status_code == 200
    assert studies.headers["access-control-allow-origin"] == deployment.ohif
    # An origin not listed gets no CORS headers (the browser then refuses the answer).
    other = {**preflight_headers, "Origin": "http://evil.example"}
    refused = httpx.options(f"{http}/dicomweb/studies", headers=other)
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    # The web UI is same-origin only: no CORS there.
    page = httpx.options(f"{http}/ui/login", headers=preflight_headers)
    assert "access-control-allow-origin" not in page.headers


# ---------------------------------------------------------------------------------------
# OHIF in Chromium


def test_ohif_lists_studies_opens_a_ct_and_scrolls(deployment: Deployment) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is not installed (apt-get install chromium)")
    token = deployment.server.token("reader", deployment.passwords["reader"])
    failures: list[str] = []
    frames: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--use-gl=swiftshader"]
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("console", lambda m: failures.append(m.text) if "CORS" in m.text else None)

            def on_response(response: Any) -> None:
                if "/dicomweb/" in response.url and response.status >= 400:
                    failures.append(f"{response.status} {response.url}")
                if "/frames/" in response.url and response.status == 200:
                    frames.append(response.url)

            page.on("response", on_response)
            # OHIF takes a token from the URL on its viewer route (and keeps it for the
            # session): open the CT first, then go to the study list inside the app.
            page.goto(
                f"{deployment.ohif}/viewer?StudyInstanceUIDs={deployment.ct_study}&token={token}"
            )
            page.locator(".cornerstone-viewport-element canvas").first.wait_for(timeout=90_000)
            skip = page.get_by_text("Skip all")
            with contextlib.suppress(PlaywrightTimeoutError):
                skip.click(timeout=10_000)  # OHIF's first-visit tour
            # The CT series of several slices, into the viewport.
            page.get_by_text(deployment.ct_series_description).first.dblclick()
            overlay = page.get_by_text(f"(1/{deployment.ct_slices})")
            overlay.wait_for(timeout=60_000)
            assert frames, "no frame was fetched"
            viewport = page.locator(".cornerstone-viewport-element canvas").first
            box = viewport.bounding_box()
            assert box is not None
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            for _ in range(deployment.ct_slices - 1):
                page.mouse.wheel(0, 120)
                page.wait_for_timeout(200)
            # The overlay: "I:<instance number> (<slice>/<slices>)", now at the last slice.
            last = f"({deployment.ct_slices}/{deployment.ct_slices})"
            page.get_by_text(last).wait_for(timeout=30_000)
            page.screenshot(path=str(deployment.server.data_dir / "ohif-scrolled.png"))
            assert len(frames) >= deployment.ct_slices
            assert not failures, failures

            # The study list, in the same session: all three studies, by OHIF's QIDO-RS.
            page.evaluate(
                "() => { history.pushState({}, '', '/');"
                " dispatchEvent(new PopStateEvent('popstate')); }"
            )
            page.get_by_text("Doe, Peter").first.wait_for(timeout=60_000)
            page.get_by_text("CompressedSamples, CT1").first.wait_for(timeout=60_000)
            page.get_by_text("1-3 of 3").wait_for(timeout=30_000)
            page.screenshot(path=str(deployment.server.data_dir / "ohif-list.png"))
            assert not failures, failures
        finally:
            browser.close()
