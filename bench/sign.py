"""Render and sign a realistic report N times; print the median and p95 in milliseconds.

Runs on a fresh SQLite data directory (a temporary one unless --data-dir is given): the
alliance CA and the reader's certificate are created first (the first signature also pays
for loading the CJK font, reported apart). Each measured iteration is what a reader's
"sign" costs inside the request: build the canonical document, sign it, render the A4 PDF,
PAdES-sign it, store both artefacts and index them.

    python bench/sign.py --count 50 [--pdf-out sample.pdf]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and bench/worklist.py would shadow
# the worklist package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--pdf-out", type=Path, default=None, help="keep one signed PDF here")
    args = parser.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="rdc-bench-sign-"))
    for key in [k for k in os.environ if k.startswith("RDC_")]:
        del os.environ[key]
    os.environ["RDC_DATA_DIR"] = str(data_dir)

    from dicom_gateway.records import InstanceHeader, record_instance
    from rdc_core.db import session_scope, utcnow
    from rdc_core.migrate import upgrade_database
    from worklist.directory import add_organization, add_user, principal_for_user
    from worklist.models import (
        Exam,
        OrgKind,
        Priority,
        QualityGrade,
        ReaderLevel,
        Report,
        ReportStatus,
        Role,
    )
    from worklist.signing.pki import init_ca, issue_certificate
    from worklist.signing.service import get_signed_artifact, sign_final_report

    upgrade_database()
    now = utcnow()
    with session_scope() as s:
        add_organization(s, code="LEAD", name="省立医院远程诊断中心", kind=OrgKind.LEAD)
        clinic = add_organization(s, code="C1", name="城东社区卫生服务中心", kind=OrgKind.CLINIC)
        user = add_user(
            s,
            username="wang",
            password="bench-password-1",
            role=Role.READER,
            org_code="LEAD",
            level=ReaderLevel.ATTENDING,
            display_name="王建国",
        )
        principal = principal_for_user(user)
        for n in range(1, 121):  # a chest CT series: 120 objects hashed into the document
            record_instance(
                s,
                header=InstanceHeader(
                    sop_instance_uid=f"1.2.826.0.1.9.1.{n}",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    study_instance_uid="1.2.826.0.1.9",
                    series_instance_uid="1.2.826.0.1.9.1",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    patient_id="3401001",
                    patient_name="张^三",
                    modality="CT",
                    body_part="CHEST",
                    priority=Priority.ROUTINE,
                ),
                org_id=clinic.id,
                org_code=clinic.code,
                storage_key=f"bench/{n}",
                size_bytes=524_288,
                sha256=f"{n:064x}",
                calling_ae="C1_CT",
                now=now - timedelta(minutes=30),
            )
        init_ca(s, now=now)
        issue_certificate(s, username="wang", now=now)
    findings = (
        "胸廓对称，气管居中。双肺纹理清晰，右肺上叶尖段见一磨玻璃结节，大小约6mm×5mm，"
        "边界清楚。纵隔内未见肿大淋巴结。心影大小形态正常。双侧胸膜未见增厚，胸腔未见积液。\n"
    ) * 3
    recognition = {
        "granted": True,
        "mark": "HR",
        "scope": "皖HR",
        "recognizable_until": "2027-06-30",
        "items": [{"code": "CT-CHEST", "name": "胸部CT平扫"}],
        "reasons": ["item in catalogue", "accreditation valid", "grade 甲 meets 乙"],
    }

    timings: list[float] = []
    first_ms = 0.0
    report_id = ""
    for i in range(args.count + 1):
        with session_scope() as s:
            exam = s.query(Exam).one()
            report = Report(
                id=f"bench-report-{i:04d}",
                exam_id=exam.id,
                version=i + 1,
                status=ReportStatus.FINAL,
                findings=findings,
                impression="右肺上叶磨玻璃结节，建议3个月后复查。",
                recommendation="随访复查胸部CT。",
                structured={},
                quality_grade=QualityGrade.A,
                quality_reason="",
                critical=False,
                key_images=[{"sop_instance_uid": "1.2.826.0.1.9.1.60", "frame": 1}],
                author_id=principal.user_id,
                author_level=ReaderLevel.ATTENDING,
                created_at=now,
                updated_at=now,
                submitted_at=now,
                final_at=now,
                revision=1,
            )
            s.add(report)
            s.flush()
            started = time.perf_counter()
            sign_final_report(
                s, report=report, exam=exam, signer=principal, recognition=recognition, now=utcnow()
            )
            elapsed = (time.perf_counter() - started) * 1000
            report_id = report.id
        if i == 0:
            first_ms = elapsed  # font loading and key decryption: once per process
        else:
            timings.append(elapsed)
    if args.pdf_out:
        with session_scope() as s:
            args.pdf_out.write_bytes(get_signed_artifact(s, report_id=report_id, kind="pdf"))
    timings.sort()
    p95 = timings[min(len(timings) - 1, round(0.95 * (len(timings) - 1)))]
    print(f"render + sign, {len(timings)} reports (first, cold: {first_ms:.0f} ms)")
    print(
        f"median {statistics.median(timings):.1f} ms   p95 {p95:.1f} ms   max {timings[-1]:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
