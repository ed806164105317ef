"""The registry's storage seam: content-addressed blobs and uploads in progress.

``BlobStore`` keeps bytes only; which repository sees which blob is the metadata's business
(``kiln.build.registry.service``). Today it is a directory (``DATA_DIR/registry``)::

    blobs/sha256/ab/ab12…        one file per verified blob, named by its digest
    uploads/<32 hex>/data        an upload in progress (its size is its offset)
    uploads/<32 hex>/info.json   the repository it belongs to, when it started
    locks/sha256-ab.lock         flock stripes serialising commits and deletions per digest

A later deployment can put the same interface on a volume or an object store (uploads as
multipart uploads, ``local_path`` returning None).

Rules that keep it correct:
- A blob becomes visible only by ``rename`` of a complete, fsynced upload whose digest was
  checked; nothing else ever writes under ``blobs/``.
- ``lock(digest)`` is held around "commit the file + record it in the database" and around
  "check unreferenced + delete": the garbage collector can never delete a blob that a
  concurrent push has just recorded again.
- Upload ids are random and checked against ``[0-9a-f]{32}`` before they touch a path.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from kiln.build.registry.errors import (
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    SizeInvalid,
)
from kiln.build.registry.names import ALGORITHMS, check_digest
from kiln.domain.errors import QuotaExceeded

CHUNK = 1 << 20
_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class UploadInfo:
    id: str
    repository: str
    size: int  # bytes received so far: the next chunk starts here
    started_at: datetime
    touched_at: float  # epoch seconds of the last write


@dataclass(frozen=True)
class StoredBlob:
    digest: str
    size: int
    modified_at: float  # epoch seconds


class UploadWriter:
    """Appends to one upload while holding its lock; hashes as it goes when it can."""

    def __init__(self, store: BlobStore, upload_id: str, fd: int, size: int, limit: int) -> None:
        self.store, self.upload_id, self.fd = store, upload_id, fd
        self.size, self.limit = size, limit
        self._hash = store._take_hash(upload_id, size)

    def write(self, data: bytes | memoryview) -> None:
        if self.size + len(data) > self.limit:
            raise SizeInvalid(
                f"the blob is larger than this registry's upload limit of {self.limit} bytes",
                status=413,
            )
        view = memoryview(data)
        try:
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
        except OSError as exc:
            self._hash = None  # part of ``data`` may be in the file: re-read at commit
            self.size = os.fstat(self.fd).st_size
            raise _storage_error(exc) from exc
        self.size += len(data)
        if self._hash is not None:
            self._hash.update(data)

    def digest(self) -> str | None:
        """The sha256 digest of everything written so far, when it was hashed on the way."""
        return None if self._hash is None else f"sha256:{self._hash.hexdigest()}"

    def close(self) -> None:
        if self._hash is not None:
            self.store._keep_hash(self.upload_id, self.size, self._hash)
        os.close(self.fd)  # releases the upload's lock


class BlobStore:
    """Content-addressed blobs under ``root`` (see the module doc)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._hashes: dict[str, tuple[int, hashlib._Hash]] = {}
        self._hashes_guard = threading.Lock()
        for sub in ("blobs", "uploads", "locks"):
            (root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)

    # -- blobs ------------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        algorithm, _, hex_ = check_digest(digest).partition(":")
        return self.root / "blobs" / algorithm / hex_[:2] / hex_

    def local_path(self, digest: str) -> Path | None:
        """The blob's file, for serving it without copying through Python; None if absent."""
        path = self.blob_path(digest)
        return path if path.is_file() else None

    def size(self, digest: str) -> int | None:
        try:
            return self.blob_path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def open(self, digest: str) -> BinaryIO:
        try:
            return self.blob_path(digest).open("rb")
        except FileNotFoundError:
            raise BlobUnknown(f"blob {digest} is not in the store") from None

    def delete(self, digest: str) -> bool:
        """Remove a blob's bytes (call with ``lock(digest)`` held, after its last record)."""
        try:
            self.blob_path(digest).unlink()
            return True
        except FileNotFoundError:
            return False

    def iter_blobs(self) -> Iterator[StoredBlob]:
        for algorithm in ALGORITHMS:
            base = self.root / "blobs" / algorithm
            if not base.is_dir():
                continue
            for stripe in sorted(base.iterdir()):
                for path in sorted(stripe.iterdir()):
                    try:
                        st = path.stat()
                    except FileNotFoundError:
                        continue
                    yield StoredBlob(f"{algorithm}:{path.name}", st.st_size, st.st_mtime)

    @contextmanager
    def lock(self, digest: str) -> Iterator[None]:
        """Serialises commits and deletions of one digest across threads and processes."""
        algorithm, _, hex_ = check_digest(digest).partition(":")
        path = self.root / "locks" / f"{algorithm}-{hex_[:2]}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- uploads ----------------------------------------------------------------------------
    def _upload_dir(self, upload_id: str) -> Path:
        if not _UPLOAD_ID.fullmatch(upload_id):
            raise BlobUploadUnknown(f"upload {upload_id[:80]!r} is unknown")
        return self.root / "uploads" / upload_id

    def create_upload(self, repository: str) -> UploadInfo:
        upload_id = secrets.token_hex(16)
        directory = self._upload_dir(upload_id)
        try:
            directory.mkdir(mode=0o700)
            info = {"repository": repository, "started_at": datetime.now(UTC).isoformat()}
            (directory / "info.json").write_text(json.dumps(info))
            (directory / "data").touch(mode=0o600)
        except OSError as exc:
            shutil.rmtree(directory, ignore_errors=True)
            raise _storage_error(exc) from exc
        return self.upload_info(upload_id, repository)

    def upload_info(self, upload_id: str, repository: str | None = None) -> UploadInfo:
        """The upload, which must belong to ``repository`` when one is given (an upload is
        finished in the repository it was started in, by whoever may push there)."""
        directory = self._upload_dir(upload_id)
        try:
            info = json.loads((directory / "info.json").read_text())
            st = (directory / "data").stat()
        except (FileNotFoundError, ValueError):
            raise BlobUploadUnknown(f"upload {upload_id} is unknown or finished") from None
        if repository is not None and info.get("repository") != repository:
            raise BlobUploadUnknown(f"upload {upload_id} is unknown in {repository}")
        return UploadInfo(
            upload_id,
            str(info.get("repository")),
            st.st_size,
            datetime.fromisoformat(info["started_at"]),
            st.st_mtime,
        )

    def open_writer(self, upload_id: str, start: int | None, limit: int) -> UploadWriter:
        """A writer appending at the upload's end, which must be ``start`` when the client
        says where its chunk starts (chunks arrive in order or are refused with 416)."""
        path = self._upload_dir(upload_id) / "data"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BlobUploadUnknown(f"upload {upload_id} is unknown or finished") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BlobUploadInvalid(
                    f"another request is writing upload {upload_id}", status=416
                ) from None
            size = os.fstat(fd).st_size
            if start is not None and start != size:
                raise BlobUploadInvalid(
                    f"chunk starts at byte {start} but the upload has {size} bytes: "
                    "chunks must arrive in order",
                    status=416,
                    headers={"Range": byte_range(size)},
                )
            return UploadWriter(self, upload_id, fd, size, limit)
        except BaseException:
            os.close(fd)
            raise

    def commit_upload(self, upload_id: str, digest: str) -> int:
        """Verify the upload against ``digest`` and make it the blob ``digest`` (atomic).
        Returns the size. On a mismatch the upload is discarded. Hold ``lock(digest)``."""
        check_digest(digest)
        directory = self._upload_dir(upload_id)
        data = directory / "data"
        try:
            fd = os.open(data, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BlobUploadUnknown(f"upload {upload_id} is unknown or finished") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BlobUploadInvalid(f"another request is writing upload {upload_id}") from None
        try:
            size = os.fstat(fd).st_size
            actual = self._digest_of_upload(upload_id, fd, size, digest)
            if actual != digest:
                self._forget_hash(upload_id)
                shutil.rmtree(directory, ignore_errors=True)
                raise DigestInvalid(
                    f"the uploaded content has digest {actual}, not {digest}; upload discarded",
                    detail={"expected": digest, "actual": actual},
                )
            self._publish(data, fd, digest)
        finally:
            os.close(fd)
        self._forget_hash(upload_id)
        shutil.rmtree(directory, ignore_errors=True)
        return size

    def cancel_upload(self, upload_id: str) -> None:
        directory = self._upload_dir(upload_id)
        if not directory.is_dir():
            raise BlobUploadUnknown(f"upload {upload_id} is unknown or finished")
        self._forget_hash(upload_id)
        shutil.rmtree(directory, ignore_errors=True)

    def list_uploads(self) -> Iterator[UploadInfo]:
        for directory in (self.root / "uploads").iterdir():
            if _UPLOAD_ID.fullmatch(directory.name):
                try:
                    yield self.upload_info(directory.name)
                except BlobUploadUnknown:
                    # Half-created (crash between mkdir and info.json): report it as stale.
                    st = directory.stat()
                    yield UploadInfo(directory.name, "", 0, datetime.now(UTC), st.st_mtime)

    # -- internals --------------------------------------------------------------------------
    def _publish(self, data: Path, fd: int, digest: str) -> None:
        final = self.blob_path(digest)
        if final.is_file():
            return  # same content already stored; the upload is dropped by the caller
        try:
            os.fsync(fd)
            final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.rename(data, final)
            dir_fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise _storage_error(exc) from exc

    def _digest_of_upload(self, upload_id: str, fd: int, size: int, digest: str) -> str:
        algorithm = digest.partition(":")[0]
        kept = self._take_hash(upload_id, size)
        if kept is not None and kept.name == algorithm:
            return f"{algorithm}:{kept.hexdigest()}"
        h = hashlib.new(algorithm)
        os.lseek(fd, 0, os.SEEK_SET)
        while chunk := os.read(fd, CHUNK):
            h.update(chunk)
        return f"{algorithm}:{h.hexdigest()}"

    # A running sha256 per upload, kept between the requests of a chunked upload so the final
    # PUT need not read the whole upload back. In-process only: another web worker (or a
    # restart) has none and re-reads the file instead.
    def _take_hash(self, upload_id: str, size: int) -> hashlib._Hash | None:
        with self._hashes_guard:
            kept = self._hashes.pop(upload_id, None)
        if kept is not None and kept[0] == size:
            return kept[1]
        return hashlib.sha256() if size == 0 else None

    def _keep_hash(self, upload_id: str, size: int, h: hashlib._Hash) -> None:
        with self._hashes_guard:
            self._hashes[upload_id] = (size, h.copy())

    def _forget_hash(self, upload_id: str) -> None:
        with self._hashes_guard:
            self._hashes.pop(upload_id, None)


def byte_range(size: int) -> str:
    """The ``Range`` header of an upload holding ``size`` bytes (inclusive end)."""
    return f"0-{max(size - 1, 0)}"


def _storage_error(exc: OSError) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return QuotaExceeded("the registry's storage is full")
    return exc
