"""Opt-in CPU accounting of the test suite, per test module (RDC_TEST_CPU_REPORT=path).

Off unless RDC_TEST_CPU_REPORT names a file: tests/conftest.py registers the plugin only
then, so a normal run pays nothing. Each pytest process (each xdist worker) appends JSON
lines to ``path``: one per test module with its wall time, the CPU seconds of the pytest
process (RUSAGE_SELF) and of its reaped child processes (RUSAGE_CHILDREN: ``rdc serve``,
``rdc worker``, ``rdc beat``, the CLI, dcmtk; every helper waits for what it starts), and
how many processes of each kind the module started; the setup of session fixtures (the
schema templates, the S3 server) and the S3 server's own CPU (reaped when the session
ends) are lines of their own. ``python3 -m tests.cpu_report path`` sums them up.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def _cpu() -> tuple[float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def _kind(args: Any) -> str:
    """What a started process is: the rdc command it runs, or the program's name."""
    argv = [str(a) for a in args] if isinstance(args, list | tuple) else [str(args)]
    if argv[0] == sys.executable or Path(argv[0]).name.startswith("python"):
        if "web.cli" in argv:
            rest = argv[argv.index("web.cli") + 1 :]
            return f"rdc {rest[0]}" if rest else "rdc"
        return "python"
    return Path(argv[0]).name


_current: CpuReport | None = None


def current() -> CpuReport | None:
    """This process's CpuReport, if the run accounts CPU."""
    return _current


class CpuReport:
    def __init__(self, path: str) -> None:
        global _current
        _current = self
        self.path = path
        self.worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        self.modules: dict[str, dict[str, Any]] = defaultdict(
            lambda: {"wall": 0.0, "self": 0.0, "children": 0.0, "tests": 0, "procs": Counter()}
        )
        self.order: list[str] = []
        self.current: str | None = None
        self.session_fixtures = [0.0, 0.0, 0.0]  # wall, self, children
        self._depth = 0
        self._orig_execute = subprocess.Popen._execute_child  # type: ignore[attr-defined]
        report = self

        def execute_child(popen: Any, args: Any, *rest: Any, **kw: Any) -> Any:
            if report.current is not None:
                report.modules[report.current]["procs"][_kind(args)] += 1
            return report._orig_execute(popen, args, *rest, **kw)

        subprocess.Popen._execute_child = execute_child  # type: ignore[attr-defined]

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Iterator[None]:
        module = item.nodeid.split("::", 1)[0]
        if module not in self.modules:
            self.order.append(module)
        self.current = module
        before = self.session_fixtures.copy()
        wall0, (self0, child0) = time.monotonic(), _cpu()
        yield
        wall1, (self1, child1) = time.monotonic(), _cpu()
        spent = [b - a for a, b in zip(before, self.session_fixtures, strict=True)]
        entry = self.modules[module]
        entry["wall"] += wall1 - wall0 - spent[0]
        entry["self"] += self1 - self0 - spent[1]
        entry["children"] += child1 - child0 - spent[2]
        entry["tests"] += 1

    @pytest.hookimpl(hookwrapper=True)
    def pytest_fixture_setup(self, fixturedef: pytest.FixtureDef[Any]) -> Iterator[None]:
        outer = fixturedef.scope == "session" and self._depth == 0
        if fixturedef.scope == "session":
            self._depth += 1
        wall0, (self0, child0) = time.monotonic(), _cpu()
        try:
            yield
        finally:
            if fixturedef.scope == "session":
                self._depth -= 1
            if outer:
                wall1, (self1, child1) = time.monotonic(), _cpu()
                for i, delta in enumerate((wall1 - wall0, self1 - self0, child1 - child0)):
                    self.session_fixtures[i] += delta

    def s3_stopped(self, wall: float, own: float, children: float) -> None:
        """The session's S3 server was stopped (and reaped): its CPU, out of the module."""
        for i, delta in enumerate((wall, own, children)):
            self.session_fixtures[i] += delta

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        subprocess.Popen._execute_child = self._orig_execute  # type: ignore[attr-defined]
        own, children = _cpu()
        if self.worker == "main" and getattr(session.config.option, "numprocesses", None):
            # The xdist controller: its children are the workers, which write their own.
            children = 0.0
        lines = [
            {
                "worker": self.worker,
                "module": module,
                "wall": round(entry["wall"], 2),
                "self": round(entry["self"], 2),
                "children": round(entry["children"], 2),
                "tests": entry["tests"],
                "procs": dict(entry["procs"]),
            }
            for module, entry in ((m, self.modules[m]) for m in self.order)
        ]
        wall, own_fx, child_fx = self.session_fixtures
        lines.append(
            {
                "worker": self.worker,
                "module": "(session fixtures, S3 server)",
                "wall": round(wall, 2),
                "self": round(own_fx, 2),
                "children": round(child_fx, 2),
                "tests": 0,
                "procs": {},
            }
        )
        # Whole process, for the sum: collection, imports and whatever the lines above miss.
        lines.append(
            {
                "worker": self.worker,
                "module": "(process total)",
                "wall": 0.0,
                "self": round(own, 2),
                "children": round(children, 2),
                "tests": 0,
                "procs": {},
            }
        )
        with open(self.path, "a", encoding="utf-8") as out:
            out.write("".join(json.dumps(line) + "\n" for line in lines))


def summarize(path: str, top: int = 0) -> None:
    per_module: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"wall": 0.0, "self": 0.0, "children": 0.0, "tests": 0, "procs": Counter()}
    )
    totals = [0.0, 0.0]
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = json.loads(raw)
        if line["module"] == "(process total)":
            totals[0] += line["self"]
            totals[1] += line["children"]
            continue
        entry = per_module[line["module"]]
        for key in ("wall", "self", "children", "tests"):
            entry[key] += line[key]
        entry["procs"].update(line["procs"])
    ranked = sorted(per_module.items(), key=lambda kv: -(kv[1]["self"] + kv[1]["children"]))
    print(f"{'module':60} {'tests':>5} {'wall':>7} {'self':>7} {'child':>7} {'cpu':>7}  procs")
    accounted = 0.0
    for n, (module, e) in enumerate(ranked):
        cpu = e["self"] + e["children"]
        accounted += cpu
        if top and n >= top:
            continue
        procs = " ".join(f"{k}={v}" for k, v in sorted(e["procs"].items()))
        print(
            f"{module[-60:]:60} {e['tests']:5d} {e['wall']:7.1f} {e['self']:7.1f} "
            f"{e['children']:7.1f} {cpu:7.1f}  {procs}"
        )
    print(f"modules+session fixtures: {accounted:.1f} s CPU")
    print(
        f"pytest processes: self {totals[0]:.1f} + children {totals[1]:.1f} = "
        f"{sum(totals):.1f} s CPU"
    )


if __name__ == "__main__":
    summarize(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
