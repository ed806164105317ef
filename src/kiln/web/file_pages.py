"""The file browser: folders, text files shown and edited, upload, download, delete, rename.

Reading goes straight to ``kiln.storage.files`` (safe paths, never a symlink followed).
Changes go through the file API: delete, mkdir and move call its handlers from here (so
authorization, the git commit and the audit record are the API's); saving a file and
uploading send the bytes to ``PUT /api/v1/projects/{o}/{p}/files/{path}`` straight from the
browser (``static/kiln.js``), which streams them with the API's size and quota limits.
Raw bytes are only ever served by the API, as attachments; the UI shows escaped text.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Form, Header, Query, Request, Response
from fastapi.responses import RedirectResponse

from kiln.api import files as files_api
from kiln.api.deps import Ctx, Db, ProjectAccess, ViewProject, WriteProject
from kiln.domain.authz import Action, authorize
from kiln.domain.errors import BadPath, InvalidInput, KilnError, NotFound, about_field
from kiln.storage import files
from kiln.storage.history import FolderHistory, folder_history
from kiln.storage.safepath import SafePath, parse_path
from kiln.web.markup import highlight_file
from kiln.web.project_pages import project_context
from kiln.web.rendering import UiCaller, UiRoute, is_htmx, path_url, redirect, render
from kiln.web.text_files import TextFile, read_text

router = APIRouter(route_class=UiRoute, include_in_schema=False)

LISTING_PAGE = 1000
LISTING_ID = "file-list"


@dataclass(frozen=True)
class Crumb:
    name: str
    path: str  # folder path ending with "/" ("" for the top)


def _crumbs(path: SafePath) -> list[Crumb]:
    return [Crumb(name, "/".join(path.parts[: i + 1]) + "/") for i, name in enumerate(path.parts)]


def _folder(path: SafePath) -> str:
    return f"{path}/" if path.parts else ""


def _project_dir(ctx: Ctx, access: ProjectAccess) -> Path:
    return ctx.store.project_dir(access.project.id)


def _api_files_url(access: ProjectAccess) -> str:
    return f"/api/v1/projects/{access.project.owner_name}/{access.project.slug}/files/"


def _context(access: ProjectAccess, path: SafePath, **extra: Any) -> dict[str, Any]:
    return {
        **project_context(access, "files"),
        "crumbs": _crumbs(path),
        "api_files": _api_files_url(access),
        **extra,
    }


def _sorted(entries: list[files.Entry]) -> list[files.Entry]:
    return sorted(entries, key=lambda e: (e.type != "dir", e.name.lower(), e.name))


def is_hidden(name: str) -> bool:
    """Dot entries (``.local`` where pip installs, ``.gitignore``, tools' state) are hidden
    unless asked for, as in JupyterLab and most file browsers."""
    return name.startswith(".")


def _listing(
    request: Request,
    caller: UiCaller,
    ctx: Ctx,
    access: ProjectAccess,
    folder: SafePath,
    cursor: str | None = None,
    partial: bool = False,
    show_hidden: bool = False,
) -> Response:
    project_dir = _project_dir(ctx, access)
    listing = files.list_dir(project_dir, folder, LISTING_PAGE, cursor)
    hidden = [e for e in listing.entries if is_hidden(e.name)]
    shown = listing.entries if show_hidden else [e for e in listing.entries if e not in hidden]
    try:  # the last commit of each entry: one `git log` for the whole folder
        history, history_error = folder_history(project_dir, folder), ""
    except KilnError as exc:  # the listing still shows; the page says why commits do not
        history, history_error = FolderHistory({}, complete=True), exc.detail
    template = "files/_listing.html" if partial else "files/folder.html"
    return render(
        request,
        template,
        caller,
        **_context(
            access,
            folder,
            folder=_folder(folder),
            entries=_sorted(shown),
            hidden_count=len(hidden),
            show_hidden=show_hidden,
            next_cursor=listing.next_cursor,
            history=history,
            history_error=history_error,
        ),
    )


@router.get("/p/{owner}/{project}/files")
def files_root(access: ViewProject) -> Response:
    return RedirectResponse(f"/p/{access.project.owner_name}/{access.project.slug}/files/", 303)


@router.get("/p/{owner}/{project}/files/{path:path}")
def browse(
    request: Request,
    path: str,
    caller: UiCaller,
    access: ViewProject,
    ctx: Ctx,
    db: Db,
    edit: bool = False,
    hidden: bool = False,
    cursor: Annotated[str | None, Query(max_length=2000)] = None,
) -> Response:
    """A folder (trailing '/'; ``?hidden=1`` shows dot entries too) or a file: shown, or
    with ?edit=1 in the editor."""
    target = parse_path(path, allow_root=True)
    if path.endswith("/") or target.is_root:
        partial = is_htmx(request) and request.headers.get("hx-target") == LISTING_ID
        return _listing(request, caller, ctx, access, target, cursor, partial, hidden)
    project_dir = _project_dir(ctx, access)
    if edit:
        authorize(db, access.user, access.project, Action.write)
    try:
        found: TextFile | None = read_text(project_dir, target)
    except NotFound:
        if not edit:
            raise
        found = None  # a new file: saving creates it
    entry = found.entry if found else None
    text, reason = (found.text, found.reason) if found else ("", "")
    if entry is not None and entry.type == "dir":
        return RedirectResponse(request.url.path + "/", 303)
    if edit and text is None:
        raise InvalidInput(f"{target.name!r} cannot be edited in the browser. {reason}")
    return render(
        request,
        "files/editor.html" if edit else "files/view.html",
        caller,
        # The editor (CodeMirror) makes <style> elements: they need this response's nonce.
        style_nonce=secrets.token_urlsafe(18) if edit else None,
        **_context(
            access,
            target.parent,
            file_path=str(target),
            file_name=target.name,
            entry=entry,
            text=text,
            highlighted=highlight_file(text, target.name) if text and not edit else None,
            reason=reason,
            folder=_folder(target.parent),
        ),
    )


def _after_change(
    request: Request, caller: UiCaller, ctx: Ctx, access: ProjectAccess, folder: SafePath
) -> Response:
    """The folder's listing again (in place), or the folder page when the change was made
    from a file's own page."""
    if request.headers.get("hx-target") == LISTING_ID:
        return _listing(request, caller, ctx, access, folder, partial=True)
    base = f"/p/{access.project.owner_name}/{access.project.slug}/files/"
    return redirect(request, base + path_url(_folder(folder)))


@router.delete("/p/{owner}/{project}/files/{path:path}")
def delete_path(
    request: Request, path: str, caller: UiCaller, access: WriteProject, ctx: Ctx, db: Db
) -> Response:
    """Delete a file, or a folder with everything in it (the page asked to confirm)."""
    target = parse_path(path)
    files_api.delete_file(str(target), access, request, ctx, db, recursive=True)
    return _after_change(request, caller, ctx, access, target.parent)


@router.post("/p/{owner}/{project}/mkdir")
def make_folder(
    request: Request,
    caller: UiCaller,
    access: WriteProject,
    ctx: Ctx,
    db: Db,
    name: Annotated[str, Form(max_length=1024)],
    folder: Annotated[str, Form(max_length=4096)] = "",
) -> Response:
    parent = parse_path(folder, allow_root=True)
    with about_field("name"):
        body = files_api.MkdirBody(path=_folder(parent) + name.strip().strip("/"))
        files_api.make_folder(body, access, request, ctx, db)
    return _after_change(request, caller, ctx, access, parent)


@router.post("/p/{owner}/{project}/rename")
def rename(
    request: Request,
    caller: UiCaller,
    access: WriteProject,
    ctx: Ctx,
    db: Db,
    path: Annotated[str, Form(max_length=4096)],
    new_name: Annotated[str, Header(alias="HX-Prompt", max_length=1024)] = "",
) -> Response:
    """Rename within the same folder; the new name comes from htmx's prompt."""
    source = parse_path(path)
    new_name = new_name.strip()
    if not new_name:
        raise InvalidInput("give the new name")
    if "/" in new_name:
        raise BadPath("a new name cannot contain '/'; renaming keeps the item in its folder")
    body = files_api.MoveBody(source=str(source), destination=str(source.parent.child(new_name)))
    files_api.move_path(body, access, request, ctx, db)
    return _after_change(request, caller, ctx, access, source.parent)


@router.get("/p/{owner}/{project}/new-file")
def new_file(
    request: Request,
    access: WriteProject,
    name: Annotated[str, Query(max_length=1024)] = "",
    folder: Annotated[str, Query(max_length=4096)] = "",
) -> Response:
    """Open the editor on a file that does not exist yet; saving it creates it."""
    if not name.strip():
        raise InvalidInput("give the new file a name", "name")
    with about_field("name"):
        target = parse_path(_folder(parse_path(folder, allow_root=True)) + name.strip())
    if target.is_root or str(target).endswith("/"):
        raise BadPath("a file name cannot end with '/'", "name")
    base = f"/p/{access.project.owner_name}/{access.project.slug}/files/"
    return redirect(request, f"{base}{path_url(str(target))}?edit=1")
