"""``rdc ca`` and ``rdc verify``: the CA is created once, certificates are issued and
renewed on purpose only, and ``rdc verify`` exits 0 only for an intact signed file."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.helpers import RdcServer, rdc_cli, storescu, wait_for
from tests.worklist import cms_tamper


def _foreign_ca(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Some other CA")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=10))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_ca_commands_and_verify_exit_codes(
    rdc_env: dict[str, str],
    alliance: dict[str, str],
    tmp_path: Path,
    testdata: Path,
    dcmtk: Path,
) -> None:
    created = rdc_cli(rdc_env, "ca", "init")
    assert "created" in created.stderr
    again = rdc_cli(rdc_env, "ca", "init")
    assert "exists already" in again.stderr
    issued = rdc_cli(rdc_env, "ca", "issue", "--username", "senior")
    assert "certificate for senior" in issued.stderr
    refused = rdc_cli(rdc_env, "ca", "issue", "--username", "senior", check=False)
    assert refused.returncode != 0 and "--renew" in refused.stderr
    renewed = rdc_cli(rdc_env, "ca", "issue", "--username", "senior", "--renew")
    serial = renewed.stderr.split("serial ")[1].split(",")[0].strip()
    ca_pem = tmp_path / "ca.pem"
    ca_pem.write_text(rdc_cli(rdc_env, "ca", "export").stdout)
    assert ca_pem.read_text().startswith("-----BEGIN CERTIFICATE-----")

    server = RdcServer(rdc_env, tmp_path / "serve.log")
    server.start()
    try:
        storescu(
            dcmtk,
            [testdata / "dicom" / "CT_small.dcm"],
            port=server.dicom_port,
            calling_ae="CLINIC_A_CT",
        )
        senior = server.client("senior", alliance["senior"])
        items = wait_for(
            lambda: senior.get("/api/v1/worklist").json()["items"], timeout=60, what="worklist"
        )
        exam_id = items[0]["exam_id"]
        assert senior.post(f"/api/v1/worklist/{items[0]['id']}/claim").status_code == 200
        senior.put(
            f"/api/v1/exams/{exam_id}/report",
            json={"findings": "未见异常", "impression": "正常", "quality_grade": "甲"},
        )
        report = senior.post(f"/api/v1/exams/{exam_id}/report/submit", json=senior.signing).json()
        assert report["status"] == "final"
        signature = senior.get(f"/api/v1/reports/{report['id']}").json()["signature"]
        assert signature["certificate_serial"] == serial  # the certificate the CLI issued
    finally:
        server.stop()

    # The signed files, read through the deployment's store.
    pdf = server.object_file(f"reports/{report['id']}/final.pdf")
    document = server.object_file(f"reports/{report['id']}/final.json")
    # Each rdc run costs a process start: the cases are spread over the two kinds of file.
    online = rdc_cli(rdc_env, "verify", str(pdf), check=False)
    assert online.returncode == 0 and "revocation not checked" not in online.stderr
    ok = rdc_cli(rdc_env, "verify", str(document), "--ca", str(ca_pem), check=False)
    assert ok.returncode == 0 and "valid document: signed by senior" in ok.stderr, ok.stderr
    # Offline, with only the CA certificate: revocation cannot be checked, and it says so.
    assert "revocation not checked" in ok.stderr
    wrong = rdc_cli(
        rdc_env, "verify", str(pdf), "--ca", str(_foreign_ca(tmp_path / "o.pem")), check=False
    )
    assert wrong.returncode == 1 and "does not chain" in wrong.stderr
    for good, ca_args in ((pdf, ["--ca", str(ca_pem)]), (document, [])):
        data = bytearray(good.read_bytes())
        data[len(data) // 2] ^= 0x01
        tampered = tmp_path / f"tampered{good.suffix}"
        tampered.write_bytes(bytes(data))
        bad = rdc_cli(rdc_env, "verify", str(tampered), *ca_args, check=False)
        assert bad.returncode == 1 and "NOT valid" in bad.stderr
    # Bytes of the signature container no signature covers: the SignedData version and an
    # algorithm identifier's tag.
    offsets = cms_tamper.named_offsets(pdf.read_bytes())
    for name in ("SignedData version", "digest algorithm parameters (NULL) tag"):
        tampered = tmp_path / "container.pdf"
        tampered.write_bytes(cms_tamper.change_byte(pdf.read_bytes(), offsets[name], 0x01))
        bad = rdc_cli(rdc_env, "verify", str(tampered), check=False)
        assert bad.returncode == 1 and "container was modified" in bad.stderr, (name, bad.stderr)
    junk = tmp_path / "junk.txt"
    junk.write_text("hello")
    assert rdc_cli(rdc_env, "verify", str(junk), check=False).returncode == 1
    assert rdc_cli(rdc_env, "verify", str(tmp_path / "missing.pdf"), check=False).returncode == 2
