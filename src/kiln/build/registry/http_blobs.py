"""Blob routes of ``/v2/``: download (with ranges), delete, and the upload protocol —
monolithic (``POST ?digest=``, or ``POST`` then ``PUT`` with the body), chunked (``PATCH``
with ``Content-Range``, strictly in order: anything else is 416 with the ``Range`` the
upload has), streamed (``PATCH`` without ``Content-Range``), and cross-repository mounts.

An upload's body is written to disk as it arrives, in writes of at most ``WRITE_SIZE``,
each in a worker thread, hashed on the way; the blob becomes visible only when the final
``PUT`` names a digest that matches (``Registry.finish_upload``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.responses import FileResponse, Response
from starlette.types import Receive, Scope, Send

from kiln.build.registry.access import PULL, allowed_actions
from kiln.build.registry.errors import (
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    NameInvalid,
    SizeInvalid,
)
from kiln.build.registry.http_context import Call, check_active
from kiln.build.registry.names import check_digest, parse_repository
from kiln.build.registry.service import BlobInfo
from kiln.build.registry.storage import UploadWriter, byte_range
from kiln.db.models import User
from kiln.db.registry_models import RegistryBlobLink, RegistryRepository

WRITE_SIZE = 4 << 20
STREAM_CHUNK = 4 << 20
MOUNT_CANDIDATES = 20
_SINGLE_RANGE = re.compile(r"bytes=(\d{1,18})-(\d{1,18})")
_CONTENT_RANGE = re.compile(r"(?:bytes[ =])?(\d{1,18})-(\d{1,18})(?:/(?:\d+|\*))?")


class BlobFile(FileResponse):
    """A blob from its file, for range requests: large reads (the default 64 KiB costs a
    thread hop each)."""

    chunk_size = 4 << 20


class BlobStream(Response):
    """A whole blob, streamed with read-ahead: a worker thread reads the next batch while
    the event loop encrypts and sends this one (the two overlap on two cores)."""

    def __init__(self, path: Path, size: int, headers: dict[str, str]) -> None:
        super().__init__(
            status_code=200,
            headers={**headers, "Content-Length": str(size), "Accept-Ranges": "bytes"},
            media_type="application/octet-stream",
        )
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        if scope["method"] == "HEAD":
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        with self.path.open("rb", buffering=0) as source:
            ahead = asyncio.ensure_future(run_in_threadpool(source.read, STREAM_CHUNK))
            try:
                while chunk := await ahead:
                    ahead = asyncio.ensure_future(run_in_threadpool(source.read, STREAM_CHUNK))
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            finally:
                await asyncio.gather(ahead, return_exceptions=True)  # before the file closes
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def get_blob(call: Call) -> Response:
    digest = check_digest(call.params["digest"])
    blob = await call.run(call.http.registry.stat_blob, call.name, digest)
    path = call.http.registry.store.local_path(digest)
    if path is None:
        raise BlobUnknown(f"blob {digest} is unknown in {call.name}")
    headers = {"Docker-Content-Digest": digest, "Cache-Control": "max-age=31536000"}
    if _unsatisfiable(call.request.headers.get("range"), blob.size):
        return Response(
            status_code=416, headers={**headers, "Content-Range": f"bytes */{blob.size}"}
        )
    if call.request.headers.get("range"):
        return BlobFile(path, headers=headers, media_type="application/octet-stream")
    return BlobStream(path, blob.size, headers)


def _unsatisfiable(header: str | None, size: int) -> bool:
    """A single range that ends before it starts (``bytes=500-0``) asks for nothing this
    blob has: 416, where Starlette would answer 400."""
    match = None if header is None else _SINGLE_RANGE.fullmatch(header.strip())
    return match is not None and int(match[2]) < int(match[1])


async def delete_blob(call: Call) -> Response:
    await check_active(call)
    await call.run(call.http.registry.delete_blob, call.name, call.params["digest"])
    return Response(status_code=202)


def _created(call: Call, blob: BlobInfo) -> Response:
    return Response(
        status_code=201,
        headers={
            "Location": f"/v2/{call.name}/blobs/{blob.digest}",
            "Docker-Content-Digest": blob.digest,
        },
    )


def _accepted(call: Call, upload_id: str, size: int, status: int = 202) -> Response:
    return Response(
        status_code=status,
        headers={
            "Location": f"/v2/{call.name}/blobs/uploads/{upload_id}",
            "Range": byte_range(size),
            "Docker-Upload-UUID": upload_id,
        },
    )


async def start_upload(call: Call) -> Response:
    query = call.request.query_params
    mount = query.get("mount")
    if mount is not None:
        blob = await _mount(call, check_digest(mount), query.get("from"))
        if blob is not None:
            return _created(call, blob)
    digest = query.get("digest")
    if digest is not None:
        check_digest(digest)
    _check_length(call)
    registry = call.http.registry
    upload = await run_in_threadpool(registry.start_upload, call.name)
    if digest is None:
        return _accepted(call, upload.id, 0)
    try:
        await _receive(call, upload.id, start=0)
        blob = await call.run(registry.finish_upload, call.name, upload.id, digest)
    except BaseException:
        await run_in_threadpool(_discard, call, upload.id)
        raise
    return _created(call, blob)


async def _mount(call: Call, digest: str, source: str | None) -> BlobInfo | None:
    """Mount from ``source`` if the caller may pull there; without ``source``, from any
    repository holding the blob that the caller may pull from. None: upload it instead."""
    registry = call.http.registry
    if source is not None:
        try:
            parse_repository(source)
        except NameInvalid:
            return None
        if not await call.run(_may_pull, call, source):
            return None
        return await call.run(registry.mount_blob, call.name, digest, source)
    for candidate in await call.run(_holders, digest):
        if candidate != call.name and await call.run(_may_pull, call, candidate):
            blob = await call.run(registry.mount_blob, call.name, digest, candidate)
            if blob is not None:
                return blob
    return None


def _holders(db: Session, digest: str) -> list[str]:
    return list(
        db.scalars(
            select(RegistryRepository.name)
            .join(RegistryBlobLink, RegistryBlobLink.repository_id == RegistryRepository.id)
            .where(RegistryBlobLink.digest == digest)
            .order_by(RegistryRepository.id)
            .limit(MOUNT_CANDIDATES)
        )
    )


def _may_pull(db: Session, call: Call, repository: str) -> bool:
    """By the token's grants, else by the roles of the user it was issued to."""
    principal = call.principal
    if principal.claims is not None and principal.claims.allows(repository, PULL):
        return True
    user = principal.user or (db.get(User, principal.user_id) if principal.user_id else None)
    return PULL in allowed_actions(db, user, repository)


