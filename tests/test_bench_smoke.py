"""Smoke test of bench/bench.py: a tiny --quick run prints every table with every row."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = (5, 20)


def test_quick_bench_prints_every_row() -> None:
    """Both sizes appear in the exporter, alternative and ratio tables, and every target is judged."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench.py"),
            "--quick",
            "--sizes",
            ",".join(map(str, SIZES)),
            "--scrape-seconds",
            "0.5",
            "--alt-scrape-seconds",
            "0.5",
            "--cycle-budget",
            "0.5",
            "--min-polls",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    sections = re.split(r"\n\n", result.stdout)
    tables = [s for s in sections if s.startswith(("Exporter", "Alternative", "Ratios"))]
    assert [t.split(" ", 1)[0] for t in tables] == ["Exporter", "Alternative:", "Ratios,"]
    for table in tables:
        lines = table.splitlines()
        header = re.split(r"\s{2,}", lines[1])
        rows = [re.split(r"\s{2,}", line) for line in lines[3:]]
        assert [row[0] for row in rows] == [str(size) for size in SIZES], table
        # Every cell has a measurement: none missing ("-") or misaligned.
        assert all(len(row) == len(header) and "-" not in row for row in rows), table
    verdicts = [line for line in result.stdout.splitlines() if re.search(r"\b(met|MISSED)\b", line)]
    assert len(verdicts) == 4, result.stdout
    # Fast rounds of failing polls would be worthless figures.
    assert "  every measured poll succeeded" in result.stdout.splitlines(), result.stdout
