"""The file API end to end, on SQLite and PostgreSQL, with real git underneath."""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from kiln.db.models import AuditEvent, Project
from kiln.settings import Settings
from tests.conftest import Account
from tests.integration.test_files_helpers import create_project, git, project_dir, tree_snapshot


def _dir(settings: Settings, engine: Engine, base: str) -> Path:
    owner, slug = base.rsplit("/", 2)[-2:]
    return project_dir(settings, engine, owner, slug)


def test_write_replace_read_and_list(
    client: TestClient, alice: Account, settings: Settings, engine: Engine
) -> None:
    base = create_project(client, alice, "demo")
    r = client.put(f"{base}/files/src/app.py", content=b"print(1)\n", headers=alice.headers)
    assert r.status_code == 201, r.text
    assert r.json()["path"] == "src/app.py" and r.json()["size"] == 9
    r = client.put(f"{base}/files/src/app.py", content=b"print(22)\n", headers=alice.headers)
    assert r.status_code == 200, r.text
    assert r.json()["size"] == 10

    r = client.get(f"{base}/files/src/app.py", headers=alice.headers)
    assert r.status_code == 200 and r.content == b"print(22)\n"
    assert r.headers["content-length"] == "10"

    r = client.get(f"{base}/files/src/", headers=alice.headers)
    assert r.status_code == 200, r.text
    listing = r.json()
    assert listing["path"] == "src/" and listing["next_cursor"] is None
    [entry] = listing["entries"]
    assert (entry["name"], entry["type"], entry["size"]) == ("app.py", "file", 10)
    assert entry["modified"].endswith(("Z", "+00:00"))

    top = client.get(f"{base}/files/", headers=alice.headers).json()
    assert top["path"] == ""
    names = {e["name"]: e for e in top["entries"]}
    assert ".git" not in names
    assert names["src"]["type"] == "dir" and names["src"]["size"] is None

    # The write landed in the project's directory, nowhere else.
    assert (_dir(settings, engine, base) / "src" / "app.py").read_bytes() == b"print(22)\n"


def test_file_responses_never_render_on_the_ui_origin(client: TestClient, alice: Account) -> None:
    base = create_project(client, alice, "content")
    page = b"<html><script>alert(document.cookie)</script></html>"
    for name in ("index.html", "logo.svg", "app.js", "feed.xml"):
        assert client.put(f"{base}/files/{name}", content=page, headers=alice.headers).is_success
        r = client.get(f"{base}/files/{name}", headers=alice.headers)
        assert r.headers["content-type"].startswith("text/plain"), name
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["content-security-policy"] == "sandbox; default-src 'none'"
        assert r.headers["content-disposition"].startswith("attachment;")
        assert f'filename="{name}"' in r.headers["content-disposition"]
    client.put(f"{base}/files/data.csv", content=b"a,b\n", headers=alice.headers)
    r = client.get(f"{base}/files/data.csv", headers=alice.headers)
    assert r.headers["content-type"].startswith("text/csv")
    # A file name with quotes and non-ASCII survives in the header, escaped.
    client.put(f"{base}/files/r%C3%A9sum%C3%A9%20%22x%22.txt", content=b"x", headers=alice.headers)
    r = client.get(f"{base}/files/r%C3%A9sum%C3%A9%20%22x%22.txt", headers=alice.headers)
    assert "filename*=UTF-8''r%C3%A9sum%C3%A9%20%22x%22.txt" in r.headers["content-disposition"]


def test_each_change_is_one_commit_of_exactly_its_paths_by_the_user(
    client: TestClient, alice: Account, settings: Settings, engine: Engine
) -> None:
    base = create_project(client, alice, "history")
    repo = _dir(settings, engine, base)
    (repo / "scratch.txt").write_text("a workload wrote this")  # must not be swept in
    h = alice.headers
    assert client.put(f"{base}/files/a.txt", content=b"1", headers=h).status_code == 201
    assert client.put(f"{base}/files/*", content=b"star", headers=h).status_code == 201
    assert (
        client.post(
            f"{base}/move", json={"source": "a.txt", "destination": "d/b.txt"}, headers=h
        ).status_code
        == 200
    )
    assert client.delete(f"{base}/files/d/b.txt", headers=h).status_code == 204

    log = git(repo, "log", "--format=%an <%ae>|%s").splitlines()
    assert log[:4] == [
        "alice <alice@localhost>|Delete d/b.txt",
        "alice <alice@localhost>|Move a.txt to d/b.txt",
        "alice <alice@localhost>|Add *",
        "alice <alice@localhost>|Add a.txt",
    ]
    assert git(repo, "show", "--name-only", "--format=", "HEAD~2").split() == ["*"]
    assert sorted(
        git(repo, "show", "--no-renames", "--name-status", "--format=", "HEAD~1").split()
    ) == sorted(["A", "d/b.txt", "D", "a.txt"])
    assert "scratch.txt" in git(repo, "status", "--porcelain")  # still untracked


