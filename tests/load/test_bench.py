"""The benchmark suite, in its smoke form: every row is measured and reported, so the suite cannot rot. The figures
themselves are not judged here (that is what `python -m bench` and bench/RESULTS.md are for)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TEST_DATABASE

ROWS = [
    "poll GET /api/images/tasks/{id}",
    "image GET (2.0 MB PNG)",
    "image GET: RSS growth under load",
    "generate with Prefer: wait (sync)",
    "submit -> completed, p50 (one client)",
    "enhance stream: first byte after upstream's first token, p50",
    "50 concurrent enhance streams: peak RSS",
    "50 concurrent task event streams: peak RSS",
    "OpenAI facade POST /v1/images/generations (url)",
    "OpenAI facade POST /v1/images/generations (b64_json)",
    "submit POST /api/images/generate (SQLite)",
    "upstream relay, service client",
    "reference normalization, 12 MP JPEG",
    "canvas step 2048x2048 (+256 px): service CPU",
    "canvas step, first after its upload: service CPU",
    "canvas step, base read from storage: service CPU",
    "canvas step, the process's first: service CPU",
]


@pytest.mark.skipif(TEST_DATABASE != "sqlite", reason="the benchmark smoke run needs no database of the tests")
@pytest.mark.timeout(600)
def test_the_smoke_run_measures_and_reports_every_row(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--results", str(results)],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in run.stdout.splitlines()]
    measured = {row[0]: row[1] for row in cells if len(row) == 7}
    for row in ROWS:
        assert row in measured, f"{row!r} missing from:\n{run.stdout}"
        assert measured[row] != "-", f"{row!r} was not measured:\n{run.stdout}"
    # Nothing went wrong under the load: every answer was the expected one and the ledger balances.
    assert "note:" not in run.stdout, run.stdout
    written = results.read_text()
    assert "(smoke run)" in written and "| figure | service |" in written
    assert all(row in written for row in ROWS)


@pytest.mark.skipif(TEST_DATABASE != "sqlite", reason="the benchmark smoke run needs no database of the tests")
@pytest.mark.timeout(300)
def test_only_runs_the_rows_named(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--only", "normalization", "--results", str(results)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [line.split("|")[1].strip() for line in run.stdout.splitlines() if line.startswith("| ")]
    assert rows == ["figure", "reference normalization, 12 MP JPEG"]
    assert "only normalization" in results.read_text()

    unknown = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "poll,nope", "--results", str(results)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert unknown.returncode == 2
    assert "unknown rows nope" in unknown.stderr
