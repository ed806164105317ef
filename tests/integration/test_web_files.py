"""The UI's file browser: navigate, view, edit and save, upload, folders, rename, delete —
and project creation from an uploaded archive."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import markupsafe
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from kiln.storage.git import run_git
from tests.conftest import Account
from tests.integration.web_ui_client import UiClient, sign_in

API = "/api/v1/projects/alice/demo/files/"
UI = "/p/alice/demo/files/"


@pytest.fixture
def alice_ui(app: FastAPI, alice: Account) -> UiClient:
    ui = sign_in(app, alice.username, alice.password)
    response = ui.htmx(
        "POST",
        "/projects/new",
        data={"name": "demo", "source": "template", "template": "python-starter"},
    )
    assert response.status_code == 204
    return ui


def project_dir(settings) -> Path:
    (found,) = [p for p in settings.projects_dir.iterdir() if not p.name.startswith(".")]
    return found


def test_folder_listing_folders_first_with_actions(alice_ui: UiClient, settings) -> None:
    (project_dir(settings) / "data").mkdir()
    page = alice_ui.page(UI)
    names = [chunk.split("</a>")[0] for chunk in page.split('<i class="ficon ')[1:]]
    assert names[0] == 'dir"></i>data'
    assert 'file"></i>main.py' in names
    assert 'file"></i>requirements.txt' in names
    assert f'href="{API}main.py" download' in page
    assert f'href="{API}?format=zip"' in page  # the whole project as an archive
    assert "Upload files here" in page
    assert alice_ui.http.get("/p/alice/demo/files").headers["location"] == UI
    # The overview shows the README as text.
    assert "README.md</h2>" in alice_ui.page("/p/alice/demo")


def test_view_edit_and_save_a_file(alice_ui: UiClient, settings) -> None:
    view = alice_ui.page(UI + "main.py")
    assert 'id="file-content"' in view
    assert "def main" in view or "print" in view
    assert f'href="{UI}main.py?edit=1"' in view
    editor = alice_ui.page(UI + "main.py?edit=1")
    assert f'hx-put="{API}main.py"' in editor
    assert 'hx-ext="raw-body"' in editor
    original = (project_dir(settings) / "main.py").read_text()
    assert '<textarea name="content"' in editor
    assert str(markupsafe.escape(original)) in editor  # all of it, as escaped text
    # What the editor sends: the text as the raw body, with the page's CSRF token.
    new_text = 'print("edited in the browser")\n'
    saved = alice_ui.htmx("PUT", API + "main.py", content=new_text.encode())
    assert saved.status_code == 200, saved.text
    assert (project_dir(settings) / "main.py").read_text() == new_text
    assert "edited in the browser" in alice_ui.page(UI + "main.py")
    log = run_git(project_dir(settings), "log", "--format=%s", "-1")
    assert log.stdout.decode().strip() == "Update main.py"


def test_new_file_opens_an_empty_editor(alice_ui: UiClient) -> None:
    response = alice_ui.htmx(
        "GET", "/p/alice/demo/new-file", params={"folder": "src/", "name": "util.py"}
    )
    assert response.status_code == 204
    assert response.headers["hx-redirect"] == UI + "src/util.py?edit=1"
    editor = alice_ui.page(UI + "src/util.py?edit=1")
    assert "new file" in editor
    assert f'hx-put="{API}src/util.py"' in editor
    alice_ui.page(UI + "src/util.py", status=404)  # not until it is saved
    bad = alice_ui.htmx("GET", "/p/alice/demo/new-file", params={"name": "../escape.py"})
    assert bad.status_code == 400
    empty = alice_ui.htmx("GET", "/p/alice/demo/new-file", params={"name": " "})
    assert empty.status_code == 422


def test_binary_and_large_files_are_offered_as_downloads(alice_ui: UiClient, settings) -> None:
    root = project_dir(settings)
    (root / "model.bin").write_bytes(b"\x00\x01\x02binary")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "big.txt").write_text("x" * (1024 * 1024 + 1))
    assert "looks like a binary file" in alice_ui.page(UI + "model.bin")
    assert "not UTF-8 text" in alice_ui.page(UI + "latin1.txt")
    big = alice_ui.page(UI + "big.txt")
    assert "larger than 1024 KiB" in big
    assert "xxxxxxxxxx" not in big
    alice_ui.page(UI + "model.bin?edit=1", status=422)


def test_make_rename_and_delete(alice_ui: UiClient, settings) -> None:
    made = alice_ui.htmx(
        "POST",
        "/p/alice/demo/mkdir",
        data={"folder": "", "name": "notebooks"},
        headers={"HX-Target": "file-list"},
    )
    assert made.status_code == 200
    assert made.text.startswith('<section id="file-list"')
    assert 'dir"></i>notebooks' in made.text
    again = alice_ui.htmx("POST", "/p/alice/demo/mkdir", data={"name": "notebooks"})
    assert again.status_code == 409
    nested = alice_ui.htmx(
        "POST",
        "/p/alice/demo/mkdir",
        data={"folder": "notebooks/", "name": "eda"},
        headers={"HX-Target": "file-list"},
    )
    assert 'dir"></i>eda' in nested.text
    assert (project_dir(settings) / "notebooks" / "eda").is_dir()

    renamed = alice_ui.htmx(
        "POST",
        "/p/alice/demo/rename",
        data={"path": "requirements.txt"},
        headers={"HX-Prompt": "reqs.txt", "HX-Target": "file-list"},
    )
    assert renamed.status_code == 200
    assert 'file"></i>reqs.txt' in renamed.text
    assert 'file"></i>requirements.txt' not in renamed.text
    moved_out = alice_ui.htmx(
        "POST", "/p/alice/demo/rename", data={"path": "reqs.txt"}, headers={"HX-Prompt": "a/b"}
    )
    assert moved_out.status_code == 400
    taken = alice_ui.htmx(
        "POST", "/p/alice/demo/rename", data={"path": "reqs.txt"}, headers={"HX-Prompt": "main.py"}
    )
    assert taken.status_code == 409

    deleted = alice_ui.htmx("DELETE", UI + "reqs.txt", headers={"HX-Target": "file-list"})
    assert deleted.status_code == 200
    assert "reqs.txt" not in deleted.text
    folder = alice_ui.htmx("DELETE", UI + "notebooks/", headers={"HX-Target": "file-list"})
    assert "notebooks" not in folder.text
    assert not (project_dir(settings) / "notebooks").exists()
    # From a file's own page, the browser goes back to the folder.
    from_page = alice_ui.htmx("DELETE", UI + "src-none.py")
    assert from_page.status_code == 404
    (project_dir(settings) / "lib").mkdir()
    (project_dir(settings) / "lib" / "x.py").write_text("x = 1\n")
    back = alice_ui.htmx("DELETE", UI + "lib/x.py")
    assert back.status_code == 204
    assert back.headers["hx-redirect"] == UI + "lib/"
    empty = alice_ui.page(UI + "lib/")
    assert "This folder is empty" in empty


def test_a_viewer_reads_but_cannot_change(
    app: FastAPI, alice_ui: UiClient, bob: Account, settings
) -> None:
    alice_ui.htmx("POST", "/p/alice/demo/collaborators", data={"username": "bob", "role": "viewer"})
    bob_ui = sign_in(app, bob.username, bob.password)
    page = bob_ui.page(UI)
    assert "main.py" in page
    assert "Upload files here" not in page
    assert "hx-delete" not in page
    view = bob_ui.page(UI + "main.py")
    assert "?edit=1" not in view
    bob_ui.page(UI + "main.py?edit=1", status=403)
    assert bob_ui.htmx("DELETE", UI + "main.py").status_code == 403
    assert bob_ui.htmx("POST", "/p/alice/demo/mkdir", data={"name": "x"}).status_code == 403
    put = bob_ui.htmx("PUT", API + "main.py", content=b"hijacked")
    assert put.status_code == 403
    assert (project_dir(settings) / "main.py").read_text() != "hijacked"


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_create_a_project_from_an_uploaded_archive(
    app: FastAPI, alice: Account, client: TestClient
) -> None:
    ui = sign_in(app, alice.username, alice.password)
    assert 'data-upload-path="/projects/upload"' in ui.page("/projects/new")
    archive = _tar_gz({"train.py": b"print('train')\n", "data/readme.txt": b"data\n"})
    form = {"name": "Uploaded", "source": "upload", "visibility": "private"}
    response = ui.htmx(
        "POST",
        "/projects/upload",
        data=form,
        files={"file": ("code.tar.gz", archive, "application/gzip")},
    )
    assert response.status_code == 204, response.text
    assert response.headers["hx-redirect"] == "/p/alice/uploaded"
    listing = ui.page("/p/alice/uploaded/files/")
    assert 'file"></i>train.py' in listing
    assert 'dir"></i>data' in listing
    evil = _tar_gz({"../escape.py": b"x"})
    refused = ui.htmx(
        "POST",
        "/projects/upload",
        data={**form, "name": "Evil"},
        files={"file": ("evil.tar.gz", evil, "application/gzip")},
    )
    assert 400 <= refused.status_code < 500
    assert refused.json()["detail"]
    assert client.get("/api/v1/projects/alice/evil", headers=alice.headers).status_code == 404
    # Without JavaScript's path switch the plain form explains what to do.
    plain = ui.htmx("POST", "/projects/new", data={"name": "x", "source": "upload"})
    assert plain.status_code == 422