def test_ignored_files_are_written_but_not_committed(
    client: TestClient, alice: Account, settings: Settings, engine: Engine
) -> None:
    base = create_project(client, alice, "ignored")
    repo = _dir(settings, engine, base)
    h = alice.headers
    assert client.put(f"{base}/files/.gitignore", content=b"*.bin\n", headers=h).status_code == 201
    commits = git(repo, "rev-list", "--count", "HEAD")
    assert client.put(f"{base}/files/model.bin", content=b"\0" * 100, headers=h).status_code == 201
    assert client.delete(f"{base}/files/model.bin", headers=h).status_code == 204
    assert git(repo, "rev-list", "--count", "HEAD") == commits


def test_delete_mkdir_move_rules(client: TestClient, alice: Account) -> None:
    base = create_project(client, alice, "ops")
    h = alice.headers
    r = client.post(f"{base}/mkdir", json={"path": "data/raw"}, headers=h)
    assert r.status_code == 201, r.text
    assert (r.json()["path"], r.json()["type"]) == ("data/raw/", "dir")
    assert client.post(f"{base}/mkdir", json={"path": "data/raw"}, headers=h).status_code == 409
    client.put(f"{base}/files/data/raw/x.csv", content=b"1", headers=h)

    r = client.delete(f"{base}/files/data", headers=h)
    assert r.status_code == 409 and "recursive=true" in r.json()["detail"]
    r = client.post(
        f"{base}/move", json={"source": "data", "destination": "data/raw/in"}, headers=h
    )
    assert r.status_code == 400
    r = client.post(f"{base}/move", json={"source": "nope", "destination": "x"}, headers=h)
    assert r.status_code == 404
    client.put(f"{base}/files/other.csv", content=b"2", headers=h)
    r = client.post(
        f"{base}/move", json={"source": "other.csv", "destination": "data/raw/x.csv"}, headers=h
    )
    assert r.status_code == 409
    r = client.post(
        f"{base}/move", json={"source": "data", "destination": "archive/2024"}, headers=h
    )
    assert r.status_code == 200, r.text
    assert r.json()["path"] == "archive/2024/" and r.json()["name"] == "2024"
    assert client.get(f"{base}/files/archive/2024/raw/x.csv", headers=h).content == b"1"

    assert client.delete(f"{base}/files/archive?recursive=true", headers=h).status_code == 204
    assert client.get(f"{base}/files/archive/", headers=h).status_code == 404
    assert client.delete(f"{base}/files/archive", headers=h).status_code == 404
    assert client.delete(f"{base}/files/", headers=h).status_code == 400  # never the top

    r = client.get(f"{base}/files/other.csv/", headers=h)
    assert r.status_code == 400
    client.post(f"{base}/mkdir", json={"path": "folder"}, headers=h)
    r = client.get(f"{base}/files/folder", headers=h)
    assert r.status_code == 400 and "trailing '/'" in r.json()["detail"]
    assert client.put(f"{base}/files/folder", content=b"x", headers=h).status_code == 409
    assert client.put(f"{base}/files/folder/", content=b"x", headers=h).status_code == 400


