"""``rdc catalog`` and ``rdc accreditation`` through the real command: CSV and YAML, versions,
idempotent reloads, and bad files that change nothing."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import index_db, rdc_cli

CATALOG_CSV = """\
code,discipline,name_zh,name_en,scope_mark,scope_note,valid_days,min_grade,modality,body_part
CT-CHEST,imaging,胸部CT平扫,Chest CT,HR,,180,乙,CT,CHEST
ECG-12,ecg,常规十二导联心电图,12-lead ECG,★,限本医联体内,30,,,
"""

CATALOG_YAML = """\
items:
  - code: CT-CHEST
    discipline: imaging
    name_zh: 胸部CT平扫
    scope_mark: 皖HR
    valid_days: 90
    min_grade: 甲
    match: {modality: CT, body_part: CHEST}
  - code: LAB-GLU
    discipline: lab
    name_zh: 空腹血糖
    scope_mark: 全国HR
    valid_days: 7
    match: {test_codes: [2345-7, GLU]}
"""


def _count(env: dict[str, str], table: str) -> int:
    with index_db(env) as db:
        row = db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()
        assert row is not None
        return int(row[0])


def test_catalog_and_accreditation_load_csv_and_yaml(
    rdc_env: dict[str, str], tmp_path: Path
) -> None:
    rdc_cli(rdc_env, "clinic", "add", "--code", "C1", "--name", "卫生院")

    csv_file = tmp_path / "catalog.csv"
    csv_file.write_text(CATALOG_CSV, encoding="utf-8")
    first = rdc_cli(rdc_env, "catalog", "load", str(csv_file))
    assert "catalogue version 1: 2 items" in first.stdout
    again = rdc_cli(rdc_env, "catalog", "load", str(csv_file))
    assert "unchanged" in again.stdout and "version 1" in again.stdout
    yaml_file = tmp_path / "catalog.yaml"
    yaml_file.write_text(CATALOG_YAML, encoding="utf-8")
    second = rdc_cli(rdc_env, "catalog", "load", str(yaml_file))
    assert "catalogue version 2: 2 items" in second.stdout
    assert _count(rdc_env, "recognition_catalog_versions") == 2
    assert _count(rdc_env, "recognition_catalog_items") == 4  # version 1 is kept

    listed = rdc_cli(rdc_env, "catalog", "list").stdout
    assert "LAB-GLU" in listed and "全国HR" in listed and "ECG-12" not in listed

    bad = tmp_path / "bad.csv"
    bad.write_text(CATALOG_CSV + "X-RAY,imaging,胸片,,HR,,30,丁,DX,CHEST\n", encoding="utf-8")
    failed = rdc_cli(rdc_env, "catalog", "load", str(bad), check=False)
    assert failed.returncode != 0
    assert "row 4" in failed.stderr and "min_grade" in failed.stderr
    assert _count(rdc_env, "recognition_catalog_versions") == 2

    acc_csv = tmp_path / "acc.csv"
    acc_csv.write_text(
        "org,item_code,discipline,valid_from,valid_to,note\n"
        "C1,CT-CHEST,,2026-01-01,2026-12-31,EQA 2026\n"
        "C1,,ecg,2026-01-01,2026-12-31,\n",
        encoding="utf-8",
    )
    loaded = rdc_cli(rdc_env, "accreditation", "load", str(acc_csv))
    assert "2 added, 0 updated, 0 unchanged" in loaded.stdout
    acc_yaml = tmp_path / "acc.yml"
    acc_yaml.write_text(
        "accreditations:\n"
        "  - {org: C1, item_code: CT-CHEST, valid_from: 2026-01-01, valid_to: 2027-03-31,"
        " note: EQA 2026 renewed}\n"
        "  - {org: C1, discipline: ecg, valid_from: 2026-01-01, valid_to: 2026-12-31}\n",
        encoding="utf-8",
    )
    upserted = rdc_cli(rdc_env, "accreditation", "load", str(acc_yaml))
    assert "0 added, 1 updated, 1 unchanged" in upserted.stdout
    with index_db(rdc_env) as db:
        rows = db.execute(
            "SELECT item_code, valid_to, note FROM recognition_accreditations ORDER BY item_code"
        ).fetchall()
    assert [(r[0], str(r[1]), r[2]) for r in rows] == [
        ("", "2026-12-31", ""),
        ("CT-CHEST", "2027-03-31", "EQA 2026 renewed"),
    ]

    bad_acc = tmp_path / "bad_acc.yaml"
    bad_acc.write_text(
        "- {org: C1, discipline: lab, valid_from: 2026-01-01, valid_to: 2026-12-31}\n"
        "- {org: NOWHERE, discipline: lab, valid_from: 2026-01-01, valid_to: 2026-12-31}\n",
        encoding="utf-8",
    )
    refused = rdc_cli(rdc_env, "accreditation", "load", str(bad_acc), check=False)
    assert refused.returncode != 0
    assert "entry 2" in refused.stderr and "NOWHERE" in refused.stderr
    assert _count(rdc_env, "recognition_accreditations") == 2  # entry 1 was not kept either

    unknown = tmp_path / "catalog.txt"
    unknown.write_text(CATALOG_CSV, encoding="utf-8")
    no_format = rdc_cli(rdc_env, "catalog", "load", str(unknown), check=False)
    assert no_format.returncode != 0 and "--format" in no_format.stderr
