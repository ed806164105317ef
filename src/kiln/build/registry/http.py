"""``/v2/``: the OCI distribution API (v1.1) over ``kiln.build.registry.service``.

parse the path → authenticate and check the scope (``http_auth``) → call the registry in a
worker thread → answer with the spec's headers. Errors leave in the spec's format,
``{"errors": [{"code", "message", "detail"}]}``, never as problem+json: OCI clients show
``message`` to their user.

Blob bodies stream in both directions: uploads go to disk in ≥1 MiB writes, hashed as they
arrive (nothing is held in memory whole); downloads are served from the blob's file with
range support.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from kiln.build.registry import http_blobs
from kiln.build.registry.access import DELETE, PULL, PUSH, Scope
from kiln.build.registry.errors import (
    ManifestInvalid,
    RegistryError,
    Unsupported,
)
from kiln.build.registry.http_auth import (
    Principal,
    principal_from_header,
    token_response,
    unauthorized,
)
from kiln.build.registry.http_context import Call, Handler, RegistryHttp, check_active
from kiln.build.registry.manifests import MAX_MANIFEST_BYTES, OCI_INDEX
from kiln.build.registry.names import parse_repository
from kiln.domain import audit
from kiln.domain.errors import KilnError

log = logging.getLogger("kiln.registry")

router = APIRouter(include_in_schema=False)
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
_CODES = {401: "UNAUTHORIZED", 403: "DENIED", 404: "NAME_UNKNOWN", 429: "TOOMANYREQUESTS"}


@router.api_route("/v2/{tail:path}", methods=METHODS)
async def registry_api(tail: str, request: Request) -> Response:
    http: RegistryHttp = request.app.state.registry_http
    try:
        response = await _dispatch(http, request, tail)
    except RegistryError as exc:
        response = error_response(exc.status, exc.body(), exc.headers)
    except KilnError as exc:
        code = _CODES.get(exc.status, "UNKNOWN")
        body = {"errors": [{"code": code, "message": exc.detail}]}
        response = error_response(exc.status, body)
    except ClientDisconnect:
        return Response(status_code=400)
    response.headers.update(API_VERSION)
    return response


def error_response(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Response:
    return JSONResponse(body, status_code=status, headers=headers)


_ROUTES: list[tuple[re.Pattern[str], dict[str, tuple[str, Handler]]]] = []


def _route(pattern: str, **methods: tuple[str, Handler]) -> None:
    _ROUTES.append((re.compile(pattern), methods))


async def _dispatch(http: RegistryHttp, request: Request, tail: str) -> Response:
    if tail == "token":
        if request.method != "GET":
            raise Unsupported("the token endpoint answers GET")
        body = await run_in_threadpool(
            token_response, request, http.settings, http.key, http.sessions
        )
        return JSONResponse(body, headers={"Cache-Control": "no-store"})
    principal = await run_in_threadpool(principal_from_header, request, http.key, http.sessions)
    if tail == "":
        if principal is None:
            raise unauthorized(request, "authentication required")
        if request.method not in ("GET", "HEAD"):
            raise Unsupported(f"{request.method} is not supported on /v2/")
        return JSONResponse({})
    for pattern, methods in _ROUTES:
        match = pattern.fullmatch(tail)
        if match is None:
            continue
        params = match.groupdict()
        name = params.pop("name")
        action_handler = methods.get(request.method)
        if action_handler is None:
            raise Unsupported(f"{request.method} is not supported here", status=405)
        action, handler = action_handler
        principal = await _authorize(http, request, principal, name, action)
        return await handler(Call(request, http, principal, name, params))
    raise Unsupported(f"no registry API at /v2/{tail[:100]}", status=404)


async def _authorize(
    http: RegistryHttp, request: Request, principal: Principal | None, name: str, action: str
) -> Principal:
    parse_repository(name)  # NAME_INVALID for everyone: the grammar is no secret
    wanted = [Scope(name, frozenset({PULL, PUSH} if action == PUSH else {action}))]
    if principal is None:
        raise unauthorized(request, "authentication required", wanted)
    allowed = await run_in_threadpool(principal.may, http.sessions, name, action)
    if not allowed:
        raise unauthorized(
            request,
            f"access to {name[:300]} ({action}) is not granted to {principal.subject}",
            wanted,
            error="insufficient_scope" if principal.claims is not None else None,
        )
    return principal


# ---- manifests ----------------------------------------------------------------------------


def _manifest_headers(digest: str, media_type: str, size: int) -> dict[str, str]:
    return {
        "Docker-Content-Digest": digest,
        "Content-Type": media_type,
        "Content-Length": str(size),
    }


async def get_manifest(call: Call) -> Response:
    info = await call.run(call.http.registry.get_manifest, call.name, call.params["reference"])
    headers = _manifest_headers(info.digest, info.media_type, info.size)
    if call.request.method == "HEAD":
        return Response(status_code=200, headers=headers)
    return Response(info.content, status_code=200, headers=headers, media_type=info.media_type)


async def put_manifest(call: Call) -> Response:
    await check_active(call)
    body = await read_limited(call.request, MAX_MANIFEST_BYTES)
    content_type = call.request.headers.get("content-type", "")
    tags = call.request.query_params.getlist("tag")
    info = await call.run(
        functools.partial(call.http.registry.put_manifest, tags=tags),
        call.name,
        call.params["reference"],
        body,
        content_type,
    )
    await run_in_threadpool(
        _audit, call, "registry.push", f"{call.name}@{info.digest}", list(info.tags)
    )
    response = Response(
        status_code=201,
        headers={
            "Location": f"/v2/{call.name}/manifests/{info.digest}",
            "Docker-Content-Digest": info.digest,
        },
    )
    if info.subject:
        response.headers["OCI-Subject"] = info.subject
    for tag in info.tags if tags else ():
        response.headers.append("OCI-Tag", tag)
    return response


async def delete_manifest(call: Call) -> Response:
    await check_active(call)
    reference = call.params["reference"]
    await call.run(call.http.registry.delete_manifest, call.name, reference)
    separator = "@" if ":" in reference else ":"
    await run_in_threadpool(_audit, call, "registry.delete", f"{call.name}{separator}{reference}")
    return Response(status_code=202)


def _audit(call: Call, action: str, image: str, tags: list[str] | None = None) -> None:
    """Manifest pushes and deletions, in the audit log (blobs are too many to list)."""
    details = {"tags": tags} if tags else {}
    audit.record_now(
        call.http.sessions,
        action,
        actor_name=call.principal.subject,
        target=f"image:{image}",
        address=call.request.client.host if call.request.client else "",
        **details,
    )


async def read_limited(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ManifestInvalid(f"manifest is over the limit of {limit} bytes", status=413)
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise ManifestInvalid(f"manifest is over the limit of {limit} bytes", status=413)
    return bytes(data)


# ---- tags and referrers -------------------------------------------------------------------


async def list_tags(call: Call) -> Response:
    query = call.request.query_params
    n_text, last = query.get("n"), query.get("last")
    n = None
    if n_text is not None:
        if not n_text.isdigit() or len(n_text) > 9:
            raise Unsupported(f"n must be a non-negative integer, not {n_text[:20]!r}", status=400)
        n = int(n_text)
    tags, more = await call.run(call.http.registry.list_tags, call.name, n, last)
    headers = {}
    if more and tags:
        headers["Link"] = f'</v2/{call.name}/tags/list?n={n}&last={tags[-1]}>; rel="next"'
    return JSONResponse({"name": call.name, "tags": tags}, headers=headers)


async def referrers(call: Call) -> Response:
    artifact_type = call.request.query_params.get("artifactType")
    found = await call.run(
        call.http.registry.referrers, call.name, call.params["digest"], artifact_type
    )
    body = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [d.to_json() for d in found],
    }
    headers = {"OCI-Filters-Applied": "artifactType"} if artifact_type is not None else {}
    return JSONResponse(body, headers=headers, media_type=OCI_INDEX)


# ---- the route table ----------------------------------------------------------------------

_NAME = r"(?P<name>.+?)"
_route(rf"{_NAME}/blobs/uploads/?", POST=(PUSH, http_blobs.start_upload))
_route(
    rf"{_NAME}/blobs/uploads/(?P<upload>[^/]+)",
    GET=(PUSH, http_blobs.upload_status),
    PATCH=(PUSH, http_blobs.patch_upload),
    PUT=(PUSH, http_blobs.finish_upload),
    DELETE=(PUSH, http_blobs.cancel_upload),
)
_route(
    rf"{_NAME}/blobs/(?P<digest>[^/]+)",
    GET=(PULL, http_blobs.get_blob),
    HEAD=(PULL, http_blobs.get_blob),
    DELETE=(DELETE, http_blobs.delete_blob),
)
_route(
    rf"{_NAME}/manifests/(?P<reference>[^/]+)",
    GET=(PULL, get_manifest),
    HEAD=(PULL, get_manifest),
    PUT=(PUSH, put_manifest),
    DELETE=(DELETE, delete_manifest),
)
_route(rf"{_NAME}/tags/list", GET=(PULL, list_tags))
_route(rf"{_NAME}/referrers/(?P<digest>[^/]+)", GET=(PULL, referrers))

__all__ = ["RegistryHttp", "router"]
