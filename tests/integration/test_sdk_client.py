"""``kiln.sdk.Client`` against the real HTTPS server: typed results, pages, errors, files."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kiln.sdk import (
    ApiKeyCreated,
    Client,
    FileEntry,
    KilnAPIError,
    KilnSDKError,
    KilnTLSError,
    NotLoggedIn,
    Project,
    create_api_key_with_password,
)
from kiln.testing.live import LiveServer
from tests.conftest import Account


@pytest.fixture
def kiln(live: LiveServer, alice: Account) -> Iterator[Client]:
    with Client(live.url, alice.key, verify=live.ca_file) as client:
        yield client


def test_password_exchange_gives_a_working_key(live: LiveServer, alice: Account) -> None:
    expires = datetime.now(UTC) + timedelta(days=7)
    created = create_api_key_with_password(
        live.url, "alice", alice.password, "notebook", verify=str(live.ca_file), expires_at=expires
    )
    assert isinstance(created, ApiKeyCreated) and created.key.startswith(created.prefix)
    assert created.name == "notebook" and created.expires_at is not None
    assert abs(created.expires_at - expires) < timedelta(seconds=1)
    with Client(live.url, created.key, verify=live.ca_file) as kiln:
        assert kiln.me().username == "alice"


def test_wrong_password_raises_the_servers_detail(live: LiveServer, alice: Account) -> None:
    with pytest.raises(KilnAPIError) as info:
        create_api_key_with_password(live.url, "alice", "wrong", verify=live.ca_file)
    assert (info.value.status, info.value.title, info.value.detail) == (
        401,
        "Authentication required",
        "wrong username or password",
    )


def test_tls_is_verified(live: LiveServer, alice: Account) -> None:
    with Client(live.url, alice.key) as system_trust, pytest.raises(KilnTLSError):
        system_trust.me()
    with Client(live.url, alice.key, verify=False) as unchecked:
        assert unchecked.me().username == "alice"
    with pytest.raises(KilnSDKError, match="does not exist"):
        Client(live.url, alice.key, verify=live.ca_file.with_name("missing.crt"))


def test_from_config_without_a_login(tmp_path: Path) -> None:
    with pytest.raises(NotLoggedIn):
        Client.from_config(tmp_path / "nothing-here")


def test_projects_are_typed_and_every_page_is_followed(kiln: Client) -> None:
    made = [
        kiln.create_project(f"p{i}", visibility="public" if i % 2 else "private") for i in range(5)
    ]
    assert all(isinstance(p, Project) for p in made)
    assert made[1].visibility == "public" and made[0].full_name == "alice/p0"
    pages = kiln.iter_projects(page_size=2)  # 3 pages: 2 + 2 + 1
    assert [p.slug for p in pages] == ["p0", "p1", "p2", "p3", "p4"]
    assert [p.slug for p in kiln.list_projects(q="p3")] == ["p3"]
    got = kiln.get_project("alice", "p2")
    assert got.role == "admin" and got.git_url == f"{kiln.url}git/alice/p2.git"
    kiln.delete_project("alice", "p2")
    with pytest.raises(KilnAPIError) as info:
        kiln.get_project("alice", "p2")
    assert info.value.status == 404 and info.value.detail == "project alice/p2 not found"


def test_invalid_input_keeps_the_field_in_the_detail(kiln: Client) -> None:
    with pytest.raises(KilnAPIError) as info:
        kiln.create_project("x", visibility="secret")
    assert info.value.status == 422 and info.value.detail.startswith("visibility:")


def test_api_keys_list_create_revoke(kiln: Client, live: LiveServer) -> None:
    created = kiln.create_api_key("ci", datetime.now(UTC) + timedelta(days=1))
    assert created.id in [k.id for k in kiln.list_api_keys()]
    kiln.revoke_api_key(created.id)
    assert created.id not in [k.id for k in kiln.list_api_keys()]
    revoked = Client(live.url, created.key, verify=live.ca_file)
    with revoked, pytest.raises(KilnAPIError) as info:
        revoked.me()
    assert info.value.status == 401


# ---- files (the files API contract) ---------------------------------------------------------


def test_upload_list_download_round_trip(kiln: Client, tmp_path: Path) -> None:
    kiln.create_project("demo", template="python-starter")
    payload = os.urandom(3 * 1024 * 1024 + 17)  # several chunks, not a multiple of one
    local = tmp_path / "weights.bin"
    local.write_bytes(payload)
    seen: list[tuple[int, int | None]] = []
    written = kiln.upload(
        "alice", "demo", local, "models/", progress=lambda d, t: seen.append((d, t))
    )
    assert (written.path, written.size) == ("models/weights.bin", len(payload))
    assert seen[-1] == (len(payload), len(payload))

    top = {e.name: e for e in kiln.list_files("alice", "demo")}
    assert {"README.md", "main.py", "requirements.txt", "models"} <= set(top)
    assert top["models"].is_dir and top["models"].size is None
    (entry,) = kiln.list_files("alice", "demo", "models")
    assert isinstance(entry, FileEntry) and (entry.name, entry.size) == (
        "weights.bin",
        len(payload),
    )

    saved = kiln.download("alice", "demo", "models/weights.bin", tmp_path / "copy.bin")
    assert saved == tmp_path / "copy.bin" and saved.read_bytes() == payload
    into_dir = kiln.download("alice", "demo", "models/weights.bin", tmp_path)
    assert into_dir == tmp_path / "weights.bin"
    buffer = io.BytesIO()
    assert kiln.download("alice", "demo", "requirements.txt", buffer) is None
    assert buffer.getvalue() == kiln.read_file("alice", "demo", "requirements.txt")


def test_small_writes_mkdir_move_delete(kiln: Client) -> None:
    kiln.create_project("demo")
    first = kiln.write_file("alice", "demo", "notes/a b.txt", b"hello")
    assert first.path == "notes/a b.txt" and first.size == 5
    made = kiln.mkdir("alice", "demo", "empty/inner")
    assert made.is_dir and made.path.rstrip("/") == "empty/inner"
    moved = kiln.move("alice", "demo", "notes/a b.txt", "notes/b#?.txt")
    assert moved.path == "notes/b#?.txt"
    assert kiln.read_file("alice", "demo", "notes/b#?.txt") == b"hello"
    assert [e.name for e in kiln.list_files("alice", "demo", "notes/")] == ["b#?.txt"]
    with pytest.raises(KilnAPIError) as info:
        kiln.delete_file("alice", "demo", "empty")
    assert info.value.status == 409
    kiln.delete_file("alice", "demo", "empty", recursive=True)
    kiln.delete_file("alice", "demo", "notes/b#?.txt")
    assert [e.name for e in kiln.list_files("alice", "demo")] == ["notes"]


def test_file_listing_follows_every_page(kiln: Client) -> None:
    kiln.create_project("many")
    names = [f"f{i:02}.txt" for i in range(7)]
    for name in names:
        kiln.write_file("alice", "many", name, name.encode())
    assert [e.name for e in kiln.iter_files("alice", "many", page_size=3)] == names


def test_folder_downloads_as_an_archive(kiln: Client, tmp_path: Path) -> None:
    kiln.create_project("demo")
    kiln.write_file("alice", "demo", "data/x.csv", b"a,b\n1,2\n")
    tgz = kiln.download_folder("alice", "demo", "data/", tmp_path)
    assert tgz == tmp_path / "data.tar.gz"
    with tarfile.open(tgz) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith("x.csv"))
        extracted = archive.extractfile(member)
        assert extracted is not None and extracted.read() == b"a,b\n1,2\n"
    whole = kiln.download_folder("alice", "demo", "", tmp_path, archive_format="zip")
    assert whole == tmp_path / "demo.zip"
    with zipfile.ZipFile(whole) as archive:
        assert any(n.endswith("data/x.csv") for n in archive.namelist())


def test_failed_download_leaves_nothing_behind(kiln: Client, tmp_path: Path) -> None:
    kiln.create_project("demo")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with pytest.raises(KilnAPIError) as info:
        kiln.download("alice", "demo", "missing.bin", downloads / "out.bin")
    assert info.value.status == 404
    assert list(downloads.iterdir()) == []


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("../x", "'..'"),
        ("a/../../x", "'..'"),
        ("./x", "'.'"),
        ("%2e%2e/x", "%2e"),
        ("a\x00b", "NUL"),
    ],
)
def test_unsafe_paths_reach_the_server_and_are_refused(kiln: Client, bad: str, why: str) -> None:
    kiln.create_project("demo")
    kiln.write_file("alice", "demo", "x", b"keep")
    with pytest.raises(KilnAPIError) as info:
        kiln.write_file("alice", "demo", bad, b"overwrite")
    assert info.value.status == 400 and why.lower() in info.value.detail.lower()
    assert kiln.read_file("alice", "demo", "x") == b"keep"


def test_a_stranger_cannot_see_files(kiln: Client, live: LiveServer, bob: Account) -> None:
    kiln.create_project("secret")
    kiln.write_file("alice", "secret", "key.txt", b"s3cret")
    as_bob = Client(live.url, bob.key, verify=live.ca_file)
    with as_bob, pytest.raises(KilnAPIError) as info:
        as_bob.read_file("alice", "secret", "key.txt")
    assert info.value.status == 404
