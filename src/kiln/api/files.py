"""Project files over HTTP, and new projects from an uploaded archive.

``GET .../files/{path}`` serves bytes as an attachment that a browser never renders on the
UI's origin (active types become text/plain; nosniff; a sandboxing CSP). A trailing ``/``
lists a folder, or with ``?format=tar.gz|zip`` downloads it. ``PUT`` streams the body into
the file; ``DELETE`` removes; ``POST .../mkdir`` and ``POST .../move`` do what they say.
"""

from __future__ import annotations

import mimetypes
from collections.abc import AsyncGenerator
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

from anyio import to_thread
from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from kiln.api.deps import Ctx, CurrentUser, Db, ProjectAccess, ViewProject, WriteProject
from kiln.api.deps import client_address as address_of
from kiln.api.projects import ProjectCreate, ProjectPublic, create_project_with_files
from kiln.api.projects import project_public as public_project
from kiln.db.models import Role
from kiln.domain import audit
from kiln.domain.errors import BadPath, InvalidInput, KilnError, TooLarge
from kiln.storage import files
from kiln.storage.archives import DOWNLOAD_FORMATS, folder_archive
from kiln.storage.safepath import MAX_PATH_BYTES, SafePath, parse_path

router = APIRouter(prefix="/projects", tags=["files"])

FILES = "/{owner}/{project}/files/{path:path}"
# Types a browser would execute or render actively; served as plain text instead.
ACTIVE_TYPES = frozenset(
    {
        "text/html",
        "application/xhtml+xml",
        "image/svg+xml",
        "text/xml",
        "application/xml",
        "text/javascript",
        "application/javascript",
        "application/x-javascript",
        "application/ecmascript",
        "text/ecmascript",
    }
)
USER_CONTENT_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "sandbox; default-src 'none'",
    "Cache-Control": "private, no-cache",
}


class FileEntry(BaseModel):
    name: str
    type: Literal["file", "dir", "symlink"]
    size: int | None = Field(description="Bytes; null for folders.")
    modified: datetime


class PathEntry(FileEntry):
    path: str = Field(description="Project-relative; folders end with '/'.")


class FolderListing(BaseModel):
    path: str = Field(description="The folder, ending with '/' ('' for the top).")
    entries: list[FileEntry]
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next page.")


class FileWritten(BaseModel):
    path: str
    size: int
    modified: datetime


class MkdirBody(BaseModel):
    path: str = Field(min_length=1, max_length=MAX_PATH_BYTES)


class MoveBody(BaseModel):
    source: str = Field(min_length=1, max_length=MAX_PATH_BYTES)
    destination: str = Field(min_length=1, max_length=MAX_PATH_BYTES)


class UnsupportedMediaType(KilnError):
    status = 415
    title = "Unsupported media type"


def content_type_for(name: str) -> str:
    guessed, _ = mimetypes.guess_type(name, strict=False)
    if guessed is None:
        return "application/octet-stream"
    if guessed in ACTIVE_TYPES or guessed.endswith("+xml") or "script" in guessed:
        return "text/plain"
    return guessed


def attachment(filename: str) -> str:
    """A Content-Disposition value that survives any file name (RFC 6266)."""
    fallback = "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\;' else "_" for c in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def _entry(entry: files.Entry) -> dict[str, Any]:
    return {"name": entry.name, "type": entry.type, "size": entry.size, "modified": entry.modified}


def _limits(ctx: Ctx, access: ProjectAccess) -> files.Limits:
    storage = ctx.settings.storage
    quota = access.project.quota_bytes
    return files.Limits(
        storage.max_file_bytes, quota if quota is not None else storage.project_quota_bytes
    )


def _audit(db: Db, access: ProjectAccess, request: Request, action: str, **details: Any) -> None:
    audit.record(
        db,
        action,
        actor=access.user,
        target=f"project:{access.project.owner_name}/{access.project.slug}",
        address=address_of(request),
        **details,
    )
    db.commit()


# ---- reading ----------------------------------------------------------------------------


