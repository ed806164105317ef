"""Git's ways to run programs or read outside the repository, planted from a real sandbox,
then followed by every server-side git path: no planted command ever runs on the host.

Each case runs a bash script as a workload of the project (the local runtime: bubblewrap,
the workload uid, the project at /home/cdsw), the way a user's job or terminal would. Then
alice uses the project through everything that makes the server run git — file-API writes,
moves and deletes (each a commit), a folder download, and a clone, fetch and push over HTTPS
with the real git client. Planted commands append to a marker file on the host (a path any
root process could write); it must never exist. Where git does follow the plant, the command
also records ``id -u`` inside the project: that proves the attack really ran, confined to the
project and as the workload uid, exactly as the user's own job could have.
"""

from __future__ import annotations

import io
import tarfile
import textwrap
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from kiln.runtimes import WorkloadSpec
from kiln.runtimes.local import LocalRuntime
from kiln.storage.git import repo_owner
from kiln.testing.live import LiveServer
from kiln.testing.runtime_contract import all_logs, local_runtime_factory, wait_exit
from tests.conftest import Account
from tests.integration.test_git_support import (
    GitClient,
    GitProject,
    git_fixture,
    git_url,
    http,
    make_project_fixture,
)

FIXTURES = (git_fixture, make_project_fixture)  # registered by import


@dataclass(frozen=True)
class Plant:
    """A script a workload runs in its project, and whether git (sandboxed) is expected to
    execute what it planted during the server's operations."""

    script: str
    runs_confined: bool = False


def _cmd(name: str, host_marker: Path) -> str:
    """A shell command that proves where it ran: inside the git sandbox only the first
    redirection can succeed; on the host (as before the sandbox) only the second."""
    return f"id -u >>/home/cdsw/.ran-{name}; echo {name} >>{host_marker}"


def _filter_config(prefix: str, host_marker: Path) -> str:
    clean, smudge = _cmd("clean", host_marker), _cmd("smudge", host_marker)
    return (
        f'{prefix} filter.evil.clean "{clean}; cat"\n{prefix} filter.evil.smudge "{smudge}; cat"\n'
    )


def plants(host_marker: Path, victim_git: Path) -> dict[str, Plant]:
    cmd = lambda name: _cmd(name, host_marker)  # noqa: E731
    attributes = "printf '* filter=evil diff=evil merge=evil\\n' > .gitattributes\n"
    evil_cfg = (
        "cat > /home/cdsw/evil.cfg <<'EOF'\n"
        '[filter "evil"]\n'
        f'\tclean = "{cmd("clean")}; cat"\n'
        "EOF\n"
    )
    return {
        "filter-driver": Plant(
            _filter_config("git config", host_marker) + attributes, runs_confined=True
        ),
        "filter-process": Plant(
            f'git config filter.evil.process "{cmd("process")}"\n' + attributes,
            runs_confined=True,
        ),
        "diff-and-merge-drivers": Plant(
            f'git config diff.evil.command "{cmd("diff")}"\n'
            f'git config diff.evil.textconv "{cmd("textconv")}; cat"\n'
            f'git config diff.external "{cmd("external")}"\n'
            f'git config merge.evil.driver "{cmd("merge")}"\n' + attributes
        ),
        "hooks": Plant(
            "mkdir -p myhooks\n"
            "for hook in pre-commit commit-msg post-commit post-checkout pre-receive update "
            "post-receive post-update push-to-checkout reference-transaction "
            "post-index-change pre-auto-gc; do\n"
            f'  printf "#!/bin/sh\\n{cmd("hook")}\\n" > .git/hooks/$hook\n'
            "  cp .git/hooks/$hook myhooks/$hook\n"
            "  chmod +x .git/hooks/$hook myhooks/$hook\n"
            "done\n"
            "git config core.hooksPath /home/cdsw/myhooks\n"
        ),
        "fsmonitor": Plant(f'git config core.fsmonitor "{cmd("fsmonitor")}"\n'),
        "configured-programs": Plant(
            f'git config core.sshCommand "{cmd("ssh")}"\n'
            f'git config core.gitProxy "{cmd("proxy")}"\n'
            f'git config credential.helper "!{cmd("credential")}"\n'
            f'git config core.askPass "{cmd("askpass")}"\n'
            f'git config core.pager "{cmd("pager")}"\n'
            f'git config core.editor "{cmd("editor")}"\n'
            f'git config sequence.editor "{cmd("sequence")}"\n'
            f'git config uploadpack.packObjectsHook "{cmd("packobjects")}"\n'
            f'git config remote.origin.uploadpack "{cmd("uploadpack")}"\n'
            f'git config remote.origin.receivepack "{cmd("receivepack")}"\n'
        ),
        "signing-program": Plant(
            f'git config gpg.program "/home/cdsw/fake-gpg"\n'
            f'printf "#!/bin/sh\\n{cmd("gpg")}\\nexit 1\\n" > fake-gpg && chmod +x fake-gpg\n'
            "git config commit.gpgSign true\n",
            runs_confined=True,
        ),
        "include": Plant(
            evil_cfg + "git config include.path /home/cdsw/evil.cfg\n"
            "git config 'includeIf.gitdir:/.path' /home/cdsw/evil.cfg\n" + attributes,
            runs_confined=True,
        ),
        "info-attributes": Plant(
            _filter_config("git config", host_marker)
            + "printf '* filter=evil\\n' > .git/info/attributes\n",
            runs_confined=True,
        ),
        "config-worktree": Plant(
            "git config core.repositoryformatversion 1\n"
            "git config extensions.worktreeConfig true\n"
            + _filter_config("git config --worktree", host_marker)
            + attributes,
            runs_confined=True,
        ),
        "gitdir-file": Plant(
            "cp -a .git /home/cdsw/evilcopy && rm -rf .git\n"
            "printf 'gitdir: /home/cdsw/evilcopy\\n' > .git\n"
            + _filter_config("git --git-dir=/home/cdsw/evilcopy config", host_marker)
            + attributes,
            runs_confined=True,
        ),
        "commondir": Plant(
            "cp -a .git /home/cdsw/evilgit\n"
            + _filter_config("git --git-dir=/home/cdsw/evilgit config", host_marker)
            + "printf '../evilgit\\n' > .git/commondir\n"
            + attributes,
            runs_confined=True,
        ),
        "gitmodules": Plant(
            "cat > .gitmodules <<'EOF'\n"
            '[submodule "x"]\n'
            "\tpath = x\n"
            f"\turl = ext::sh -c {cmd('ext').replace(' ', '% ')}\n"
            f"\tupdate = !{cmd('update')}\n"
            "EOF\n"
            f'git config submodule.x.update "!{cmd("update")}"\n'
            "git config protocol.ext.allow always\n"
        ),
        "alternates-to-another-project": Plant(
            f"echo {victim_git}/objects > .git/objects/info/alternates\n"
            f'git config core.alternateRefsCommand "{cmd("alternaterefs")}"\n'
            "printf '%s\\n' \"$VICTIM_HEAD\" > .git/refs/heads/stolen\n"
        ),
        "symlinked-git-to-another-project": Plant(f"rm -rf .git && ln -s {victim_git} .git\n"),
        "gitdir-to-another-project": Plant(
            f"rm -rf .git && printf 'gitdir: {victim_git}\\n' > .git\n"
        ),
    }


