"""``kiln.sdk.Client``: a typed HTTPS client for the Kiln REST API.

    from kiln.sdk import Client

    with Client("https://localhost:8443", "kiln_...", verify=".kiln-data/pki/ca.crt") as kiln:
        project = kiln.create_project("demo", template="python-starter")
        kiln.upload(project.owner, project.slug, "train.py")
        for entry in kiln.list_files(project.owner, project.slug):
            print(entry.name, entry.size)

Or reuse the login of the ``kiln`` CLI: ``Client.from_config()``. Every failure raises a
``KilnSDKError``; an error answer of the server raises ``KilnAPIError`` carrying the server's
own ``detail``.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self
from urllib.parse import quote

import httpx

from kiln import __version__
from kiln.sdk.applications import ApplicationsAPI
from kiln.sdk.builds import BuildsAPI
from kiln.sdk.config import load_login
from kiln.sdk.errors import KilnAPIError, KilnConnectionError, KilnSDKError, KilnTLSError
from kiln.sdk.jobs import JobsAPI
from kiln.sdk.model_serving import ModelsAPI
from kiln.sdk.models import (
    ApiKey,
    ApiKeyCreated,
    FileEntry,
    FileWritten,
    PathEntry,
    Project,
    User,
)
from kiln.sdk.sessions import SessionsAPI

Verify = bool | str | os.PathLike[str]
Progress = Callable[[int, int | None], None]
"""Called with (bytes done, total bytes or None) while a file streams."""

CHUNK = 256 * 1024
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)


def normalize_url(url: str) -> str:
    """``localhost:8443`` -> ``https://localhost:8443/``: HTTPS unless told otherwise."""
    url = url.strip()
    if not url:
        raise KilnSDKError("the server URL is empty")
    if "://" not in url:
        url = f"https://{url}"
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise KilnSDKError(f"not a server URL: {url!r} (expected https://HOST[:PORT])")
    return url if url.endswith("/") else url + "/"


def _tls(verify: Verify) -> ssl.SSLContext | bool:
    if verify is True or verify is False:
        return verify
    path = Path(verify)
    if not path.is_file():
        raise KilnSDKError(f"CA file {path} does not exist")
    try:
        return ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:
        raise KilnSDKError(f"CA file {path} is not a PEM certificate: {exc.reason}") from exc


