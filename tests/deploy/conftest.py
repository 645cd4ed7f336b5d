"""Fixtures for the deploy tests (rules, Helm chart, Dockerfile, dashboard).

``tool(name)`` finds an external tool in ``.tools/bin``, the venv or ``PATH``. A missing tool skips
the test locally and fails it when the ``CI`` environment variable is set, so nothing silently skips
in CI (``scripts/install-test-tools.sh`` installs them all).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _find_tool(name: str) -> str:
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


@pytest.fixture
def tool() -> Callable[[str], str]:
    """Return a lookup that finds an external tool or skips (locally) / fails (under CI)."""
    return _find_tool


@pytest.fixture
def root() -> Path:
    """The repository root."""
    return ROOT
