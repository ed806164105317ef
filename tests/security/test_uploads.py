"""Hostile project uploads: each is a 4xx and nothing is written — no project row, no
directory, no staging left over, nothing outside."""

from __future__ import annotations

import io
import os
import secrets
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from kiln.db.models import AuditEvent
from kiln.settings import Settings
from tests.conftest import Account
from tests.integration.test_files_helpers import (
    file_member,
    link_member,
    project_count,
    tar_bytes,
    tree_snapshot,
)

UPLOAD = "/api/v1/projects/upload"
MB = 1024 * 1024


def _upload(
    client: TestClient, account: Account, data: bytes, filename: str, name: str = "up"
) -> httpx.Response:
    return client.post(
        UPLOAD,
        data={"name": name},
        files={"file": (filename, data, "application/octet-stream")},
        headers=account.headers,
    )


@pytest.fixture
def nothing_written(settings: Settings, engine: Engine) -> Iterator[None]:
    """Asserts, after the test, that no project, directory or audit entry appeared."""
    settings.projects_dir.mkdir(parents=True, exist_ok=True)
    escape_target = settings.data_dir / "escaped"
    before = (project_count(engine), tree_snapshot(settings.data_dir))
    yield
    after = tree_snapshot(settings.data_dir)
    changed = {k for k in after.keys() ^ before[1].keys() if not k.endswith((".db-wal", ".db-shm"))}
    assert project_count(engine) == before[0]
    assert changed == set(), changed
    assert not escape_target.exists() and not Path("/tmp/kiln-upload-pwned").exists()
    with Session(engine) as db:
        assert db.scalar(select(AuditEvent).where(AuditEvent.action == "project.upload")) is None


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


HOSTILE = {
    "dotdot-tar": (
        tar_bytes(file_member("ok.txt", b"ok"), file_member("../escaped", b"x")),
        "p.tar.gz",
        400,
    ),
    "deep-dotdot-tar": (
        tar_bytes(file_member("a/b/../../../../escaped", b"x")),
        "p.tgz",
        400,
    ),
    "absolute-tar": (tar_bytes(file_member("/tmp/kiln-upload-pwned", b"x")), "p.tar.gz", 400),
    "symlink-then-file-through-it": (
        tar_bytes(
            file_member("ok.txt", b"ok"),
            link_member("escape", "/tmp"),
            file_member("escape/kiln-upload-pwned", b"x"),
        ),
        "p.tar.gz",
        422,
    ),
    "hardlink": (tar_bytes(link_member("passwd", "/etc/passwd", hard=True)), "p.tar", 422),
    "dotdot-zip": (_zip({"ok.txt": b"ok", "../escaped": b"x"}), "p.zip", 400),
    "zip-bomb": (_zip({"ok.txt": b"ok", "bomb.bin": b"\0" * (40 * MB)}), "bomb.zip", 413),
    "gzip-bomb": (tar_bytes(file_member("bomb.bin", b"\0" * (40 * MB))), "bomb.tar.gz", 413),
    "corrupt": (b"\x1f\x8b not really gzip", "p.tar.gz", 422),
    "not-an-archive": (b"MZ\x90\x00", "setup.exe", 422),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_archives_are_refused_and_nothing_is_written(
    client: TestClient, alice: Account, settings: Settings, nothing_written: None, case: str
) -> None:
    settings.storage.max_archive_bytes = 4 * MB
    data, filename, status = HOSTILE[case]
    r = _upload(client, alice, data, filename)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"


def test_too_many_entries_is_refused(
    client: TestClient, alice: Account, settings: Settings, nothing_written: None
) -> None:
    settings.storage.max_archive_entries = 20
    data = _zip({f"f{i}.txt": b"x" for i in range(21)})
    r = _upload(client, alice, data, "many.zip")
    assert r.status_code == 413 and "20 entries" in r.json()["detail"]


def _multipart(boundary: str, filename: str, data: bytes) -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{filename}"\r\nContent-Type: application/gzip\r\n\r\n'
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )


def test_upload_over_the_request_limit_is_413(
    client: TestClient, alice: Account, settings: Settings, nothing_written: None
) -> None:
    settings.web.max_request_bytes = 64 * 1024
    noise = tar_bytes(file_member("noise.bin", os.urandom(100 * 1024)))
    boundary = secrets.token_hex(8)
    body = _multipart(boundary, "big.tar.gz", noise)
    headers = {**alice.headers, "Content-Type": f"multipart/form-data; boundary={boundary}"}
    # With a Content-Length the middleware refuses up front ...
    r = client.post(UPLOAD, content=body, headers=headers)
    assert r.status_code == 413, r.text
    # ... and a chunked body (no Content-Length) is counted while it streams.
    chunks = (body[i : i + 8192] for i in range(0, len(body), 8192))
    r = client.post(UPLOAD, content=chunks, headers=headers)
    assert r.status_code == 413, r.text
    assert "limit of 65536 bytes" in r.json()["detail"]


def test_bad_requests_to_upload(
    client: TestClient, alice: Account, bob: Account, nothing_written: None
) -> None:
    good = _zip({"a.txt": b"a"})
    r = client.post(UPLOAD, json={"name": "x"}, headers=alice.headers)
    assert r.status_code == 415
    r = client.post(
        UPLOAD, data={"name": "x"}, files={"other": ("a.zip", good)}, headers=alice.headers
    )
    assert r.status_code == 422 and "file" in r.json()["detail"]
    r = client.post(UPLOAD, files={"file": ("a.zip", good)}, headers=alice.headers)
    assert r.status_code == 422 and "name" in r.json()["detail"]
    r = client.post(
        UPLOAD,
        data={"name": "x", "visibility": "everyone"},
        files={"file": ("a.zip", good)},
        headers=alice.headers,
    )
    assert r.status_code == 422 and "visibility" in r.json()["detail"]
    r = client.post(
        UPLOAD,
        data={"name": "x", "owner": "bob"},
        files={"file": ("a.zip", good)},
        headers=alice.headers,
    )
    assert r.status_code == 403
    r = client.post(UPLOAD, data={"name": "x"}, files={"file": ("a.zip", good)})
    assert r.status_code == 401


def test_name_conflict_after_extraction_leaves_no_staging(
    client: TestClient, alice: Account, settings: Settings, engine: Engine
) -> None:
    assert _upload(client, alice, _zip({"a.txt": b"1"}), "a.zip", name="dup").status_code == 201
    before = sorted(os.listdir(settings.projects_dir))
    r = _upload(client, alice, _zip({"b.txt": b"2"}), "b.zip", name="dup")
    assert r.status_code == 409, r.text
    assert sorted(os.listdir(settings.projects_dir)) == before
    assert project_count(engine) == 1


def test_a_tar_with_a_fifo_is_refused(
    client: TestClient, alice: Account, nothing_written: None
) -> None:
    fifo = tarfile.TarInfo("pipe")
    fifo.type = tarfile.FIFOTYPE
    r = _upload(client, alice, tar_bytes(file_member("a", b"a"), (fifo, None)), "p.tgz")
    assert r.status_code == 422 and "special file" in r.json()["detail"]