def _is_certificate_failure(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return "CERTIFICATE_VERIFY_FAILED" in str(exc)


def _connection_error(url: str, exc: httpx.HTTPError) -> KilnConnectionError:
    if _is_certificate_failure(exc):
        return KilnTLSError(url, "its TLS certificate is not trusted")
    if isinstance(exc, httpx.TimeoutException):
        return KilnConnectionError(url, "timed out")
    reason = str(exc) or type(exc).__name__
    return KilnConnectionError(url, reason)


def raise_for_problem(response: httpx.Response) -> None:
    """Turn an error answer into ``KilnAPIError``, keeping the server's ``detail``."""
    if response.is_success:
        return
    title = response.reason_phrase or "Error"
    detail = ""
    if "json" in response.headers.get("content-type", ""):
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            title = str(body.get("title") or title)
            detail = str(body.get("detail") or "")
    if not detail:
        text = response.text.strip()
        detail = text[:300] if text and "<html" not in text[:200].lower() else ""
    raise KilnAPIError(response.status_code, title, detail or f"HTTP {response.status_code}")


def _http(
    url: str, verify: Verify, timeout: httpx.Timeout, transport: httpx.BaseTransport | None
) -> httpx.Client:
    return httpx.Client(
        base_url=normalize_url(url) + "api/v1/",
        verify=_tls(verify),
        timeout=timeout,
        headers={"User-Agent": f"kiln-sdk/{__version__}"},
        transport=transport,
        follow_redirects=False,
    )


def _send(http: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
    try:
        response = http.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        site = str(http.base_url).removesuffix("api/v1/")
        raise _connection_error(site, exc) from exc
    raise_for_problem(response)
    return response


def create_api_key_with_password(
    url: str,
    username: str,
    password: str,
    name: str = "",
    verify: Verify = True,
    expires_at: datetime | None = None,
    *,
    timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    transport: httpx.BaseTransport | None = None,
) -> ApiKeyCreated:
    """Exchange a username and password for a new API key (the only use of a password)."""
    body: dict[str, Any] = {"name": name}
    if expires_at is not None:
        body["expires_at"] = expires_at.isoformat()
    with _http(url, verify, timeout, transport) as http:
        response = _send(http, "POST", "auth/api-keys", json=body, auth=(username, password))
    return ApiKeyCreated.model_validate(response.json())


def _segment(value: str) -> str:
    return quote(value, safe="")


def remote_basename(path: str) -> str:
    """The last component of a project path: the local name a download gets by default."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if not name or name in (".", ".."):
        raise KilnSDKError(f"{path!r} does not name a file")
    return name


def _file_path(path: str) -> str:
    """A project-relative path as URL path segments (the server checks it for safety).

    ``.`` and ``..`` are percent-encoded: left literal, the HTTP client would resolve them
    (``a/../b`` -> ``b``) and silently address another file; encoded, they reach the server,
    which refuses them with a precise error.
    """
    segments = path.strip("/").split("/")
    return "/".join(
        s.replace(".", "%2E") if s in (".", "..") else quote(s, safe="") for s in segments
    )


class Client(JobsAPI, SessionsAPI, BuildsAPI, ApplicationsAPI, ModelsAPI):
    """A session with one Kiln site, authenticated by an API key.

    ``verify`` is ``True`` (system trust), a CA certificate file such as
    ``DATA_DIR/pki/ca.crt`` of a site started with ``kiln up``, or ``False`` (no checking).
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        verify: Verify = True,
        *,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = normalize_url(url)
        self._http = _http(self.url, verify, timeout, transport)
        self._http.headers["Authorization"] = f"Bearer {api_key}"

    @classmethod
    def from_config(cls, directory: Path | None = None) -> Self:
        """A client for the site and key saved by ``kiln login``."""
        login = load_login(directory)
        return cls(login.url, login.api_key, login.verify)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return _send(self._http, method, path, **kwargs)

    # ---- identity and API keys -----------------------------------------------------------

    def me(self) -> User:
        return User.model_validate(self._request("GET", "auth/me").json())

    def list_api_keys(self) -> list[ApiKey]:
        """The caller's live (not revoked) keys."""
        return [ApiKey.model_validate(k) for k in self._request("GET", "auth/api-keys").json()]

    def create_api_key(self, name: str = "", expires_at: datetime | None = None) -> ApiKeyCreated:
        body: dict[str, Any] = {"name": name}
        if expires_at is not None:
            body["expires_at"] = expires_at.isoformat()
        return ApiKeyCreated.model_validate(
            self._request("POST", "auth/api-keys", json=body).json()
        )

    def revoke_api_key(self, key_id: int) -> None:
        self._request("DELETE", f"auth/api-keys/{int(key_id)}")

    # ---- projects ------------------------------------------------------------------------

    def iter_projects(self, q: str | None = None, page_size: int = 100) -> Iterator[Project]:
        """Every project the caller may see, fetching pages as the iteration goes."""
        params: dict[str, Any] = {"limit": page_size}
        if q:
            params["q"] = q
        while True:
            page = self._request("GET", "projects", params=params).json()
            yield from (Project.model_validate(p) for p in page["items"])
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    def list_projects(self, q: str | None = None) -> list[Project]:
        return list(self.iter_projects(q))

    def create_project(
        self,
        name: str,
        template: str | None = None,
        owner: str | None = None,
        visibility: str = "private",
        *,
        slug: str | None = None,
        description: str = "",
    ) -> Project:
        """Create a blank project, or one from a built-in template such as python-starter."""
        body = {
            "name": name,
            "template": template,
            "owner": owner,
            "visibility": visibility,
            "slug": slug,
            "description": description,
        }
        body = {k: v for k, v in body.items() if v is not None}
        return Project.model_validate(self._request("POST", "projects", json=body).json())

    def _project(self, owner: str, slug: str) -> str:
        return f"projects/{_segment(owner)}/{_segment(slug)}"

    def get_project(self, owner: str, slug: str) -> Project:
        return Project.model_validate(self._request("GET", self._project(owner, slug)).json())

    def delete_project(self, owner: str, slug: str) -> None:
        self._request("DELETE", self._project(owner, slug))

    # ---- files ---------------------------------------------------------------------------

    def _files(self, owner: str, slug: str, path: str) -> str:
        return f"{self._project(owner, slug)}/files/{_file_path(path)}"

    def iter_files(
        self, owner: str, slug: str, path: str = "", page_size: int | None = None
    ) -> Iterator[FileEntry]:
        """The entries of a folder of the project ("" is its top), sorted by name."""
        url = self._files(owner, slug, path)
        url = url if url.endswith("/") else url + "/"
        params: dict[str, Any] = {} if page_size is None else {"limit": page_size}
        while True:
            page = self._request("GET", url, params=params).json()
            yield from (FileEntry.model_validate(e) for e in page["entries"])
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    def list_files(self, owner: str, slug: str, path: str = "") -> list[FileEntry]:
        return list(self.iter_files(owner, slug, path))

    def read_file(self, owner: str, slug: str, path: str) -> bytes:
        return self._request("GET", self._files(owner, slug, path)).content

    def download(
        self,
        owner: str,
        slug: str,
        path: str,
        dest: str | os.PathLike[str] | BinaryIO,
        progress: Progress | None = None,
    ) -> Path | None:
        """Stream a file to ``dest``: a file path, an existing directory, or a binary file.

        A path is written through a temporary file in the same directory and renamed at the
        end, so a failed download never leaves a truncated file behind. Returns the path
        written (``None`` for a file object).
        """
        return self._download(self._files(owner, slug, path), remote_basename(path), dest, progress)

    def download_folder(
        self,
        owner: str,
        slug: str,
        path: str,
        dest: str | os.PathLike[str] | BinaryIO,
        archive_format: str = "tar.gz",
        progress: Progress | None = None,
    ) -> Path | None:
        """Stream a folder ("" for the whole project) as a ``tar.gz`` or ``zip`` archive."""
        url = self._files(owner, slug, path).rstrip("/") + "/?format=" + quote(archive_format)
        name = path.strip("/").rsplit("/", 1)[-1] or slug
        return self._download(url, f"{name}.{archive_format}", dest, progress)

    def _download(
        self,
        url: str,
        default_name: str,
        dest: str | os.PathLike[str] | BinaryIO,
        progress: Progress | None,
    ) -> Path | None:
        if not isinstance(dest, str | os.PathLike):
            self._stream_to(url, dest, progress)
            return None
        target = Path(dest)
        if target.is_dir():
            target = target / default_name
        tmp = target.with_name(f".{target.name}.kiln-download")
        try:
            with open(tmp, "wb") as out:
                self._stream_to(url, out, progress)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target

    def _stream_to(self, url: str, out: BinaryIO, progress: Progress | None) -> None:
        try:
            with self._http.stream("GET", url) as response:
                if not response.is_success:
                    response.read()
                    raise_for_problem(response)
                length = response.headers.get("content-length")
                total = int(length) if length and length.isdigit() else None
                for chunk in response.iter_bytes(CHUNK):
                    out.write(chunk)
                    if progress is not None:
                        progress(response.num_bytes_downloaded, total)
        except httpx.HTTPError as exc:
            raise _connection_error(self.url, exc) from exc

    def upload(
        self,
        owner: str,
        slug: str,
        local_path: str | os.PathLike[str],
        remote_path: str | None = None,
        progress: Progress | None = None,
    ) -> FileWritten:
        """Stream a local file into the project (``remote_path`` defaults to its name;
        a ``remote_path`` ending in ``/`` is a directory to put it in)."""
        source = Path(local_path)
        if not source.is_file():
            raise KilnSDKError(f"{source} is not a file")
        if remote_path is None or remote_path == "":
            remote_path = source.name
        elif remote_path.endswith("/"):
            remote_path += source.name
        size = source.stat().st_size

        def chunks() -> Iterator[bytes]:
            done = 0
            with open(source, "rb") as f:
                while chunk := f.read(CHUNK):
                    done += len(chunk)
                    yield chunk
                    if progress is not None:
                        progress(done, size)

        response = self._request(
            "PUT",
            self._files(owner, slug, remote_path),
            content=chunks(),
            headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
        )
        return FileWritten.model_validate(response.json())

    def write_file(self, owner: str, slug: str, path: str, data: bytes) -> FileWritten:
        response = self._request("PUT", self._files(owner, slug, path), content=data)
        return FileWritten.model_validate(response.json())

    def delete_file(self, owner: str, slug: str, path: str, recursive: bool = False) -> None:
        """Delete a file or an empty folder; ``recursive=True`` for a folder and its content."""
        params = {"recursive": "true"} if recursive else None
        self._request("DELETE", self._files(owner, slug, path), params=params)

    def mkdir(self, owner: str, slug: str, path: str) -> PathEntry:
        """Make a folder and its missing parents (409 when it exists)."""
        response = self._request("POST", f"{self._project(owner, slug)}/mkdir", json={"path": path})
        return PathEntry.model_validate(response.json())

    def move(self, owner: str, slug: str, source: str, destination: str) -> PathEntry:
        """Move or rename a file or folder (409 when ``destination`` exists)."""
        response = self._request(
            "POST",
            f"{self._project(owner, slug)}/move",
            json={"source": source, "destination": destination},
        )
        return PathEntry.model_validate(response.json())
