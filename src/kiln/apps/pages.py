"""The pages the proxy answers with itself on an origin of the content domain: refusals, the
hand-off's redirect, "starting", "stopped", "crashed". Kiln's layout, no script at all; its
styles, icon and links come from the UI's origin."""

from __future__ import annotations

from starlette.types import Send

from kiln.apps.headers import DEFAULT_RESPONSE_HEADERS, HSTS, Target
from kiln.settings import Settings
from kiln.web.rendering import templates


def site_of(settings: Settings, target: Target) -> str:
    """The UI's own origin, seen from a content origin: same scheme and port, Kiln's domain
    (content lives on ``<label>.<content domain>``)."""
    port = target.host.rsplit(":", 1)[1] if ":" in target.host else ""
    scheme = target.origin.split(":", 1)[0]
    return f"{scheme}://{settings.domain}{':' if port else ''}{port}"


async def page(
    send: Send,
    status: int,
    title: str,
    detail: str,
    site: str,
    link: tuple[str, str] | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
    refresh: int | None = None,
) -> None:
    body = (
        templates.env.get_template("origin_page.html")
        .render(
            status=status,
            title=title,
            detail=detail,
            link={"url": link[0], "text": link[1]} if link else None,
            site=site,
            refresh=refresh,
            user=None,
            csrf_token=None,
            path="",
            style_nonce=None,
        )
        .encode()
    )
    defaults = (*DEFAULT_RESPONSE_HEADERS, *((HSTS,) if site.startswith("https:") else ()))
    csp = (
        f"default-src 'none'; style-src {site}/static/; img-src {site}/static/ data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/html; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"content-security-policy", csp.encode()),
                (b"cache-control", b"no-store"),
                *(d for d in defaults if d[0] not in {name for name, _ in headers or []}),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
