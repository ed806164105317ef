"""The API explorer at ``/api/v1/docs``: Swagger UI served by Kiln itself.

FastAPI's built-in page loads Swagger UI and its favicon from public CDNs, which a self-hosted
site cannot assume and should not call. Here the page, its script and styles come from Kiln
(``static/vendor``, copied from the ``swagger-ui-dist`` npm package by ``make assets``), and
its Content-Security-Policy allows nothing else: no other origin, no inline script.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

DOCS_PATH = "/api/v1/docs"
OPENAPI_PATH = "/api/v1/openapi.json"

# Swagger UI sets its inline styles through the DOM (allowed); its icons are data: SVGs.
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)

PAGE = f"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>Kiln API</title>
  <link rel="icon" href="/static/favicon.svg" type="image/svg+xml">
  <link rel="stylesheet" href="/static/vendor/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui" data-openapi-url="{OPENAPI_PATH}"></div>
  <script src="/static/vendor/swagger-ui-bundle.js"></script>
  <script src="/static/api-docs.js"></script>
</body>
</html>
"""

router = APIRouter()


@router.get(DOCS_PATH, include_in_schema=False, response_class=HTMLResponse)
def api_docs() -> HTMLResponse:
    """Browse and try the API (signed-in browsers send their session cookie)."""
    return HTMLResponse(PAGE, headers={"Content-Security-Policy": DOCS_CSP})