def test_listing_pages_with_a_cursor(client: TestClient, alice: Account) -> None:
    base = create_project(client, alice, "pages")
    for name in ("e", "a", "d", "c", "b"):
        client.put(f"{base}/files/many/{name}.txt", content=b"x", headers=alice.headers)
    seen, cursor = [], None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = client.get(f"{base}/files/many/", params=params, headers=alice.headers).json()
        seen += [e["name"] for e in page["entries"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ["a.txt", "b.txt", "c.txt", "d.txt", "e.txt"]
    assert (
        client.get(f"{base}/files/", params={"limit": 5001}, headers=alice.headers).status_code
        == 422
    )
    r = client.get(f"{base}/files/", params={"cursor": "%%%"}, headers=alice.headers)
    assert r.status_code == 422


def _chunks(total: int, size: int = 1000) -> Iterator[bytes]:
    for start in range(0, total, size):
        yield b"x" * min(size, total - start)


def test_quota_exceeded_is_507_and_leaves_nothing(
    client: TestClient, alice: Account, settings: Settings, engine: Engine
) -> None:
    base = create_project(client, alice, "quota")
    repo = _dir(settings, engine, base)
    h = alice.headers
    used = client.get(f"{base}/usage", headers=h).json()["used_bytes"]
    quota = used + 64 * 1024  # the usage counts allocated blocks, .git included
    with Session(engine) as db, db.begin():
        db.execute(update(Project).where(Project.slug == "quota").values(quota_bytes=quota))
    assert client.put(f"{base}/files/keep.txt", content=b"k" * 3000, headers=h).status_code == 201
    before = tree_snapshot(repo)
    head = git(repo, "rev-parse", "HEAD")
    used = client.get(f"{base}/usage", headers=h).json()["used_bytes"]

    too_big = quota - used + 1
    r = client.put(f"{base}/files/new/deep/big.bin", content=b"y" * too_big, headers=h)
    assert r.status_code == 507, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert "Quota exceeded" in r.json()["detail"]
    assert f"of its {quota} bytes and this write needs {too_big}" in r.json()["detail"]
    # Without Content-Length (chunked) the limit is found while streaming.
    r = client.put(f"{base}/files/new/deep/big.bin", content=_chunks(too_big), headers=h)
    assert r.status_code == 507, r.text
    assert tree_snapshot(repo) == before and git(repo, "rev-parse", "HEAD") == head

    # Replacing a file counts its new size, not both (keep.txt holds one 4 KiB block).
    replacement = quota - used + 4096 - 100
    r = client.put(f"{base}/files/keep.txt", content=b"k" * replacement, headers=h)
    assert r.status_code == 200, r.text


def test_file_over_the_size_limit_is_413_and_leaves_nothing(
    client: TestClient, alice: Account, settings: Settings, engine: Engine
) -> None:
    base = create_project(client, alice, "limit")
    repo = _dir(settings, engine, base)
    settings.storage.max_file_bytes = 4096
    before = tree_snapshot(repo)
    for body in (b"z" * 5000, _chunks(5000)):
        r = client.put(f"{base}/files/sub/too-big.bin", content=body, headers=alice.headers)
        assert r.status_code == 413, r.text
        assert "4096" in r.json()["detail"]
    assert tree_snapshot(repo) == before
    r = client.put(f"{base}/files/sub/ok.bin", content=b"z" * 4096, headers=alice.headers)
    assert r.status_code == 201


def test_roles_viewer_reads_only_stranger_sees_nothing(
    client: TestClient, alice: Account, bob: Account, make_user: Callable[..., Account]
) -> None:
    carol = make_user("carol")
    base = create_project(client, alice, "shared")
    client.put(f"{base}/files/a.txt", content=b"a", headers=alice.headers)
    r = client.put(f"{base}/collaborators/bob", json={"role": "viewer"}, headers=alice.headers)
    assert r.status_code == 200, r.text

    assert client.get(f"{base}/files/a.txt", headers=bob.headers).content == b"a"
    assert client.get(f"{base}/files/", headers=bob.headers).status_code == 200
    denied = [
        client.put(f"{base}/files/a.txt", content=b"b", headers=bob.headers),
        client.delete(f"{base}/files/a.txt", headers=bob.headers),
        client.post(f"{base}/mkdir", json={"path": "x"}, headers=bob.headers),
        client.post(
            f"{base}/move", json={"source": "a.txt", "destination": "b"}, headers=bob.headers
        ),
    ]
    assert [r.status_code for r in denied] == [403] * 4
    for r in (
        client.get(f"{base}/files/a.txt", headers=carol.headers),
        client.get(f"{base}/files/", headers=carol.headers),
        client.put(f"{base}/files/a.txt", content=b"c", headers=carol.headers),
        client.get(f"{base}/files/a.txt"),
    ):
        assert r.status_code in (404, 401), r.text
    assert client.get(f"{base}/files/a.txt", headers=carol.headers).status_code == 404
    assert client.get(f"{base}/files/a.txt", headers=alice.headers).content == b"a"


def test_folder_download_round_trips_through_upload(
    client: TestClient, alice: Account, settings: Settings, engine: Engine
) -> None:
    base = create_project(client, alice, "origin")
    repo = _dir(settings, engine, base)
    h = alice.headers
    files = {
        "README.md": b"# hi\n",
        "src/main.py": b"print('hi')\n",
        "data/big.bin": bytes(range(256)) * 800,
    }
    for name, data in files.items():
        client.put(f"{base}/files/{name}", content=data, headers=h)
    client.post(f"{base}/mkdir", json={"path": "empty"}, headers=h)
    (repo / "link").symlink_to("/etc/passwd")  # left out of archives

    r = client.get(f"{base}/files/", params={"format": "tar.gz"}, headers=h)
    assert r.status_code == 200 and r.headers["content-type"] == "application/gzip"
    assert 'filename="origin.tar.gz"' in r.headers["content-disposition"]
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        names = set(tar.getnames())
        assert {f"origin/{n}" for n in files} <= names and "origin/empty" in names
        assert not any(".git" in n.split("/") or n.endswith("link") for n in names)
        assert tar.extractfile("origin/data/big.bin").read() == files["data/big.bin"]  # type: ignore[union-attr]

    r = client.get(f"{base}/files/src/", params={"format": "zip"}, headers=h)
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        assert zf.testzip() is None
        assert zf.read("src/main.py") == files["src/main.py"]

    tgz = client.get(f"{base}/files/", params={"format": "tar.gz"}, headers=h).content
    r = client.post(
        "/api/v1/projects/upload",
        data={"name": "copy", "description": "from a download"},
        files={"file": ("origin.tar.gz", tgz, "application/gzip")},
        headers=h,
    )
    assert r.status_code == 201, r.text
    assert (r.json()["owner"], r.json()["slug"], r.json()["role"]) == ("alice", "copy", "admin")
    copy = "/api/v1/projects/alice/copy"
    for name, data in files.items():  # the single top folder 'origin/' was stripped
        assert client.get(f"{copy}/files/{name}", headers=h).content == data
    copy_dir = project_dir(settings, engine, "alice", "copy")
    assert git(copy_dir, "status", "--porcelain") == ""  # everything committed
    assert client.get(f"{base}/files/", params={"format": "rar"}, headers=h).status_code == 422
    assert (
        client.get(f"{base}/files/README.md", params={"format": "zip"}, headers=h).status_code
        == 400
    )


def test_changes_are_audited(client: TestClient, alice: Account, engine: Engine) -> None:
    base = create_project(client, alice, "audited")
    h = alice.headers
    client.put(f"{base}/files/a.txt", content=b"1", headers=h)
    client.post(f"{base}/mkdir", json={"path": "d"}, headers=h)
    client.post(f"{base}/move", json={"source": "a.txt", "destination": "d/a.txt"}, headers=h)
    client.delete(f"{base}/files/d?recursive=true", headers=h)
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("x.txt", "x")
    r = client.post(
        "/api/v1/projects/upload",
        data={"name": "up"},
        files={"file": ("up.zip", zipped.getvalue())},
        headers=h,
    )
    assert r.status_code == 201, r.text
    with Session(engine) as db:
        events = db.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
    got = [
        (e.action, e.actor_name, e.target, e.details)
        for e in events
        if e.action != "project.create"
    ]
    assert got == [
        (
            "file.write",
            "alice",
            "project:alice/audited",
            {"path": "a.txt", "size": 1, "created": True},
        ),
        ("file.mkdir", "alice", "project:alice/audited", {"path": "d"}),
        (
            "file.move",
            "alice",
            "project:alice/audited",
            {"source": "a.txt", "destination": "d/a.txt"},
        ),
        ("file.delete", "alice", "project:alice/audited", {"path": "d", "recursive": True}),
        ("project.upload", "alice", "project:alice/up", {"template": None}),
    ]
