"""Driving the real `kiln` CLI in-process against the live HTTPS server."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from kiln.cli.main import app
from kiln.testing.live import LiveServer
from tests.conftest import Account


@dataclass
class Cli:
    live: LiveServer
    config_dir: Path
    workdir: Path

    @classmethod
    def isolated(cls, live: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
        """A private config dir (KILN_CONFIG_DIR) and an empty working directory."""
        config_dir = tmp_path / "home" / "kiln"
        workdir = tmp_path / "work"
        workdir.mkdir()
        monkeypatch.setenv("KILN_CONFIG_DIR", str(config_dir))
        monkeypatch.delenv("KILN_DEBUG", raising=False)
        monkeypatch.chdir(workdir)
        return cls(live, config_dir, workdir)

    @property
    def config_file(self) -> Path:
        return self.config_dir / "config.json"

    def run(self, *args: str, input: str | None = None) -> Result:
        result = CliRunner().invoke(app, list(args), input=input)
        # Whatever happens, a user never sees a traceback.
        assert "Traceback" not in result.output, result.output
        if result.exit_code not in (0, 1, 2):
            raise AssertionError(f"exit {result.exit_code}: {result.output}") from (
                result.exception
            )
        return result

    def ok(self, *args: str, input: str | None = None) -> Result:
        result = self.run(*args, input=input)
        assert result.exit_code == 0, result.output
        return result

    def fails(self, *args: str, input: str | None = None, code: int = 1) -> str:
        """Run a command that must fail; returns its stderr."""
        result = self.run(*args, input=input)
        assert result.exit_code == code, result.output
        return result.stderr

    def login(self, account: Account, *extra: str) -> Result:
        return self.ok(
            "login",
            self.live.url,
            "--username",
            account.username,
            "--ca-file",
            str(self.live.ca_file),
            *extra,
            input=f"{account.password}\n",
        )
