"""The SDK's and CLI's pure parts: URLs, paths, problem bodies, the private login file."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import httpx
import pytest
import typer

from kiln.cli.remote import ProjectRef, human_size, parse_project_ref
from kiln.sdk import KilnAPIError, KilnSDKError, NotLoggedIn, SavedLogin
from kiln.sdk import config as config_module
from kiln.sdk.client import _file_path, normalize_url, raise_for_problem, remote_basename
from kiln.sdk.config import forget_login, load_login, save_login

LOGIN = SavedLogin(url="https://kiln.test/", api_key="kiln_secret", key_id=3, username="alice")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("localhost:8443", "https://localhost:8443/"),
        ("https://kiln.example.com", "https://kiln.example.com/"),
        (" https://kiln.example.com/base/ ", "https://kiln.example.com/base/"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080/"),
    ],
)
def test_normalize_url(given: str, expected: str) -> None:
    assert normalize_url(given) == expected


@pytest.mark.parametrize("bad", ["", "   ", "ftp://host", "https://"])
def test_normalize_url_refuses_non_urls(bad: str) -> None:
    with pytest.raises(KilnSDKError):
        normalize_url(bad)


def test_project_refs() -> None:
    assert parse_project_ref("alice/demo") == ProjectRef("alice", "demo")
    assert str(parse_project_ref("data-team/churn.v2")) == "data-team/churn.v2"
    for bad in ("demo", "alice/", "/demo", "a/b/c", "Alice/demo", "alice/de mo", "api/x"):
        with pytest.raises(typer.BadParameter):
            parse_project_ref(bad)


def test_file_paths_are_encoded_segment_by_segment() -> None:
    assert _file_path("/dir/a b#?.txt") == "dir/a%20b%23%3F.txt"
    assert _file_path("data/") == "data"
    assert _file_path("") == ""
    # Dot segments must survive the HTTP client so that the server sees (and refuses) them.
    assert _file_path("../x") == "%2E%2E/x"
    assert _file_path("a/./b") == "a/%2E/b"
    assert _file_path("%2e%2e/x") == "%252e%252e/x"
    assert httpx.URL("https://h/api/" + _file_path("a/../../x")).path == "/api/a/../../x"


def test_remote_basename() -> None:
    assert remote_basename("models/w.bin") == "w.bin"
    assert remote_basename("data/") == "data"
    for bad in ("", "/", "a/.."):
        with pytest.raises(KilnSDKError):
            remote_basename(bad)


def _response(status: int, body: bytes, content_type: str) -> httpx.Response:
    request = httpx.Request("GET", "https://kiln.test/api/v1/x")
    return httpx.Response(
        status, content=body, headers={"content-type": content_type}, request=request
    )


def test_problem_bodies_keep_the_servers_words() -> None:
    problem = json.dumps({"title": "Not found", "status": 404, "detail": "project a/b not found"})
    with pytest.raises(KilnAPIError) as info:
        raise_for_problem(_response(404, problem.encode(), "application/problem+json"))
    assert (info.value.status, info.value.title, info.value.detail) == (
        404,
        "Not found",
        "project a/b not found",
    )
    assert str(info.value) == "404 Not found: project a/b not found"


def test_non_problem_errors_still_say_something_useful() -> None:
    with pytest.raises(KilnAPIError) as info:
        raise_for_problem(_response(502, b"<html><body>Bad gateway</body></html>", "text/html"))
    assert (info.value.status, info.value.title, info.value.detail) == (
        502,
        "Bad Gateway",
        "HTTP 502",
    )
    with pytest.raises(KilnAPIError) as info:
        raise_for_problem(_response(503, b"upstream is restarting", "text/plain"))
    assert info.value.detail == "upstream is restarting"
    with pytest.raises(KilnAPIError) as info:
        raise_for_problem(_response(500, b"{not json", "application/json"))
    assert info.value.detail == "{not json"
    raise_for_problem(_response(204, b"", "text/plain"))  # success: nothing raised


# ---- the login file ---------------------------------------------------------------------------


def test_login_file_round_trip(tmp_path: Path) -> None:
    directory = tmp_path / "kiln"
    path = save_login(LOGIN, directory)
    assert path == directory / "config.json"
    assert load_login(directory) == LOGIN
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert forget_login(directory) and not forget_login(directory)
    with pytest.raises(NotLoggedIn):
        load_login(directory)


def test_login_file_is_never_readable_by_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even before the rename that makes it visible, and whatever the umask."""
    modes_before_rename: list[int] = []
    real_replace = os.replace

    def watching_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        modes_before_rename.append(stat.S_IMODE(os.stat(src).st_mode))
        real_replace(src, dst)

    monkeypatch.setattr(config_module.os, "replace", watching_replace)
    old_umask = os.umask(0)
    try:
        existing = tmp_path / "config.json"
        existing.write_text("{}")
        existing.chmod(0o644)  # an older, too-open file is replaced, not reused
        path = save_login(LOGIN, tmp_path)
    finally:
        os.umask(old_umask)
    assert modes_before_rename == [0o600]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_failed_write_keeps_the_old_login_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_login(LOGIN, tmp_path)

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(config_module.os, "fsync", disk_full)
    with pytest.raises(OSError):
        save_login(LOGIN.model_copy(update={"api_key": "kiln_new"}), tmp_path)
    assert load_login(tmp_path).api_key == "kiln_secret"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_damaged_login_file_says_how_to_fix_it(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"url": ')
    with pytest.raises(KilnSDKError, match="damaged; delete it and run `kiln login URL` again"):
        load_login(tmp_path)


def test_config_dir_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KILN_CONFIG_DIR", str(tmp_path / "explicit"))
    assert config_module.config_path() == tmp_path / "explicit" / "config.json"
    monkeypatch.delenv("KILN_CONFIG_DIR")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert config_module.config_path() == tmp_path / "xdg" / "kiln" / "config.json"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert config_module.config_path() == tmp_path / "home" / ".config" / "kiln" / "config.json"


def test_saved_login_verify() -> None:
    assert LOGIN.verify is True
    assert LOGIN.model_copy(update={"ca_file": "/d/pki/ca.crt"}).verify == "/d/pki/ca.crt"
    assert LOGIN.model_copy(update={"ca_file": "/d/ca.crt", "insecure": True}).verify is False


def test_human_size() -> None:
    assert [human_size(n) for n in (None, 0, 1023, 1024, 5 * 1024**2, 3 * 1024**4)] == [
        "-",
        "0 B",
        "1023 B",
        "1.0 KiB",
        "5.0 MiB",
        "3072.0 GiB",
    ]
