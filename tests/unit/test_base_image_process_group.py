"""mmdebstrap tears down its helpers, when writing its tarball fails, with SIGHUP to its whole
process group: the builder starts it in a group of its own, so the builder (and whatever
shares the builder's group: the supervisor, the admin's shell, a test run) lives on."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from kiln.build import base_image
from kiln.build.base_image import BaseImageError, BaseRecipe

# What mmdebstrap does when creating the tarball fails (`kill HUP => -getpgrp()`), then exits 1.
FAKE_MMDEBSTRAP = """#!/bin/bash
echo "I: pretending to fetch packages" >&2
echo "W: creating tarball failed: No space left on device" >&2
kill -HUP -- -"$(ps -o pgid= -p $$ | tr -d ' ')"
exit 1
"""


def test_a_failing_mmdebstrap_hangs_up_only_its_own_process_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "mmdebstrap"
    fake.write_text(FAKE_MMDEBSTRAP)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    work = tmp_path / "work"
    work.mkdir()
    said: list[str] = []

    with pytest.raises(BaseImageError, match="creating tarball failed"):
        base_image._mmdebstrap(BaseRecipe(), tmp_path / "out.tar", work, said.append)

    # Still here: the SIGHUP did not reach this process's group.
    assert said == ["pretending to fetch packages"]
