"""The README's five-minute tour, run as written: every command block of its "A five-minute
tour" section, in order, against a fresh `kiln up` data directory.

The blocks are read from README.md itself, so a tour that stops working fails here. What the
test changes is only what a person's machine differs in: the site's port (a free one, not
8443), a scratch home directory, Kiln's base image taken from the tools cache, and the
answers typed at the prompts (the admin's password for `kiln login` and `read`, an API key
when git asks for a password). Each block runs in one shell, from a directory laid out like
the checkout (``.venv``, ``.kiln-data``).
"""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine

from tests.kiln_site import KilnSite

# The tour is `make up`'s: the embedded defaults, SQLite.
pytestmark = [pytest.mark.timeout(600), pytest.mark.one_database]

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SECTION = "## A five-minute tour"
FENCE = re.compile(r"^```([\w+-]*)\n(.*?)^```$", re.M | re.S)
ADMIN_PASSWORD = "first-admin-password"  # what KilnSite gives `kiln up`


@dataclass(frozen=True)
class Block:
    language: str  # "" (shell) or "python"
    code: str
    line: int  # where it starts in README.md


def tour_blocks(text: str) -> list[Block]:
    """The fenced blocks of the tour section, in order."""
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end != -1 else len(text)]
    offset = text[:start].count("\n")
    return [
        Block(m[1], m[2], offset + section[: m.start()].count("\n") + 1)
        for m in FENCE.finditer(section)
    ]


def test_the_tour_section_has_the_blocks_this_test_expects() -> None:
    """A guard on the extraction itself: shell blocks and the SDK example, in README order."""
    blocks = tour_blocks(README.read_text())
    assert [b.language for b in blocks] == ["", "", "", "", "python", "", ""]
    assert "kiln login" in blocks[0].code.splitlines()[0]  # logging in comes first
    assert "git clone" in blocks[-1].code


@pytest.fixture
def site(tmp_path: Path, db_url: str, engine: Engine) -> Iterator[KilnSite]:
    """`kiln up` on a fresh data directory (SQLite, as `make up` runs it; an empty database:
    ``engine`` empties it after each test)."""
    # Kiln's base image comes from the cache `make test` fills (KilnSite's default; a
    # person's first `kiln up` makes it from Debian's mirror in the background, a minute or
    # two).
    running = KilnSite(tmp_path, db_url)
    try:
        running.wait_for_output("Kiln is up", timeout=120)
        running.wait_for_output("runner serving gRPC", timeout=120)
        yield running
    finally:
        _stop_sessions(running)
        running.stop()


def _stop_sessions(site: KilnSite) -> None:
    """Sessions and model replicas outlive `kiln up` by design (workloads survive a
    restart): end the tour's, and wait until the runner has stopped the replicas."""
    tls = ssl.create_default_context(cafile=site.ca_file)
    auth = ("admin", ADMIN_PASSWORD)
    base = f"https://localhost:{site.port}/api/v1"
    try:
        with httpx.Client(verify=tls, timeout=30) as http:
            key = http.post(f"{base}/auth/api-keys", auth=auth).json()["key"]
            http.headers["Authorization"] = f"Bearer {key}"
            for project in http.get(f"{base}/projects").json()["items"]:
                sessions = f"{base}/projects/{project['owner']}/{project['slug']}/sessions"
                for session in http.get(sessions, params={"limit": 200}).json()["items"]:
                    if session["state"] in ("queued", "waiting", "starting", "running"):
                        http.delete(f"{sessions}/{session['id']}")
                models = sessions.removesuffix("/sessions") + "/models"
                for model in http.get(models).json()["items"]:
                    http.post(f"{models}/{model['name']}/stop")
                    _wait_replicas_gone(http, f"{models}/{model['name']}/replicas")
    except (httpx.HTTPError, KeyError, ValueError):
        pass  # the site is gone already: nothing of ours runs


