"""A pytest plugin: one JSON line per test outcome, appended and flushed as each test ends, so a run that is cut
off (a GPU window running out) still leaves every result it reached. ``pytest -p tests.jsonl_report --jsonl FILE``
(benchmarks/gpu_check.sh)."""

from __future__ import annotations

import json
from typing import Any


_TARGET: dict[str, str | None] = {"path": None}


def pytest_addoption(parser: Any) -> None:
    parser.addoption("--jsonl", metavar="FILE", help="append one JSON line per test outcome to FILE")


def pytest_configure(config: Any) -> None:
    _TARGET["path"] = config.getoption("--jsonl")


def pytest_runtest_logreport(report: Any) -> None:
    path = _TARGET["path"]
    if path is None or not (report.when == "call" or report.outcome != "passed"):
        return  # a test's call phase, or a setup/teardown that did not pass (an error or a skip)
    line = {
        "test": report.nodeid,
        "phase": report.when,
        "outcome": report.outcome,
        "seconds": round(report.duration, 2),
    }
    if report.outcome != "passed":
        line["detail"] = str(report.longrepr).splitlines()[-1][:300] if report.longrepr else ""
    with open(path, "a") as handle:
        handle.write(json.dumps(line) + "\n")
