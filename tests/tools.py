"""Finding the external tools some tests run (promtool, helm, prometheus, ...).

A missing tool skips the test locally and fails it when the ``CI`` environment variable is set, so
nothing silently skips in CI (``scripts/install-test-tools.sh`` installs them all).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def find_tool(name: str) -> str:
    """Path of ``name`` in ``.tools/bin``, the venv, then ``PATH``; skip (locally) / fail (CI)."""
    for candidate in (ROOT / ".tools" / "bin" / name, Path(sys.executable).parent / name):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} not found; run scripts/install-test-tools.sh"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
