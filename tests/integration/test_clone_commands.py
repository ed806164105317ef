"""The clone commands the Overview shows work as shown, for real, against the live HTTPS
server (Kiln's own CA): the `git clone` line (with its CA setting, the API key as the
password), and `kiln projects clone` after `kiln login` (no prompts); both clones push."""

from __future__ import annotations

import html
import json
import os
import re
import ssl
import stat
import subprocess
from pathlib import Path

import httpx
import pytest

from kiln.testing.live import LiveServer
from tests.conftest import Account
from tests.integration.cli_support import Cli

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def git_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A user's shell on a fresh machine: no git configuration of its own, no prompts."""
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_AUTHOR_NAME": "Alice",
        "GIT_AUTHOR_EMAIL": "alice@example.com",
        "GIT_COMMITTER_NAME": "Alice",
        "GIT_COMMITTER_EMAIL": "alice@example.com",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # Nothing on this machine may vouch for Kiln's CA (or override the clone's own setting).
    for name in ("GIT_ASKPASS", "GIT_SSL_CAINFO", "GIT_SSL_CAPATH", "SSL_CERT_FILE"):
        monkeypatch.delenv(name, raising=False)
    return dict(os.environ)


def _verify(live: LiveServer) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(live.ca_file))


def _overview(live: LiveServer, account: Account) -> str:
    with httpx.Client(base_url=live.url, verify=_verify(live)) as browser:
        created = browser.post(
            "api/v1/projects",
            json={"name": "demo", "template": "python-starter"},
            headers=account.headers,
        )
        assert created.status_code == 201, created.text
        login = browser.post(
            "login", data={"username": account.username, "password": account.password}
        )
        assert login.status_code == 303, login.text
        page = browser.get(f"p/{account.username}/demo")
        assert page.status_code == 200
        return page.text


def _shown(page: str, element_id: str) -> str:
    match = re.search(rf'<pre class="code" id="{element_id}">(.*?)</pre>', page, re.S)
    assert match, page
    return html.unescape(match.group(1))


def _push_a_change(clone: Path, env: dict[str, str]) -> None:
    (clone / "notes.md").write_text("pushed from a clone\n")
    for args in (["add", "notes.md"], ["commit", "-qm", "Add notes"], ["push", "-q"]):
        done = subprocess.run(["git", *args], cwd=clone, env=env, capture_output=True, text=True)
        assert done.returncode == 0, (args, done.stderr)


def _on_server(live: LiveServer, account: Account, path: str) -> str:
    response = httpx.get(
        f"{live.url}api/v1/projects/{account.username}/demo/files/{path}",
        headers=account.headers,
        verify=_verify(live),
    )
    assert response.status_code == 200, response.text
    return response.text


def test_the_git_clone_line_of_the_overview_works_as_shown(
    live: LiveServer, alice: Account, tmp_path: Path, git_env: dict[str, str]
) -> None:
    command = _shown(_overview(live, alice), "clone-cmd")
    ca = Path(live.ca_file).resolve()
    assert command == (
        f"git clone -c http.sslCAInfo={ca} https://alice@{live.url.split('://')[1]}git/alice/demo.git"
    )
    # git asks for the password; the user pastes an API key (here: an askpass program).
    askpass = tmp_path / "askpass.sh"
    askpass.write_text(f"#!/bin/sh\necho '{alice.key}'\n")
    askpass.chmod(stat.S_IRWXU)
    env = {**git_env, "GIT_ASKPASS": str(askpass)}
    work = tmp_path / "work"
    work.mkdir()
    # Without the CA setting, git refuses the site's certificate: the line needs it.
    bare = command.replace(f"-c http.sslCAInfo={ca} ", "")
    failed = subprocess.run(["bash", "-c", bare], cwd=work, env=env, capture_output=True, text=True)
    assert failed.returncode != 0 and "certificate" in failed.stderr.lower(), failed.stderr

    done = subprocess.run(
        ["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    clone = work / "demo"
    assert (clone / "main.py").is_file()
    # The CA setting was kept in the clone: pushing back works too.
    _push_a_change(clone, env)
    assert _on_server(live, alice, "notes.md") == "pushed from a clone\n"


def test_the_ca_certificate_is_served_for_other_computers(live: LiveServer) -> None:
    """What the Overview links for "on another computer": Kiln's CA, no sign-in needed."""
    response = httpx.get(f"{live.url}ca.crt", verify=_verify(live))
    assert response.status_code == 200
    assert response.content == Path(live.ca_file).read_bytes()
    assert response.content.startswith(b"-----BEGIN CERTIFICATE-----")
    assert "attachment" in response.headers["content-disposition"]


def test_kiln_projects_clone_after_kiln_login_works_as_shown(
    live: LiveServer,
    alice: Account,
    tmp_path: Path,
    git_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shown = _shown(_overview(live, alice), "clone-kiln").splitlines()
    assert shown == [
        f"kiln login {live.url} --ca-file {Path(live.ca_file).resolve()}",
        "kiln projects clone alice/demo",
    ]
    cli = Cli.isolated(live, tmp_path, monkeypatch)
    login = shown[0].split()[1:]
    cli.ok(*login, "--username", "alice", input=f"{alice.password}\n")
    result = cli.ok(*shown[1].split()[1:])
    assert "Cloned alice/demo into demo" in result.stdout
    clone = cli.workdir / "demo"
    assert (clone / "main.py").is_file()
    config = (clone / ".git" / "config").read_text()
    saved_key = json.loads(cli.config_file.read_text())["api_key"]
    assert saved_key not in config and "git-credential" in config  # a helper, not the key
    # Pulls and pushes need no prompt: the helper answers from the saved login.
    _push_a_change(clone, dict(os.environ))
    assert _on_server(live, alice, "notes.md") == "pushed from a clone\n"


def test_the_credential_helper_answers_only_for_its_site(
    live: LiveServer, alice: Account, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli = Cli.isolated(live, tmp_path, monkeypatch)
    cli.login(alice)
    host = live.url.split("://", 1)[1].rstrip("/")
    mine = cli.ok("git-credential", "get", input=f"protocol=https\nhost={host}\n\n").stdout
    saved_key = json.loads(cli.config_file.read_text())["api_key"]  # the key `login` made
    assert mine == f"username=alice\npassword={saved_key}\n\n"
    other = cli.ok("git-credential", "get", input="protocol=https\nhost=evil.example\n\n")
    assert other.stdout == ""
    assert cli.ok("git-credential", "store", input=f"protocol=https\nhost={host}\n").stdout == ""
