"""The runtime contract, run against the real ``local`` runtime (bubblewrap sandboxes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.testing.runtime_contract import RuntimeContract, RuntimeFactory, local_runtime_factory


class TestLocalRuntimeContract(RuntimeContract):
    @pytest.fixture
    def runtime_factory(self, tmp_path: Path) -> RuntimeFactory:
        return local_runtime_factory(tmp_path / "state")
