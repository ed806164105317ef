"""A small client of the OCI distribution API, with the Docker token flow.

What a build needs and no more: does a blob exist, mount one from another repository, upload
one (monolithic ``POST`` + ``PUT ?digest=``), put and get manifests, download a blob. Any
registry speaking the distribution spec works: Kiln's own, the CNCF ``distribution``
registry (Debian's ``docker-registry``), ...

Authentication follows the registry's ``WWW-Authenticate`` challenge: ``Basic`` sends the
credentials; ``Bearer realm=…,service=…,scope=…`` fetches a short-lived token from the realm
(with the credentials as HTTP Basic, as ``podman login`` does) for exactly the scopes the
call needs, and retries once. Tokens are kept per scope set until they expire. A client
given a ``token_source`` (Kiln's builder talking to Kiln's own registry) mints its tokens
itself for those scopes and sends no password anywhere.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx

from kiln.build.layers import INDEX_TYPES, MANIFEST, MANIFEST_TYPES, Blob, sha256_digest

ACCEPT_MANIFESTS = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))
_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')
_REFERENCE = re.compile(
    r"^(?P<repo>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9._-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)
TIMEOUT = httpx.Timeout(60.0, connect=10.0)
# Scopes ("repository:alice/churn/app:pull,push") -> (bearer token, lifetime in seconds).
TokenSource = Callable[[tuple[str, ...]], tuple[str, int]]


class RegistryError(Exception):
    """The registry refused or failed; the message says what and why (its own error text)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Reference:
    """``repository[:tag][@digest]`` inside one registry."""

    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        match = _REFERENCE.match(text)
        if match is None or len(match["repo"]) > 255:
            raise ValueError(
                f"{text[:300]!r} is not an image reference (repository[:tag][@sha256:…], "
                "lowercase repository components)"
            )
        return cls(match["repo"], match["tag"], match["digest"])

    @property
    def ref(self) -> str:
        """What to put in a manifest URL: the digest when there is one."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        text = self.repository
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


@dataclass(frozen=True)
class Manifest:
    data: bytes
    media_type: str
    digest: str


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.partition(" ")
    return scheme.lower(), dict(_CHALLENGE.findall(rest))


def _problem(response: httpx.Response) -> str:
    """The registry's own error text (the spec's ``{"errors": [...]}`` body), if any."""
    try:
        errors = response.json().get("errors") or []
        text = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors if e)
    except (ValueError, AttributeError):
        text = response.text[:300]
    return text or response.reason_phrase


class RegistryClient:
    """Thread-safe; one per registry and set of credentials."""

    def __init__(
        self,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        verify: str | bool = True,
        token_source: TokenSource | None = None,
    ) -> None:
        """``verify``: True (the system's CAs), False, or a CA bundle file to trust."""
        self.url = url.rstrip("/")
        self._token_source = token_source
        self._auth = (username, password or "") if username else None
        tls: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify
        )
        self._http = httpx.Client(verify=tls, timeout=TIMEOUT, follow_redirects=False)
        self._tokens: dict[tuple[str, ...], tuple[str, float]] = {}
        # The registry's last challenge: later calls authenticate up front (one round trip).
        self._scheme: str | None = "bearer" if token_source else None
        self._challenge: dict[str, str] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ auth

    def _cached_token(self, params: dict[str, str], scopes: tuple[str, ...]) -> str | None:
        key = (params.get("realm", ""), params.get("service", ""), *scopes)
        with self._lock:
            cached = self._tokens.get(key)
        return cached[0] if cached and cached[1] > time.monotonic() else None

    def _token(self, params: dict[str, str], scopes: tuple[str, ...]) -> str:
        key = (params.get("realm", ""), params.get("service", ""), *scopes)
        if self._token_source is not None:
            token, lifetime = self._token_source(scopes)
            with self._lock:
                self._tokens[key] = (token, time.monotonic() + max(lifetime - 10, 5))
            return token
        query: list[tuple[str, str | int | float | bool | None]] = [
            ("service", params.get("service", ""))
        ]
        query += [("scope", scope) for scope in scopes]
        realm = params.get("realm")
        if not realm:
            raise RegistryError("the registry asked for a token but named no realm")
        try:
            response = self._http.get(realm, params=query, auth=self._auth)
        except httpx.HTTPError as exc:
            raise RegistryError(
                f"the registry's token service {realm} is unreachable: {exc}"
            ) from exc
        if response.status_code != 200:
            raise RegistryError(
                f"the registry's token service refused the credentials "
                f"({response.status_code}: {_problem(response)})",
                response.status_code,
            )
        body = response.json()
        token = str(body.get("token") or body.get("access_token") or "")
        if not token:
            raise RegistryError("the registry's token service answered without a token")
        lifetime = int(body.get("expires_in") or 60)
        with self._lock:
            self._tokens[key] = (token, time.monotonic() + max(lifetime - 10, 5))
        return token

    def _send(
        self,
        method: str,
        url: str,
        scopes: Sequence[str],
        *,
        stream: bool = False,
        **kwargs: Any,
    ) -> httpx.Response:
        """One request, answering an auth challenge once. Bodies given as files are re-read
        for the retry (``content`` must then be a callable returning a fresh iterator)."""
        headers = dict(kwargs.pop("headers", {}))
        body_factory = kwargs.pop("body", None)
        if self._scheme == "bearer":
            token = self._cached_token(self._challenge, tuple(scopes))
            if token is None and self._token_source is not None:
                token = self._token(self._challenge, tuple(scopes))
            if token:
                headers["Authorization"] = f"Bearer {token}"
        elif self._scheme == "basic" and self._auth:
            headers["Authorization"] = self._basic()
        for attempt in range(2):
            if body_factory is not None:
                kwargs["content"] = body_factory()
            request = self._http.build_request(method, url, headers=headers, **kwargs)
            try:
                response = self._http.send(request, stream=stream)
            except httpx.HTTPError as exc:
                raise RegistryError(f"registry {self.url} is unreachable: {exc}") from exc
            if response.status_code != 401 or attempt:
                return response
            header = response.headers.get("www-authenticate", "")
            response.close()
            scheme, params = _challenge(header)
            self._scheme, self._challenge = scheme, params
            if scheme == "bearer":
                headers["Authorization"] = f"Bearer {self._token(params, tuple(scopes))}"
            elif scheme == "basic" and self._auth:
                headers["Authorization"] = self._basic()
            else:
                break
        raise RegistryError(
            f"registry {self.url} refused the request: authentication required "
            "(set the registry's username and password)",
            401,
        )

    def _basic(self) -> str:
        assert self._auth is not None
        user, password = self._auth
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def _v2(self, repository: str, tail: str) -> str:
        return f"{self.url}/v2/{repository}/{tail}"

    # ----------------------------------------------------------------- blobs

    def blob_exists(self, repository: str, digest: str) -> bool:
        response = self._send(
            "HEAD", self._v2(repository, f"blobs/{digest}"), [f"repository:{repository}:pull"]
        )
        if response.status_code == 200:
            return True
        if response.status_code == 404:
            return False
        raise RegistryError(
            f"HEAD of blob {digest} in {repository}: {response.status_code}", response.status_code
        )

    def mount_blob(self, repository: str, digest: str, source: str) -> bool:
        """Cross-repository mount: True when the blob is now in ``repository`` without an
        upload. A registry that cannot mount starts an upload instead; it is cancelled."""
        scopes = [f"repository:{repository}:pull,push", f"repository:{source}:pull"]
        response = self._send(
            "POST",
            self._v2(repository, "blobs/uploads/"),
            scopes,
            params={"mount": digest, "from": source},
        )
        if response.status_code == 201:
            return True
        if response.status_code == 202 and "location" in response.headers:
            self._send("DELETE", self._location(response), scopes)
            return False
        if response.status_code in (401, 403, 404):
            return False
        raise RegistryError(
            f"mounting {digest} into {repository}: {_problem(response)}", response.status_code
        )

    def _location(self, response: httpx.Response) -> str:
        return urljoin(self.url + "/", response.headers["location"])

    def push_blob(self, repository: str, blob: Blob, path: Path) -> None:
        """Upload ``path`` as ``blob`` (monolithic). The registry checks the digest before the
        blob becomes visible, so a broken upload never is."""
        scopes = [f"repository:{repository}:pull,push"]
        started = self._send("POST", self._v2(repository, "blobs/uploads/"), scopes)
        if started.status_code != 202 or "location" not in started.headers:
            raise RegistryError(
                f"starting an upload to {repository}: {_problem(started)}", started.status_code
            )
        location = self._location(started)

        def body() -> Iterator[bytes]:
            with path.open("rb") as f:
                while chunk := f.read(1024 * 1024):
                    yield chunk

        done = self._send(
            "PUT",
            # The location may carry the registry's own query (its upload state): keep it.
            str(httpx.URL(location).copy_merge_params({"digest": blob.digest})),
            scopes,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(blob.size)},
            body=body,
        )
        if done.status_code != 201:
            raise RegistryError(
                f"uploading {blob.digest} to {repository}: {_problem(done)}", done.status_code
            )

    def fetch_blob(self, repository: str, digest: str, dest: Path) -> int:
        """Download a blob into ``dest``, checking its digest; returns its size."""
        response = self._send(
            "GET",
            self._v2(repository, f"blobs/{digest}"),
            [f"repository:{repository}:pull"],
            stream=True,
        )
        try:
            if response.status_code in (301, 302, 307, 308):  # a redirect to blob storage
                target = self._location(response)
                response.close()
                response = self._http.send(self._http.build_request("GET", target), stream=True)
            if response.status_code != 200:
                response.read()
                raise RegistryError(
                    f"GET of blob {digest} in {repository}: {_problem(response)}",
                    response.status_code,
                )
            hasher, size = hashlib.sha256(), 0
            with dest.open("wb") as out:
                for chunk in response.iter_bytes(1024 * 1024):
                    hasher.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
        finally:
            response.close()
        if "sha256:" + hasher.hexdigest() != digest:
            dest.unlink(missing_ok=True)
            raise RegistryError(f"blob {digest} from {repository} does not match its digest")
        return size

    # ------------------------------------------------------------- manifests

    def get_manifest(self, reference: Reference) -> Manifest:
        """The manifest ``reference`` names (an index is resolved to its linux/amd64 image)."""
        manifest = self._get_manifest(reference.repository, reference.ref)
        if manifest.media_type in INDEX_TYPES:
            index = json.loads(manifest.data)
            chosen = next(
                (
                    m
                    for m in index.get("manifests", [])
                    if m.get("platform", {}).get("os") == "linux"
                    and m.get("platform", {}).get("architecture") == "amd64"
                ),
                None,
            )
            if chosen is None:
                raise RegistryError(f"{reference} has no linux/amd64 image")
            manifest = self._get_manifest(reference.repository, chosen["digest"])
        return manifest

    def _get_manifest(self, repository: str, ref: str) -> Manifest:
        response = self._send(
            "GET",
            self._v2(repository, f"manifests/{ref}"),
            [f"repository:{repository}:pull"],
            headers={"Accept": ACCEPT_MANIFESTS},
        )
        if response.status_code == 404:
            raise RegistryError(f"{repository}:{ref} does not exist in {self.url}", 404)
        if response.status_code != 200:
            raise RegistryError(
                f"GET of manifest {repository}:{ref}: {_problem(response)}", response.status_code
            )
        data = response.content
        digest = sha256_digest(data)
        if ref.startswith("sha256:") and ref != digest:
            raise RegistryError(f"manifest {repository}@{ref} does not match its digest")
        media_type = response.headers.get("content-type", MANIFEST).split(";")[0].strip()
        return Manifest(data, media_type, digest)

    def put_manifest(self, repository: str, ref: str, data: bytes, media_type: str) -> str:
        response = self._send(
            "PUT",
            self._v2(repository, f"manifests/{ref}"),
            [f"repository:{repository}:pull,push"],
            content=data,
            headers={"Content-Type": media_type},
        )
        if response.status_code != 201:
            raise RegistryError(
                f"pushing manifest {repository}:{ref}: {_problem(response)}", response.status_code
            )
        return sha256_digest(data)
