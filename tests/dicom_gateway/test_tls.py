"""DICOM TLS on the listener (RDC_DICOM_TLS_PORT): dcmtk's ``storescu +tls`` with a client
certificate of the calling AE's clinic is served; one of another clinic, one from another
CA, or none at all are refused; TLS 1.1 is refused; the plain port keeps working, and
C-FIND works over TLS (pynetdicom). A C-MOVE to a destination registered as TLS
(``--dicom-tls-destination``) reaches it over TLS with the centre's certificate. The
deployment runs two listener processes: TLS associations count in the same per-AE limit
as the plain ones. Certificates are made here with ``cryptography``.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import socketserver
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydicom.dataset import Dataset
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from dicom_gateway.report_push import report_instance_uids
from rdc_core.db import utcnow
from tests.helpers import (
    Deployments,
    RdcServer,
    c_store,
    echoscu,
    free_port,
    rdc_cli,
    wait_for,
)
from tests.worklist.conftest import Reading, reading  # noqa: F401  (fixture)
from tests.worklist.test_delivery import add_clinic_endpoint, finalize
from worklist.delivery.tasks import deliver_due_reports


@dataclass(frozen=True)
class Issued:
    key: Path
    cert: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(
    folder: Path, stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> Issued:
    key_path, cert_path = folder / f"{stem}.key", folder / f"{stem}.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Issued(key_path, cert_path)


class CA:
    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.issued = _write(folder, name, self.key, self.cert)

    def issue(self, cn: str, *, server: bool = False, client: bool | None = None) -> Issued:
        """A leaf certificate; ``server`` adds the SAN and serverAuth, ``client`` (default:
        not ``server``) clientAuth."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        usages = []
        if server:
            usages.append(x509.oid.ExtendedKeyUsageOID.SERVER_AUTH)
        if client if client is not None else not server:
            usages.append(x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return _write(self.folder, cn, key, cert)


@dataclass
class TlsDeployment:
    server: RdcServer
    tls_port: int
    ca: CA
    certs: dict[str, Issued]


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, deployments: Deployments
) -> Iterator[TlsDeployment]:
    workdir = tmp_path_factory.mktemp("tls")
    ca = CA(workdir, "RDC_TEST_CA")
    other_ca = CA(workdir, "OTHER_CA")
    certs = {
        # The centre's certificate serves the TLS port and is presented to TLS move
        # destinations and push-back peers.
        "server": ca.issue("rdc-centre", server=True, client=True),
        "CLINIC_A": ca.issue("CLINIC_A"),
        "CLINIC_B": ca.issue("CLINIC_B"),
        "forged_A": other_ca.issue("FORGED_CLINIC_A"),
    }
    tls_port = free_port()
    with (
        deployments.env(
            workdir,
            RDC_STABLE_AGE_SECONDS=None,
            RDC_DICOM_TLS_PORT=str(tls_port),
            RDC_DICOM_TLS_CERT=str(certs["server"].cert),
            RDC_DICOM_TLS_KEY=str(certs["server"].key),
            RDC_DICOM_TLS_CA=str(ca.issued.cert),
            RDC_DICOM_PROCESSES="2",
            RDC_DICOM_MAX_ASSOCIATIONS_PER_AE="2",
        ) as env,
        # The TLS listener's answers, C-FIND and C-MOVE of rdc serve: no rdc worker and beat
        # on the production pass (the push-backs run in this process: deliver_due_reports).
        RdcServer(env, workdir / "serve.log", workers=False) as server,
    ):
        yield TlsDeployment(server, tls_port, ca, certs)


