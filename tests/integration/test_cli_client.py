"""`kiln login|logout|projects|keys` end to end against the real HTTPS server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
from pathlib import Path

import pytest

from kiln.sdk import Client, KilnAPIError, SavedLogin
from kiln.sdk.config import save_login
from kiln.testing.live import LiveServer, free_port
from tests.conftest import Account
from tests.integration.cli_support import Cli


@pytest.fixture
def cli(live: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    return Cli.isolated(live, tmp_path, monkeypatch)


# ---- login / logout -------------------------------------------------------------------------


def test_login_saves_a_new_key_in_a_private_file(cli: Cli, alice: Account) -> None:
    result = cli.ok(
        "login",
        cli.live.url,
        "--ca-file",
        str(cli.live.ca_file),
        input=f"alice\n{alice.password}\n",
    )
    assert f"Logged in to {cli.live.url} as alice" in result.stdout
    assert stat.S_IMODE(cli.config_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(cli.config_dir.stat().st_mode) == 0o700
    raw = cli.config_file.read_text()
    assert alice.password not in raw
    saved = json.loads(raw)
    assert saved["url"] == cli.live.url and saved["ca_file"] == str(cli.live.ca_file)
    with Client.from_config() as kiln:
        assert kiln.me().username == "alice"
        (key,) = [k for k in kiln.list_api_keys() if k.id == saved["key_id"]]
    assert key.name == f"cli@{socket.gethostname()}"
    assert saved["api_key"].startswith(key.prefix)


def test_login_file_is_private_whatever_the_umask(cli: Cli, alice: Account) -> None:
    old = os.umask(0)
    try:
        cli.login(alice)
    finally:
        os.umask(old)
    assert stat.S_IMODE(cli.config_file.stat().st_mode) == 0o600


def test_login_with_a_wrong_password_saves_nothing(cli: Cli, alice: Account) -> None:
    error = cli.fails(
        "login", cli.live.url, "-u", "alice", "--ca-file", str(cli.live.ca_file), input="nope\n"
    )
    assert error.strip() == "error: wrong username or password"
    assert not cli.config_file.exists()


def test_login_to_an_untrusted_certificate_says_which_ca_to_pass(cli: Cli, alice: Account) -> None:
    error = cli.fails("login", cli.live.url, "-u", "alice", input=f"{alice.password}\n")
    assert "TLS certificate is not trusted" in error and "--ca-file DATA_DIR/pki/ca.crt" in error
    assert len(error.strip().splitlines()) == 1
    assert not cli.config_file.exists()


def test_login_trusts_the_ca_of_a_local_kiln_data_dir(cli: Cli, alice: Account) -> None:
    local_ca = cli.workdir / ".kiln-data" / "pki" / "ca.crt"
    local_ca.parent.mkdir(parents=True)
    shutil.copy(cli.live.ca_file, local_ca)
    cli.ok("login", cli.live.url, "-u", "alice", input=f"{alice.password}\n")
    assert json.loads(cli.config_file.read_text())["ca_file"] == str(local_ca)
    cli.ok("projects", "list")


def test_login_insecure_skips_verification(cli: Cli, alice: Account) -> None:
    result = cli.ok("login", cli.live.url, "-u", "alice", "--insecure", input=f"{alice.password}\n")
    assert "TLS certificate checks are off" in result.stderr
    cli.ok("projects", "list")
    cli.fails("login", cli.live.url, "--insecure", "--ca-file", str(cli.live.ca_file), code=2)


def test_login_again_revokes_the_previous_key(cli: Cli, alice: Account) -> None:
    cli.login(alice)
    first = json.loads(cli.config_file.read_text())
    cli.login(alice)
    second = json.loads(cli.config_file.read_text())
    assert first["key_id"] != second["key_id"]
    stale = Client(cli.live.url, first["api_key"], cli.live.ca_file)
    with stale, pytest.raises(KilnAPIError) as info:
        stale.me()
    assert info.value.status == 401


def test_unreachable_site_is_one_clear_line(cli: Cli) -> None:
    url = f"https://localhost:{free_port()}"
    error = cli.fails("login", url, "-u", "alice", "--insecure", input="pw\n")
    assert error.splitlines()[-1] == (
        f"error: cannot reach {url}/: [Errno 111] Connection refused (is the site running?)"
    )


def test_logout_revokes_the_key_and_forgets_it(cli: Cli, alice: Account) -> None:
    cli.login(alice)
    key = json.loads(cli.config_file.read_text())["api_key"]
    assert "the API key is revoked" in cli.ok("logout").stdout
    assert not cli.config_file.exists()
    with Client(cli.live.url, key, cli.live.ca_file) as stale, pytest.raises(KilnAPIError):
        stale.me()
    error = cli.fails("projects", "list")
    assert error.strip() == "error: not logged in: run `kiln login URL` first"
    assert "Not logged in" in cli.ok("logout").stdout


def test_logout_finds_a_key_without_its_id_by_prefix(cli: Cli, alice: Account) -> None:
    cli.login(alice)
    saved = SavedLogin.model_validate_json(cli.config_file.read_text())
    save_login(saved.model_copy(update={"key_id": None}), cli.config_dir)  # hand-written
    cli.ok("logout")
    stale = Client(cli.live.url, saved.api_key, cli.live.ca_file)
    with stale, pytest.raises(KilnAPIError):
        stale.me()


def test_logout_local_only_forgets(cli: Cli, alice: Account) -> None:
    cli.login(alice)
    key = json.loads(cli.config_file.read_text())["api_key"]
    assert cli.ok("logout", "--local").stdout.strip() == f"Logged out of {cli.live.url}"
    assert not cli.config_file.exists()
    with Client(cli.live.url, key, cli.live.ca_file) as still_live:
        assert still_live.me().username == "alice"


def test_logout_from_an_unreachable_site_keeps_the_key(cli: Cli, alice: Account) -> None:
    cli.login(alice)
    saved = SavedLogin.model_validate_json(cli.config_file.read_text())
    gone = f"https://localhost:{free_port()}/"
    save_login(saved.model_copy(update={"url": gone}), cli.config_dir)
    error = cli.fails("logout")
    assert error.startswith(f"error: cannot reach {gone}") and "kiln logout --local" in error
    assert cli.config_file.exists()


# ---- projects -------------------------------------------------------------------------------


def test_projects_create_list_json_search_delete(cli: Cli, alice: Account) -> None:
    cli.login(alice)
    created = cli.ok("projects", "create", "Churn Model", "--template", "python-starter")
    assert "Created alice/churn-model (private)" in created.stdout
    assert "clone it: kiln projects clone alice/churn-model" in created.stdout
    made = json.loads(
        cli.ok("projects", "create", "demo", "--visibility", "public", "--json").stdout
    )
    assert made["owner"] == "alice" and made["slug"] == "demo" and made["visibility"] == "public"

    table = cli.ok("projects", "list").stdout
    assert "alice/churn-model" in table and "alice/demo" in table
    listed = json.loads(cli.ok("projects", "list", "--json").stdout)
    assert [p["slug"] for p in listed] == ["churn-model", "demo"]
    found = json.loads(cli.ok("projects", "list", "--search", "churn", "--json").stdout)
    assert [p["slug"] for p in found] == ["churn-model"]
    assert "No projects match 'zzz'" in cli.ok("projects", "list", "-s", "zzz").stdout

    cli.ok("projects", "delete", "alice/demo", "--yes")
    assert [p["slug"] for p in json.loads(cli.ok("projects", "list", "--json").stdout)] == [
        "churn-model"
    ]


def test_projects_delete_asks_first(cli: Cli, alice: Account) -> None:
    cli.login(alice)
    cli.ok("projects", "create", "keep")
    refused = cli.run("projects", "delete", "alice/keep", input="n\n")
    assert refused.exit_code == 1 and "Aborted" in refused.output
    assert json.loads(cli.ok("projects", "list", "--json").stdout)[0]["slug"] == "keep"
    cli.ok("projects", "delete", "alice/keep", input="y\n")
    assert json.loads(cli.ok("projects", "list", "--json").stdout) == []


def test_project_errors_are_the_servers_detail(cli: Cli, alice: Account, bob: Account) -> None:
    cli.login(alice)
    assert cli.fails("projects", "delete", "alice/nope", "--yes").strip() == (
        "error: project alice/nope not found"
    )
    bad_template = cli.fails("projects", "create", "x", "--template", "nope")
    assert "unknown template 'nope'" in bad_template and "python-starter" in bad_template
    cli.ok("projects", "create", "taken")
    assert "already" in cli.fails("projects", "create", "taken")
    # Bob cannot even learn that alice's private project exists.
    cli.login(bob)
    assert cli.fails("projects", "delete", "alice/taken", "--yes").strip() == (
        "error: project alice/taken not found"
    )


@pytest.mark.parametrize("ref", ["demo", "alice/", "/demo", "a/b/c", "Alice/demo", "alice/de mo"])
def test_malformed_owner_slug_is_a_usage_error(cli: Cli, alice: Account, ref: str) -> None:
    cli.login(alice)
    for command in (["projects", "delete", ref, "--yes"], ["files", "ls", ref]):
        result = cli.run(*command)
        assert result.exit_code == 2, result.output
        assert "OWNER/SLUG" in result.stderr or "not valid" in result.stderr


def test_help_explains_with_examples(cli: Cli) -> None:
    for command in (["login"], ["projects", "create"], ["files", "put"], ["keys", "create"]):
        text = cli.ok(*command, "--help").stdout
        assert "Examples" in text and "kiln " + " ".join(command) in text


# ---- keys -----------------------------------------------------------------------------------


def test_keys_create_list_revoke(cli: Cli, alice: Account) -> None:
    cli.login(alice)
    created = cli.ok("keys", "create", "--name", "ci", "--expires-in-days", "30")
    key = created.stdout.strip()
    assert key.startswith("kiln_") and "shown only once" in created.stderr
    listed = json.loads(cli.ok("keys", "list", "--json").stdout)
    (ci,) = [k for k in listed if k["name"] == "ci"]
    assert ci["expires_at"] is not None and "key" not in ci
    table = cli.ok("keys", "list").stdout
    assert " ci " in table and "* the key this CLI uses" in table

    with Client(cli.live.url, key, cli.live.ca_file) as as_ci:
        assert as_ci.me().username == "alice"
    assert cli.ok("keys", "revoke", str(ci["id"])).stdout.strip() == f"Revoked key {ci['id']}"
    with Client(cli.live.url, key, cli.live.ca_file) as as_ci, pytest.raises(KilnAPIError) as info:
        as_ci.me()
    assert info.value.status == 401
    assert ci["id"] not in [k["id"] for k in json.loads(cli.ok("keys", "list", "--json").stdout)]
    assert cli.fails("keys", "revoke", str(ci["id"])).strip() == (
        f"error: API key {ci['id']} not found"
    )
    as_json = json.loads(cli.ok("keys", "create", "--json").stdout)
    assert as_json["key"].startswith("kiln_") and as_json["expires_at"] is None


def test_a_revoked_cli_key_fails_with_a_relogin_hint(cli: Cli, alice: Account) -> None:
    cli.login(alice)
    saved = json.loads(cli.config_file.read_text())
    with Client(cli.live.url, alice.key, cli.live.ca_file) as other:
        other.revoke_api_key(saved["key_id"])
    error = cli.fails("projects", "list")
    assert error.startswith("error: ") and f"run `kiln login {cli.live.url}` again" in error
    assert len(error.strip().splitlines()) == 1


def test_revoking_the_cli_own_key_logs_out(cli: Cli, alice: Account) -> None:
    cli.login(alice)
    own = json.loads(cli.config_file.read_text())["key_id"]
    assert "you are logged out" in cli.ok("keys", "revoke", str(own)).stdout
    assert not cli.config_file.exists()


def test_key_options_are_validated(cli: Cli, alice: Account) -> None:
    cli.login(alice)
    cli.fails("keys", "create", "--expires-in-days", "0", code=2)
    cli.fails("keys", "revoke", "abc", code=2)
    assert cli.fails("keys", "create", "--name", "x" * 101).strip() == (
        "error: name: String should have at most 100 characters"
    )