async def upload_status(call: Call) -> Response:
    info = await run_in_threadpool(
        call.http.registry.store.upload_info, call.params["upload"], call.name
    )
    return _accepted(call, info.id, info.size, status=204)


async def patch_upload(call: Call) -> Response:
    upload_id = call.params["upload"]
    start = _chunk_start(call)
    _check_length(call)
    size = await _receive(call, upload_id, start)
    return _accepted(call, upload_id, size)


async def finish_upload(call: Call) -> Response:
    upload_id = call.params["upload"]
    digest = call.request.query_params.get("digest")
    if digest is None:
        raise BlobUploadInvalid("finishing an upload needs ?digest=")
    check_digest(digest)
    registry = call.http.registry
    info = await run_in_threadpool(registry.store.upload_info, upload_id, call.name)
    has_body = call.request.headers.get("content-length", "0") != "0" or (
        "chunked" in call.request.headers.get("transfer-encoding", "")
    )
    if has_body:
        _check_length(call)
        start = _chunk_start(call)
        await _receive(call, upload_id, info.size if start is None else start)
    blob = await call.run(registry.finish_upload, call.name, upload_id, digest)
    return _created(call, blob)


async def cancel_upload(call: Call) -> Response:
    registry = call.http.registry
    await run_in_threadpool(registry.store.upload_info, call.params["upload"], call.name)
    await run_in_threadpool(registry.store.cancel_upload, call.params["upload"])
    return Response(status_code=204)


def _chunk_start(call: Call) -> int | None:
    """Where the client says its chunk starts (``Content-Range: <start>-<end>``)."""
    header = call.request.headers.get("content-range")
    if header is None:
        return None
    match = _CONTENT_RANGE.fullmatch(header.strip())
    if match is None or int(match[2]) < int(match[1]):
        raise BlobUploadInvalid(f"malformed Content-Range {header[:60]!r}", status=416)
    length = call.request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) != int(match[2]) - int(match[1]) + 1:
        raise BlobUploadInvalid(
            f"Content-Range {header[:60]!r} does not match Content-Length {length}", status=416
        )
    return int(match[1])


def _check_length(call: Call) -> None:
    length = call.request.headers.get("content-length")
    limit = call.http.settings.registry.max_upload_bytes
    if length is not None and length.isdigit() and int(length) > limit:
        raise SizeInvalid(
            f"the blob is larger than this registry's upload limit of {limit} bytes", status=413
        )


async def _receive(call: Call, upload_id: str, start: int | None) -> int:
    """Append the request body to the upload; returns the upload's size after it.

    Writes are double-buffered: while a worker thread writes and hashes one batch, the event
    loop goes on receiving (and decrypting) the next, so the two use both cores."""
    store = call.http.registry.store
    limit = call.http.settings.registry.max_upload_bytes
    writer: UploadWriter = await run_in_threadpool(store.open_writer, upload_id, start, limit)
    received = writer.size
    pending: list[bytes] = []
    pending_size = 0
    in_flight: asyncio.Future[None] | None = None
    try:
        async for chunk in call.request.stream():
            if not chunk:
                continue
            received += len(chunk)
            if received > limit:
                raise SizeInvalid(
                    f"the blob is larger than this registry's upload limit of {limit} bytes",
                    status=413,
                )
            pending.append(chunk)
            pending_size += len(chunk)
            if pending_size >= WRITE_SIZE:
                if in_flight is not None:
                    await in_flight
                batch, pending, pending_size = b"".join(pending), [], 0
                in_flight = asyncio.ensure_future(run_in_threadpool(writer.write, batch))
        if in_flight is not None:
            await in_flight
            in_flight = None
        if pending:
            await run_in_threadpool(writer.write, b"".join(pending))
    except BaseException as exc:
        if in_flight is not None:  # never close the file under a write in progress
            await asyncio.gather(in_flight, return_exceptions=True)
        await run_in_threadpool(writer.close)
        if isinstance(exc, SizeInvalid):
            await run_in_threadpool(_discard, call, upload_id)
        raise
    await run_in_threadpool(writer.close)
    return writer.size


def _discard(call: Call, upload_id: str) -> None:
    with contextlib.suppress(BlobUploadUnknown):  # finished or cancelled meanwhile
        call.http.registry.store.cancel_upload(upload_id)
