"""Settings as data: KILN_* variables, kiln.toml, and the refusal of placeholder secrets."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from kiln.cli.main import app as cli
from kiln.settings import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No KILN_* variable or kiln.toml from the machine leaks into these tests."""
    import os

    for name in list(os.environ):
        if name.startswith("KILN_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("KILN_CONFIG_FILE", str(tmp_path / "absent.toml"))


@pytest.mark.parametrize("secret", ["change-me", "CHANGEME", " secret ", "", "kiln", "short"])
def test_a_placeholder_or_weak_secret_is_refused_outside_development(
    secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KILN_SECRET_KEY", secret)
    for env in ("production", "test"):
        monkeypatch.setenv("KILN_ENV", env)
        with pytest.raises(ValidationError, match="KILN_SECRET_KEY"):
            Settings()
    monkeypatch.setenv("KILN_ENV", "development")
    assert Settings().secret_key == secret


def test_kiln_up_refuses_to_start_with_a_placeholder_secret(tmp_path: Path) -> None:
    env = {"KILN_SECRET_KEY": "change-me", "KILN_DATA_DIR": str(tmp_path / "d")}
    result = CliRunner().invoke(cli, ["up"], env=env)
    assert result.exit_code == 2
    assert "KILN_SECRET_KEY" in result.output
    assert not (tmp_path / "d").exists(), "nothing is created before the refusal"


def test_an_unset_secret_is_generated_once_and_kept_private(tmp_path: Path) -> None:
    first = Settings(data_dir=tmp_path / "d").secret
    assert len(first) >= 32
    assert Settings(data_dir=tmp_path / "d").secret == first
    mode = stat.S_IMODE((tmp_path / "d" / "secret.key").stat().st_mode)
    assert mode == 0o600


def test_nested_settings_come_from_prefixed_variables_and_kiln_toml(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    toml = tmp_path / "kiln.toml"
    toml.write_text(
        'domain = "kiln.example.org"\n[web]\nport = 9443\n[storage]\nmax_file_bytes = 7\n'
    )
    monkeypatch.setenv("KILN_CONFIG_FILE", str(toml))
    monkeypatch.setenv("KILN_STORAGE_MAX_FILE_BYTES", "1234")
    monkeypatch.setenv("KILN_DATA_DIR", str(tmp_path / "data"))
    settings = Settings()
    assert settings.domain == "kiln.example.org"
    assert settings.web.port == 9443
    assert settings.data_dir == tmp_path / "data"
    assert settings.db_url == f"sqlite:///{(tmp_path / 'data' / 'kiln.db').resolve()}"
    # Environment beats the file, as everywhere else.
    assert settings.storage.max_file_bytes == 1234


def test_out_of_range_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_WEB_PORT", "70000")
    with pytest.raises(ValidationError, match="port"):
        Settings()