CASES = [
    "filter-driver",
    "filter-process",
    "diff-and-merge-drivers",
    "hooks",
    "fsmonitor",
    "configured-programs",
    "signing-program",
    "include",
    "info-attributes",
    "config-worktree",
    "gitdir-file",
    "commondir",
    "gitmodules",
    "alternates-to-another-project",
    "symlinked-git-to-another-project",
    "gitdir-to-another-project",
]


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[LocalRuntime]:
    rt = local_runtime_factory(tmp_path / "state")()
    assert isinstance(rt, LocalRuntime)
    yield rt
    for workload_id in rt.list_workloads():
        rt.stop(workload_id, grace=0)
        rt.remove(workload_id)
    rt.close()


def run_in_sandbox(
    runtime: LocalRuntime, project: Path, script: str, env: dict[str, str] | None = None
) -> None:
    """``script`` as a workload of ``project`` (what a job or a terminal could do)."""
    spec = WorkloadSpec(
        id=f"plant-{uuid.uuid4().hex[:10]}",
        project_dir=project,
        command=("/bin/bash", "-c", "set -euo pipefail\n" + script),
        env=env or {},
    )
    runtime.start(spec)
    code = wait_exit(runtime, spec.id)
    assert code == 0, all_logs(runtime, spec.id).decode()


def not_a_server_error(response: httpx.Response) -> None:
    """Success, or a precise refusal (git's own message) — never a 500 or a hang."""
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["detail"]


