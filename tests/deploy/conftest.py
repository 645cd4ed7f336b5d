"""Fixtures for the deploy tests (rules, Helm chart, Dockerfile, dashboard).

``tool(name)`` finds an external tool in ``.tools/bin``, the venv or ``PATH``. A missing tool skips
the test locally and fails it when the ``CI`` environment variable is set, so nothing silently skips
in CI (``scripts/install-test-tools.sh`` installs them all).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.tools import ROOT, find_tool


@pytest.fixture
def tool() -> Callable[[str], str]:
    """Return a lookup that finds an external tool or skips (locally) / fails (under CI)."""
    return find_tool


@pytest.fixture
def root() -> Path:
    """The repository root."""
    return ROOT
