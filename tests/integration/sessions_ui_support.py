"""Shared by the sessions UI, CLI and browser tests (no tests here)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.settings import Settings


@pytest.fixture(autouse=True)
def short_runner_state_dir(settings: Settings) -> Iterator[None]:
    """The sandboxes' state, with their network's Unix socket (whose path must stay under 108
    bytes), in a short directory: pytest's tmp_path for a long test name is too deep.
    Autouse, so that it is set before the ``runner`` fixture starts the runner."""
    path = Path(tempfile.mkdtemp(prefix="kiln-t-"))
    settings.runner.state_dir = path
    yield
    shutil.rmtree(path, ignore_errors=True)
