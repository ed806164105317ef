"""How the UI renders pages and turns errors into something a person can act on.

Every UI route is a ``UiRoute``: a domain error raised anywhere in it (a dependency that
authorizes, a domain function, the CSRF check in ``kiln.api.deps``) becomes
- for htmx requests: the API's ``application/problem+json``; ``static/kiln.js`` puts its
  ``detail`` into the form that made the request (errors shown in place);
- for full-page loads: an HTML error page with the same status (a private project is a 404);
- for "not signed in": a redirect to ``/login?next=<this page>``.

Templates autoescape everything. Nothing here marks user content safe (``breakable`` adds
``<wbr>`` to text it has escaped; READMEs and code are ``kiln.web.markup``'s).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode, urlsplit

import jinja2
from fastapi import Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from pydantic import ValidationError

from kiln import __version__
from kiln.api.deps import Caller, CurrentCaller
from kiln.api.errors import field_errors, problem
from kiln.domain.errors import KilnError, TooManyRequests
from kiln.web.times import relative, timestamp

WEB_DIR = Path(__file__).parent
STATIC_DIR = WEB_DIR / "static"
DEFAULT_NEXT = "/projects"


# The UI loads only its own scripts and styles: an injected <script> or inline handler does
# not run even if an escaping bug ever let one through.
def ui_csp(style_nonce: str | None = None) -> str:
    """The UI's Content-Security-Policy. ``style_nonce`` (a fresh random value per response)
    additionally admits <style> elements carrying it: only pages whose own scripts must
    create style elements (xterm.js, on the session page) ask for one, and markup injected
    into the page cannot know it."""
    styles = f"'self' 'nonce-{style_nonce}'" if style_nonce else "'self'"
    return (
        f"default-src 'self'; script-src 'self'; style-src {styles}; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    )


UI_CSP = ui_csp()


# ---- template environment -----------------------------------------------------------------


def _filesize(value: int | None) -> str:
    if value is None:
        return ""
    if value < 1024:
        return f"{value} B"
    exponent = min(int(math.log(value, 1024)), 4)
    return f"{value / 1024**exponent:.1f} {'BKMGT'[exponent]}iB"


def breakable(value: str) -> Markup:
    """Text that may wrap only after '/' and ':' (an audit target such as
    ``project:alice/churn-model``), never inside a name (not even at its hyphens): each part
    is a nowrap span, with a break opportunity after each separator. Escaped first."""
    parts = [p for p in re.split(r"(?<=[/:])", value) if p]
    return Markup("<wbr>").join(Markup('<span class="nowrap">{}</span>').format(p) for p in parts)


def audit_details(details: dict[str, Any]) -> list[tuple[str, str]]:
    """An audit event's details as (label, text) pairs a person reads: ``fields`` becomes
    "fields: name, schedule", ``True`` "yes", an empty value "none"."""

    def text(value: Any) -> str:
        if isinstance(value, bool):
            return "yes" if value else "no"
        if value is None or value == [] or value == {}:
            return "none"
        if isinstance(value, list | tuple):
            return ", ".join(text(v) for v in value)
        if isinstance(value, dict):
            return ", ".join(f"{k} {text(v)}" for k, v in value.items())
        return str(value)

    return [(name.replace("_", " "), text(value)) for name, value in details.items()]


def path_url(value: str) -> str:
    """A file path as a URL path: every segment percent-encoded, the slashes kept."""
    return quote(value, safe="/")


def _make_env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(WEB_DIR / "templates"),
        autoescape=True,  # everywhere, whatever the file extension
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        ago=relative,
        timestamp=timestamp,
        filesize=_filesize,
        path_url=path_url,
        breakable=breakable,
        audit_details=audit_details,
    )
    env.globals.update(version=__version__, urlencode=urlencode)
    return env


templates = Jinja2Templates(env=_make_env())


def is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def render(
    request: Request,
    template: str,
    caller: Caller | None,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
    style_nonce: str | None = None,
    **context: Any,
) -> Response:
    """Render a page or fragment. ``caller`` provides the signed-in user and the CSRF token;
    ``style_nonce`` (see ``ui_csp``) is also given to the template as ``style_nonce``."""
    context.update(
        user=caller.user if caller else None,
        csrf_token=caller.csrf_token if caller else None,
        path=request.url.path,
        style_nonce=style_nonce,
    )
    response = templates.TemplateResponse(
        request, template, context, status_code=status_code, headers=headers
    )
    response.headers["Content-Security-Policy"] = ui_csp(style_nonce)
    # Pages show private data: never keep them in shared caches or the back-button cache.
    response.headers["Cache-Control"] = "no-store"
    response.headers["Vary"] = "HX-Request, Cookie"
    return response


# ---- redirects ----------------------------------------------------------------------------


def safe_next(value: str | None) -> str:
    """Where to go after login: only a path on this site (no scheme, host or '//')."""
    if not value or not value.startswith("/") or value.startswith(("//", "/\\")):
        return DEFAULT_NEXT
    if any(ord(c) < 0x20 or c == "\\" for c in value) or len(value) > 2000:
        return DEFAULT_NEXT
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return DEFAULT_NEXT
    return value


def login_url(next_path: str) -> str:
    return "/login?" + urlencode({"next": safe_next(next_path)})


def redirect(request: Request, url: str) -> Response:
    """Go to ``url``: htmx follows HX-Redirect; a plain browser request follows a 303."""
    if is_htmx(request):
        return Response(status_code=204, headers={"HX-Redirect": url})
    return RedirectResponse(url, status_code=303)


# ---- errors -------------------------------------------------------------------------------


def _current_page(request: Request) -> str:
    """The page the user is on: for htmx requests the page that sent it, not the endpoint."""
    if is_htmx(request):
        current = urlsplit(request.headers.get("hx-current-url", ""))
        return current.path + (f"?{current.query}" if current.query else "")
    return request.url.path + (f"?{request.url.query}" if request.url.query else "")


def error_response(
    request: Request,
    status: int,
    title: str,
    detail: str,
    errors: list[dict[str, str]] | None = None,
) -> Response:
    """``errors``: the input fields the error is about (``{"field", "message"}``), which
    ``static/kiln.js`` shows at those fields of the form."""
    if status == 401:
        target = login_url(_current_page(request))
        if is_htmx(request):
            return Response(status_code=401, headers={"HX-Redirect": target})
        if request.method in ("GET", "HEAD"):
            return RedirectResponse(target, status_code=303)
    if is_htmx(request) or request.method not in ("GET", "HEAD"):
        extra: dict[str, Any] = {"errors": errors} if errors else {}
        return problem(status, title, detail, **extra)
    return render(
        request,
        "error.html",
        getattr(request.state, "ui_caller", None),
        status_code=status,
        status=status,
        title=title,
        detail=detail,
    )


def _validation_errors(errors: list[Any]) -> list[dict[str, str]]:
    """Pydantic's errors as (form field, message) pairs."""
    described = []
    for err in errors[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "form")]
        message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        described.append({"field": ".".join(loc) or "input", "message": message})
    return described


def _validation_detail(errors: list[dict[str, str]]) -> str:
    return "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "invalid input"


class UiRoute(APIRoute):
    """An APIRoute whose errors are rendered for people (see the module docstring)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def ui_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except TooManyRequests as exc:
                response = error_response(request, exc.status, exc.title, exc.detail)
                response.headers["Retry-After"] = str(int(exc.retry_after) + 1)
                return response
            except KilnError as exc:
                fields = field_errors(exc).get("errors")
                return error_response(request, exc.status, exc.title, exc.detail, fields)
            except (RequestValidationError, ValidationError) as exc:
                errors = _validation_errors(list(exc.errors()))
                detail = _validation_detail(errors)
                return error_response(request, 422, "Invalid input", detail, errors)

        return ui_handler


# ---- the signed-in user -------------------------------------------------------------------


def ui_caller(request: Request, caller: CurrentCaller) -> Caller:
    """The signed-in caller (same rules as the API), remembered so error pages keep the top
    bar. Declare it before project dependencies so it is resolved first."""
    request.state.ui_caller = caller
    return caller


UiCaller = Annotated[Caller, Depends(ui_caller)]