def _wait_replicas_gone(http: httpx.Client, replicas: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(r["ended_at"] for r in http.get(replicas).json()):
            return
        time.sleep(0.5)


def test_the_readme_tour_runs_top_to_bottom(site: KilnSite, tmp_path: Path) -> None:
    work = tmp_path / "checkout"
    work.mkdir()
    (work / ".venv").symlink_to(Path(sys.prefix))
    (work / ".kiln-data").symlink_to(site.data_dir)
    home = tmp_path / "home"
    home.mkdir()
    # git asks for a password: the person pastes an API key (the tour's $KEY); so does this.
    key = _api_key(site)
    askpass = tmp_path / "askpass.sh"
    askpass.write_text(f"#!/bin/sh\necho {key}\n")
    askpass.chmod(0o700)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "GIT_ASKPASS": str(askpass),
        "GIT_TERMINAL_PROMPT": "0",
    }
    outputs = []
    for block in tour_blocks(README.read_text()):
        code = block.code.replace("localhost:8443", f"localhost:{site.port}")
        if block.language == "python":
            argv = [str(work / ".venv" / "bin" / "python"), "-c", code]
        else:
            argv = ["bash", "-euo", "pipefail", "-c", code]
        done = subprocess.run(
            argv,
            cwd=work,
            env=env,
            input=f"{ADMIN_PASSWORD}\n",  # typed where a prompt asks for the password
            capture_output=True,
            text=True,
            timeout=240,
            start_new_session=True,  # no terminal: prompts read what is typed on stdin
        )
        assert done.returncode == 0, (
            f"README.md line {block.line}: the block failed (exit {done.returncode})\n"
            f"{code}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
        )
        outputs.append(done.stdout)

    cli, jobs, builds, models, sdk, _, git = outputs
    assert "succeeded" in builds and "#1" in builds
    # The model: curl's CML answer, then the code change's answer, then the rollback's.
    answers = _json_documents(models)
    responses = [a["response"] for a in answers]
    assert responses == [{"sum": 3}, {"sum": 3, "version": 2}, {"sum": 3}], models
    assert all(a["success"] for a in answers)
    assert 'print(f"y = {slope:.2f} x + {intercept:.2f}")' in cli  # files get main.py -
    assert "y = 3.02 x + 1.85" in jobs  # the job ran the template's main.py
    assert sdk.strip() == "['forecast']"
    assert "1 file changed" in git
    # What the blocks did, seen through the API: the upload is the file the tour wrote (not
    # an empty body), and the push updated the project's files.
    with httpx.Client(verify=ssl.create_default_context(cafile=site.ca_file)) as http:
        http.headers["Authorization"] = f"Bearer {key}"
        api = f"https://localhost:{site.port}/api/v1/projects"
        files = http.get(f"{api}/admin/demo/files/").json()
        sizes = {e["name"]: e["size"] for e in files["entries"]}
        assert sizes == {"train.py": len('print("training")\n'), "hello.py": len("print('hi')\n")}
        uploaded = http.get(f"{api}/admin/forecast/files/requirements.txt")
        assert uploaded.text == "pandas\n"
        runs = http.get(f"{api}/admin/forecast/jobs/nightly/runs").json()["items"]
        assert [r["state"] for r in runs] == ["succeeded"]


def _json_documents(output: str) -> list[dict[str, object]]:
    """The JSON objects printed in ``output`` (curl's on one line, `kiln models call`'s
    indented), each starting a line, in order."""
    decoder = json.JSONDecoder()
    found = []
    for match in re.finditer(r"^\{", output, re.M):
        document, _ = decoder.raw_decode(output, match.start())
        found.append(document)
    return found


def _api_key(site: KilnSite) -> str:
    with httpx.Client(verify=ssl.create_default_context(cafile=site.ca_file)) as http:
        made = http.post(
            f"https://localhost:{site.port}/api/v1/auth/api-keys",
            auth=("admin", ADMIN_PASSWORD),
        )
    assert made.status_code == 201, made.text
    key: str = made.json()["key"]
    return key