def use_project_everywhere(
    live: LiveServer, who: Account, project: GitProject, git: GitClient, work: Path
) -> str | None:
    """Every server-side path that runs git on the project; returns the clone's files
    (or None when git refused to clone the tampered repository)."""
    base = f"api/v1/projects/{project.owner}/{project.slug}"
    with http(live) as client:
        h = who.headers
        not_a_server_error(client.put(f"{base}/files/notes.txt", content=b"hi\n", headers=h))
        not_a_server_error(client.put(f"{base}/files/sub/deep.txt", content=b"x\n", headers=h))
        move = {"source": "notes.txt", "destination": "moved.txt"}
        not_a_server_error(client.post(f"{base}/move", json=move, headers=h))
        not_a_server_error(client.delete(f"{base}/files/sub/deep.txt", headers=h))
        for fmt in ("tar.gz", "zip"):
            not_a_server_error(client.get(f"{base}/files/?format={fmt}", headers=h))
    url = git_url(live, project, who)
    cloned = git.run("clone", "-q", url, str(work), check=False)
    if cloned.returncode != 0:
        return None
    git.run("fetch", "-q", "--all", cwd=work, check=False)
    git.commit_file(work, "pushed.txt", "pushed\n", "push after the plant")
    git.run("push", "-q", "origin", "HEAD:main", cwd=work, check=False)
    git.run("pull", "-q", "--no-rebase", "origin", "main", cwd=work, check=False)
    return "\n".join(sorted(p.name for p in work.rglob("*") if ".git" not in p.parts))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_planted_git_runs_nothing_on_the_host(
    case: str,
    live: LiveServer,
    alice: Account,
    bob: Account,
    make_project: Callable[..., GitProject],
    git: GitClient,
    runtime: LocalRuntime,
    tmp_path: Path,
) -> None:
    host_marker = tmp_path / "planted-command-ran-on-the-host"
    victim = make_project(bob, "victim")
    with http(live) as client:
        secret = b"bob's secret\n"
        put = client.put(
            f"api/v1/projects/bob/{victim.slug}/files/secret.txt",
            content=secret,
            headers=bob.headers,
        )
        assert put.status_code == 201, put.text
    victim_head = victim.head()
    project = make_project(alice, f"attacked-{case}")
    plant = plants(host_marker, victim.directory / ".git")[case]

    run_in_sandbox(runtime, project.directory, plant.script, {"VICTIM_HEAD": victim_head})
    files = use_project_everywhere(live, alice, project, git, tmp_path / "work")

    assert not host_marker.exists(), f"{case}: a planted command ran on the host"
    if plant.runs_confined:
        ran = sorted(project.directory.glob(".ran-*"))
        assert ran, f"{case}: git never followed the plant, so the test proves nothing"
        uids = {line for path in ran for line in path.read_text().split()}
        assert uids == {str(repo_owner())}, f"{case}: ran as {uids}, not the workload uid"
    # Nothing of bob's project reached alice, and bob's repository did not change.
    assert victim.head() == victim_head
    if files is not None:
        work = tmp_path / "work"
        leaked = [p for p in work.rglob("*") if p.is_file() and secret in p.read_bytes()]
        assert not leaked, f"{case}: bob's file reached alice's clone: {leaked}"
        log = git.run("log", "--all", "--format=%H", cwd=work, check=False).stdout
        assert victim_head not in log


def test_an_uploaded_project_with_hostile_git_files_runs_nothing(
    live: LiveServer, alice: Account, git: GitClient, tmp_path: Path
) -> None:
    """Project creation from an archive: .gitattributes, .gitmodules and a config file in
    the upload (an archive cannot carry .git itself) run nothing anywhere."""
    host_marker = tmp_path / "upload-command-ran"
    cmd = _cmd("upload", host_marker)
    members = {
        "demo/.gitattributes": b"* filter=evil diff=evil\n",
        "demo/.gitmodules": f'[submodule "x"]\n\tpath = x\n\tupdate = !{cmd}\n'.encode(),
        "demo/evil.cfg": f'[filter "evil"]\n\tclean = "{cmd}; cat"\n'.encode(),
        "demo/main.py": b"print('hi')\n",
    }
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    with http(live) as client:
        r = client.post(
            "api/v1/projects/upload",
            files={"file": ("demo.tar.gz", data.getvalue(), "application/gzip")},
            data={"name": "uploaded"},
            headers=alice.headers,
        )
        assert r.status_code == 201, r.text
    project = GitProject("alice", r.json()["slug"], Path())
    work = tmp_path / "work"
    git.run("clone", "-q", git_url(live, project, alice), str(work))
    assert (work / "main.py").read_text() == "print('hi')\n"
    assert not host_marker.exists()


def test_the_sandbox_of_server_side_git_sees_only_its_project(
    live: LiveServer,
    alice: Account,
    make_project: Callable[..., GitProject],
    runtime: LocalRuntime,
    tmp_path: Path,
) -> None:
    """What a planted filter can see when the server runs it: the project, the system's
    read-only directories, nothing of Kiln's data dir, no network, the workload uid."""
    project = make_project(alice, "probe")
    report = "/home/cdsw/.probe-report"
    probe = textwrap.dedent(
        f"""\
        {{ id -u; ls -A /; ls /home; test -e {live.settings.data_dir} && echo DATA-DIR-VISIBLE;
          cat /proc/net/dev | tail -n +3 | cut -d: -f1 | sed "s/ //g";
          touch /usr/x 2>/dev/null && echo USR-WRITABLE; }} > {report} 2>&1; cat
        """
    ).replace("\n", " ")
    run_in_sandbox(
        runtime,
        project.directory,
        f"git config filter.probe.clean '{probe}'\nprintf '* filter=probe\\n' > .gitattributes\n",
    )
    with http(live) as client:
        r = client.put(
            "api/v1/projects/alice/probe/files/x.txt", content=b"x\n", headers=alice.headers
        )
        assert r.status_code == 201, r.text
    lines = (project.directory / ".probe-report").read_text().split()
    assert lines[0] == str(repo_owner())
    assert "cdsw" in lines and "DATA-DIR-VISIBLE" not in lines and "USR-WRITABLE" not in lines
    assert "etc" not in lines[1:]  # no host /etc at all
    interfaces = [line for line in lines if line in ("lo", "eth0", "tap0")]
    assert interfaces == ["lo"], lines  # only its own loopback: no network
