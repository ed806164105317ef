"""Every error leaves as ``application/problem+json`` (RFC 9457) with a precise detail."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln.domain.errors import KilnError, TooManyRequests

log = logging.getLogger("kiln.api")

PROBLEM = "application/problem+json"


def problem(
    status: int,
    title: str,
    detail: str,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def field_errors(exc: KilnError) -> dict[str, Any]:
    """The problem's ``errors`` member for an error about one input field (else nothing)."""
    if exc.field is None:
        return {}
    return {"errors": [{"field": exc.field, "message": exc.detail}]}


def _describe_validation(exc: RequestValidationError) -> tuple[str, list[dict[str, Any]]]:
    errors = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        errors.append({"field": loc, "message": err.get("msg", "invalid")})
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5]) or "invalid request"
    return detail, errors


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(KilnError)
    async def _kiln_error(request: Request, exc: KilnError) -> JSONResponse:
        headers = None
        if isinstance(exc, TooManyRequests):
            headers = {"Retry-After": str(int(exc.retry_after) + 1)}
        return problem(exc.status, exc.title, exc.detail, headers=headers, **field_errors(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail, errors = _describe_validation(exc)
        return problem(422, "Invalid input", detail, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        titles = {
            401: "Authentication required",
            404: "Not found",
            405: "Method not allowed",
            413: "Content too large",
        }
        headers = dict(exc.headers) if exc.headers else None
        return problem(
            exc.status_code, titles.get(exc.status_code, "Error"), str(exc.detail), headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem(500, "Internal error", "an unexpected error happened; it has been logged")