@router.get(
    FILES,
    response_model=FolderListing,
    responses={200: {"content": {"application/octet-stream": {}}}},
    summary="Read a file, list a folder (trailing '/'), or download a folder as an archive",
)
def read_files(
    path: str,
    access: ViewProject,
    ctx: Ctx,
    archive_format: Annotated[
        Literal["tar.gz", "zip"] | None, Query(alias="format", description="Folders only")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 1000,
    cursor: Annotated[str | None, Query(max_length=2000)] = None,
) -> Response:
    project_dir = ctx.store.project_dir(access.project.id)
    target = parse_path(path, allow_root=True)
    if path.endswith("/") or target.is_root:
        if archive_format is not None:
            return _folder_download(project_dir, target, archive_format, access)
        listing = files.list_dir(project_dir, target, limit, cursor)
        body = FolderListing(
            path=listing.path,
            entries=[FileEntry(**_entry(e)) for e in listing.entries],
            next_cursor=listing.next_cursor,
        )
        return JSONResponse(body.model_dump(mode="json"))
    if archive_format is not None:
        raise BadPath("format= downloads folders; end the path with '/'")
    fd, st = files.open_for_read(project_dir, target)
    headers = {
        **USER_CONTENT_HEADERS,
        "Content-Length": str(st.st_size),
        "Content-Disposition": attachment(target.name),
    }
    return StreamingResponse(
        files.read_chunks(fd, st.st_size),
        media_type=content_type_for(target.name),
        headers=headers,
    )


def _folder_download(
    project_dir: Path, folder: SafePath, fmt: str, access: ProjectAccess
) -> StreamingResponse:
    top = folder.name or access.project.slug
    return StreamingResponse(
        folder_archive(project_dir, folder, fmt, top),
        media_type=DOWNLOAD_FORMATS[fmt],
        headers={**USER_CONTENT_HEADERS, "Content-Disposition": attachment(f"{top}.{fmt}")},
    )


# ---- changing ---------------------------------------------------------------------------


@router.put(
    FILES,
    status_code=201,
    response_model=FileWritten,
    responses={200: {"model": FileWritten, "description": "An existing file was replaced"}},
    openapi_extra={"requestBody": {"content": {"application/octet-stream": {}}, "required": True}},
)
async def write_file(
    path: str, request: Request, access: WriteProject, ctx: Ctx, db: Db
) -> JSONResponse:
    """Write the raw request body to the file (streamed); parent folders are made."""
    if path.endswith("/"):
        raise BadPath("a file path cannot end with '/'; use POST .../mkdir to make a folder")
    target = parse_path(path)
    length = request.headers.get("content-length")
    expected = int(length) if length is not None and length.isdigit() else None
    limits = _limits(ctx, access)
    author = files.commit_author(access.user, ctx.settings.domain)
    project_dir = ctx.store.project_dir(access.project.id)
    await to_thread.run_sync(db.commit)  # end the read transaction: uploads can take long
    written = await files.write_file_async(
        project_dir, target, request.stream(), limits, author, expected
    )
    details = {"path": written.path, "size": written.size, "created": written.created}
    await to_thread.run_sync(partial(_audit, db, access, request, "file.write", **details))
    body = FileWritten(path=written.path, size=written.size, modified=written.modified)
    return JSONResponse(body.model_dump(mode="json"), status_code=201 if written.created else 200)


@router.delete(FILES, status_code=204)
def delete_file(
    path: str,
    access: WriteProject,
    request: Request,
    ctx: Ctx,
    db: Db,
    recursive: Annotated[bool, Query(description="Needed to delete a non-empty folder")] = False,
) -> Response:
    target = parse_path(path)
    author = files.commit_author(access.user, ctx.settings.domain)
    files.delete(ctx.store.project_dir(access.project.id), target, recursive, author)
    _audit(db, access, request, "file.delete", path=str(target), recursive=recursive)
    return Response(status_code=204)


@router.post("/{owner}/{project}/mkdir", status_code=201, response_model=PathEntry)
def make_folder(
    body: MkdirBody, access: WriteProject, request: Request, ctx: Ctx, db: Db
) -> PathEntry:
    """Make a folder (and its missing parents); 409 when it exists."""
    target = parse_path(body.path)
    author = files.commit_author(access.user, ctx.settings.domain)
    entry = files.mkdir(ctx.store.project_dir(access.project.id), target, author)
    _audit(db, access, request, "file.mkdir", path=str(target))
    return PathEntry(path=entry.path, **_entry(entry))


@router.post("/{owner}/{project}/move", response_model=PathEntry)
def move_path(
    body: MoveBody, access: WriteProject, request: Request, ctx: Ctx, db: Db
) -> PathEntry:
    """Move or rename a file or folder; 409 when the destination exists."""
    source, destination = parse_path(body.source), parse_path(body.destination)
    author = files.commit_author(access.user, ctx.settings.domain)
    entry = files.move(ctx.store.project_dir(access.project.id), source, destination, author)
    _audit(db, access, request, "file.move", source=str(source), destination=str(destination))
    return PathEntry(path=entry.path, **_entry(entry))


# ---- new project from an archive --------------------------------------------------------

UPLOAD_FIELDS = ("name", "slug", "owner", "description", "visibility")


async def _limited_form(request: Request, limit: int) -> FormData:
    """The multipart body, parsed while counting: a chunked body cannot pass the limit."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise UnsupportedMediaType("send multipart/form-data with the archive in 'file'")

    async def counted() -> AsyncGenerator[bytes, None]:
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise TooLarge(f"the upload is larger than the limit of {limit} bytes")
            yield chunk

    parser = MultiPartParser(request.headers, counted(), max_files=1, max_fields=10)
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise InvalidInput(f"malformed multipart body: {exc.message}") from exc


@router.post(
    "/upload",
    status_code=201,
    response_model=ProjectPublic,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file", "name"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            **{f: {"type": "string"} for f in UPLOAD_FIELDS},
                        },
                    }
                }
            },
        }
    },
)
async def upload_project(request: Request, ctx: Ctx, db: Db, user: CurrentUser) -> ProjectPublic:
    """Create a project from a .tar.gz, .tgz, .tar or .zip archive, extracted safely."""
    storage = ctx.settings.storage
    form = await _limited_form(request, ctx.settings.web.max_request_bytes)
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidInput("file: attach the archive as the multipart field 'file'")
        # A browser form sends "" for a field left empty: that means "not given".
        fields = {k: form[k] for k in UPLOAD_FIELDS if isinstance(form.get(k), str) and form[k]}
        try:
            body = ProjectCreate.model_validate(fields)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from exc
        staged = await to_thread.run_sync(
            partial(
                ctx.store.stage_archive,
                upload.file,
                upload.filename or "",
                max_bytes=min(storage.max_archive_bytes, storage.project_quota_bytes),
                max_entries=storage.max_archive_entries,
            )
        )
        try:
            project = await to_thread.run_sync(
                create_project_with_files, ctx, db, user, body, address_of(request), staged
            )
        finally:
            ctx.store.discard_staged(staged)  # gone already when the project was created
    finally:
        await form.close()
    return public_project(project, Role.admin, str(request.base_url))