def _storescu_tls(
    d: TlsDeployment, dcmtk: Path, testdata: Path, ae: str, cert: Issued | None
) -> subprocess.CompletedProcess[str]:
    tls = ["+tls", str(cert.key), str(cert.cert)] if cert else ["+tla"]
    return subprocess.run(
        [
            str(dcmtk / "storescu"),
            *tls,
            "+cf",
            str(d.ca.issued.cert),
            "-aet",
            ae,
            "-aec",
            "RDC",
            "127.0.0.1",
            str(d.tls_port),
            str(testdata / "dicom" / "CT_small.dcm"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_storescu_tls_with_the_clinics_certificate(
    deployment: TlsDeployment, dcmtk: Path, testdata: Path
) -> None:
    result = _storescu_tls(deployment, dcmtk, testdata, "CLINIC_A_CT", deployment.certs["CLINIC_A"])
    assert result.returncode == 0, result.stderr
    assert "Store Failed" not in result.stderr
    with deployment.server.db() as db:
        row = db.execute(
            "SELECT i.calling_ae FROM instances i JOIN exams e ON e.id = i.exam_id"
        ).fetchone()
    assert row is not None and row[0] == "CLINIC_A_CT"


def test_refused_certificates(deployment: TlsDeployment, dcmtk: Path, testdata: Path) -> None:
    d = deployment
    # Clinic B's certificate with clinic A's AE title: the association is rejected.
    result = _storescu_tls(d, dcmtk, testdata, "CLINIC_A_CT", d.certs["CLINIC_B"])
    assert result.returncode != 0
    assert "Association Rejected" in result.stderr + result.stdout, result.stderr
    # A certificate from another CA, and none at all: the handshake fails.
    for cert in (d.certs["forged_A"], None):
        result = _storescu_tls(d, dcmtk, testdata, "CLINIC_A_CT", cert)
        assert result.returncode != 0
        assert "Association Accepted" not in result.stderr + result.stdout
    # The plain listener is untouched, and the TLS one keeps serving.
    assert echoscu(dcmtk, d.server.dicom_port, "CLINIC_B_MR").returncode == 0
    again = _storescu_tls(d, dcmtk, testdata, "CLINIC_A_DR", d.certs["CLINIC_A"])
    assert again.returncode == 0, again.stderr


def test_old_tls_versions_refused(deployment: TlsDeployment) -> None:
    d = deployment
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(d.ca.issued.cert))
    context.load_cert_chain(str(d.certs["CLINIC_A"].cert), str(d.certs["CLINIC_A"].key))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with (
        socket.create_connection(("127.0.0.1", d.tls_port), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        cipher = tls.cipher()
        assert cipher is not None and ("GCM" in cipher[0] or "CHACHA20" in cipher[0])
    # A client offering TLS 1.2 with CBC-only suites finds nothing in common.
    weak = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    weak.check_hostname = False
    weak.verify_mode = ssl.CERT_NONE
    weak.maximum_version = ssl.TLSVersion.TLSv1_2
    weak.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:AES128-SHA")
    weak.load_cert_chain(str(d.certs["CLINIC_A"].cert), str(d.certs["CLINIC_A"].key))
    with (
        socket.create_connection(("127.0.0.1", d.tls_port), timeout=30) as raw,
        pytest.raises(ssl.SSLError),
    ):
        weak.wrap_socket(raw, server_hostname="127.0.0.1")


def test_find_over_tls(deployment: TlsDeployment) -> None:
    d = deployment
    context = ssl.create_default_context(cafile=str(d.ca.issued.cert))
    context.load_cert_chain(str(d.certs["CLINIC_A"].cert), str(d.certs["CLINIC_A"].key))
    ae = AE(ae_title="CLINIC_A_CT")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", d.tls_port, ae_title="RDC", tls_args=(context, "127.0.0.1"))
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    results = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
    assoc.release()
    assert int(results[-1][0].Status) == 0x0000


# ---------------------------------------------------------------------------------------
# Push-backs over TLS: an endpoint added with tls=True (``rdc delivery endpoint add --tls``)


class TlsMllpReceiver:
    """An HIS answering AA over MLLP inside TLS; keeps the messages."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.messages: list[str] = []
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with context.wrap_socket(self.request, server_side=True) as tls:
                    buffer = b""
                    while b"\x1c\x0d" not in buffer:
                        chunk = tls.recv(65536)
                        if not chunk:
                            return
                        buffer += chunk
                    text = buffer[buffer.index(b"\x0b") + 1 : buffer.index(b"\x1c")].decode()
                    outer.messages.append(text)
                    control = text.split("\r")[0].split("|")[9]
                    ack = f"MSH|^~\\&|HIS|C1|RDC|LEAD|20261201120000||ACK|A{control}|P|2.5.1\r"
                    ack += f"MSA|AA|{control}"
                    tls.sendall(b"\x0b" + ack.encode() + b"\r\x1c\x0d")

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def test_report_push_backs_over_tls(
    reading: Reading,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dicom_gateway.report_push
    import lab_results.report_push
    from rdc_core.settings import reset_settings

    ca = CA(tmp_path, "PUSH_CA")
    peer = ca.issue("clinic-systems", server=True)
    centre = ca.issue("rdc-centre")
    monkeypatch.setenv("RDC_DICOM_TLS_CA", str(ca.issued.cert))
    monkeypatch.setenv("RDC_DICOM_TLS_CERT", str(centre.cert))
    monkeypatch.setenv("RDC_DICOM_TLS_KEY", str(centre.key))
    reset_settings()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.minimum_version = ssl.TLSVersion.TLSv1_2
    server_context.load_cert_chain(str(peer.cert), str(peer.key))
    # Both receivers require the centre's client certificate from the same CA.
    server_context.load_verify_locations(str(ca.issued.cert))
    server_context.verify_mode = ssl.CERT_REQUIRED

    received: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        received.append(event.dataset)
        return 0x0000

    scp = AE(ae_title="CLINIC_PACS")
    scp.add_supported_context(EncapsulatedPDFStorage, [ExplicitVRLittleEndian])
    pacs = scp.start_server(
        ("127.0.0.1", 0),
        block=False,
        ssl_context=server_context,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    his = TlsMllpReceiver(server_context)
    try:
        pacs_port = int(pacs.server_address[1])
        add_clinic_endpoint(ae_title="CLINIC_PACS", port=pacs_port, tls=True)
        add_clinic_endpoint(
            channel="hl7", port=his.port, receiving_application="HIS", tls=True, name="his"
        )
        report_id = finalize(reading)
        run = deliver_due_reports(now=utcnow())
        assert len(run.delivered) == 2 and not run.failed, run
        assert len(received) == 1
        assert received[0].SOPInstanceUID == report_instance_uids(report_id)[1]
        assert len(his.messages) == 1 and "ORU^R01" in his.messages[0]
    finally:
        pacs.shutdown()
        his.stop()
        reset_settings()
    assert dicom_gateway.report_push and lab_results.report_push


def _tls_client(d: TlsDeployment, clinic: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(d.ca.issued.cert))
    context.load_cert_chain(str(d.certs[clinic].cert), str(d.certs[clinic].key))
    return context


def test_move_to_a_tls_destination(deployment: TlsDeployment, dcmtk: Path, testdata: Path) -> None:
    """A destination registered with --dicom-tls-destination is reached over TLS (the
    destination requires the centre's certificate); the same peer registered as plain is
    not reached."""
    d = deployment
    peer = d.ca.issue("clinic-pacs", server=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(peer.cert), str(peer.key))
    context.load_verify_locations(str(d.ca.issued.cert))
    context.verify_mode = ssl.CERT_REQUIRED
    received: list[Dataset] = []
    presented: list[str] = []

    def on_store(event: evt.Event) -> int:
        sock = event.assoc.dul.socket.socket
        presented.append(str(dict(x[0] for x in sock.getpeercert()["subject"])["commonName"]))
        received.append(event.dataset)
        return 0x0000

    scp = AE(ae_title="A_TLS")
    scp.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])
    pacs = scp.start_server(
        ("127.0.0.1", 0),
        block=False,
        ssl_context=context,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    try:
        port = int(pacs.server_address[1])
        rdc_cli(
            d.server.env,
            "clinic",
            "add",
            "--code",
            "CLINIC_A",
            "--update",
            "--dicom-tls-destination",
            f"A_TLS@127.0.0.1:{port}",
            "--dicom-destination",
            f"A_PLAIN@127.0.0.1:{port}",
        )
        ds = pydicom.dcmread(testdata / "dicom" / "CT_small.dcm")
        ds.StudyInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        assert c_store(d.server.dicom_port, ds, calling_ae="CLINIC_A_CT") == 0

        def move(destination: str) -> str:
            result = subprocess.run(
                [
                    str(dcmtk / "movescu"),
                    "-S",
                    "-v",
                    "-aet",
                    "CLINIC_A_CT",
                    "-aec",
                    "RDC",
                    "-aem",
                    destination,
                    "-k",
                    "QueryRetrieveLevel=STUDY",
                    "-k",
                    f"StudyInstanceUID={ds.StudyInstanceUID}",
                    "127.0.0.1",
                    str(d.server.dicom_port),
                ],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            return result.stdout + result.stderr

        output = move("A_TLS")
        assert "Received Final Move Response (Success)" in output, output
        assert [r.SOPInstanceUID for r in received] == [ds.SOPInstanceUID]
        assert presented == ["rdc-centre"]
        received.clear()
        output = move("A_PLAIN")
        assert "Final Move Response (Refused: OutOfResourcesSubOperations)" in output, output
        assert received == []
    finally:
        pacs.shutdown()


def test_tls_associations_count_in_the_per_ae_limit(deployment: TlsDeployment) -> None:
    """Two listener processes, at most 2 associations per AE title: TLS associations (served
    in the parent) and plain ones (in the listener processes) share one count."""
    d = deployment
    ae = AE(ae_title="CLINIC_A_DR")
    ae.add_requested_context(Verification)
    tls_args = (_tls_client(d, "CLINIC_A"), "127.0.0.1")
    held = [ae.associate("127.0.0.1", d.server.dicom_port, ae_title="RDC") for _ in range(2)]
    tls = None
    try:
        assert all(a.is_established for a in held)
        over = ae.associate("127.0.0.1", d.tls_port, ae_title="RDC", tls_args=tls_args)
        assert over.is_rejected, "a third association of the AE title over TLS was accepted"
        held.pop().release()

        def tls_accepted() -> bool:
            nonlocal tls
            tls = ae.associate("127.0.0.1", d.tls_port, ae_title="RDC", tls_args=tls_args)
            return tls.is_established

        # The slot comes back when the listener process has told the parent.
        wait_for(tls_accepted, timeout=30, what="a TLS association once a slot is free")
        plain = ae.associate("127.0.0.1", d.server.dicom_port, ae_title="RDC")
        if not plain.is_rejected:  # what happened, for a failure seen once on a loaded machine
            log = d.server.log_path.read_text(errors="replace")[-4000:]
            raise AssertionError(
                "a plain association over the limit beside a TLS one: "
                f"established={plain.is_established} aborted={plain.is_aborted}, "
                f"held still established={held[0].is_established}; server log:\n{log}"
            )
        assert tls is not None and tls.send_c_echo().Status == 0x0000
    finally:
        for assoc in [*held, tls]:
            if assoc is not None and assoc.is_established:
                assoc.release()
        ae.shutdown()
