"""What a test deployment's database costs to set up: migrated from scratch (and, for a
server, seeded by seed_alliance in a subprocess), as the suite did, against a copy of the
session's template (tests/conftest.py ``schema_templates``), side by side in one run.

    PYTHONPATH=. python bench/test_setup.py [--rounds 3] [--postgres]

Prints wall and CPU seconds (this process and its children) per deployment and the ratio.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.helpers import SchemaTemplates, postgres_database, seed_alliance


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _env(data_dir: Path, url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RDC_")}
    env.update(RDC_DATA_DIR=str(data_dir), RDC_PASSWORD_HASH_ROUNDS="4")
    if url:
        env["RDC_DATABASE_URL"] = url
    return env


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--postgres", action="store_true", help="the production pass's way")
    args = parser.parse_args()
    if args.postgres:
        os.environ["RDC_TEST_DATABASE"] = "postgresql"
    work = Path(tempfile.mkdtemp(prefix="rdc-bench-setup-"))
    templates = SchemaTemplates(work / "templates")
    templates.workdir.mkdir()
    templates.build()
    n = 0

    def fresh() -> None:  # before: an empty database, migrated and seeded per deployment
        nonlocal n
        n += 1
        data = work / f"fresh{n}"
        if args.postgres:
            with postgres_database() as url:
                seed_alliance(_env(data, url))
        else:
            seed_alliance(_env(data, None))

    def copied() -> None:  # after: a copy of the seeded template
        nonlocal n
        n += 1
        data = work / f"copy{n}"
        if args.postgres:
            with postgres_database(templates.template("seeded")):
                pass
        else:
            templates.copy_sqlite("seeded", data)

    totals = {"fresh": [0.0, 0.0], "template": [0.0, 0.0]}
    ways: list[tuple[str, Callable[[], None]]] = [("fresh", fresh), ("template", copied)]
    try:
        for _ in range(args.rounds):  # interleaved: the machine's load falls on both alike
            for name, way in ways:
                wall, cpu = time.perf_counter(), _cpu()
                way()
                totals[name][0] += time.perf_counter() - wall
                totals[name][1] += _cpu() - cpu
    finally:
        templates.close()
        shutil.rmtree(work, ignore_errors=True)
    backend = "PostgreSQL" if args.postgres else "SQLite"
    print(f"{backend}, seconds per deployment over {args.rounds} rounds (wall / CPU)")
    for name, (wall, cpu) in totals.items():
        print(f"  {name:9} {wall / args.rounds:7.2f} / {cpu / args.rounds:6.2f}")
    (fw, fc), (tw, tc) = totals["fresh"], totals["template"]
    print(f"  ratio     {fw / max(tw, 1e-9):7.1f}x / {fc / max(tc, 1e-9):5.1f}x")


if __name__ == "__main__":
    main()
