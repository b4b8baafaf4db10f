"""A short run of the soak benchmark (`python -m bench.soak`): both protocols, faults on, nothing lost or doubled."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_short_soak_over_both_protocols() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--tasks", "120", "--fault-rate", "0.3", "--timeout", "120"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=400,
    )
    output = result.stdout
    assert result.returncode == 0, output + result.stderr
    assert output.count("lost credits:      0") == 2
    assert output.count("doubled credits:   0") == 2
    assert output.count("unfinished:        0") == 2
    injected = int(re.search(r"^total:\s+(\d+)$", output, re.MULTILINE).group(1))  # type: ignore[union-attr]
    assert injected > 10
    expected = re.findall(r"balance expected:\s+(\d+)", output)
    actual = re.findall(r"balance actual:\s+(\d+)", output)
    assert expected == actual and len(expected) == 2
