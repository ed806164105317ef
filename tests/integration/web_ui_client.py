"""A TestClient that uses the UI the way the browser does: signs in through the login form,
then sends what htmx sends (HX-Request, and the CSRF token the page put on <body>)."""

from __future__ import annotations

import re
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.testclient import TestClient

CSRF_ON_BODY = re.compile(r"""<body hx-headers='\{"X-CSRF-Token": "([^"]+)"\}'>""")
BASE = "https://testserver"


class UiClient:
    def __init__(self, app: FastAPI) -> None:
        self.http = TestClient(app, base_url=BASE, follow_redirects=False)
        self.csrf = ""

    def login(self, username: str, password: str) -> httpx.Response:
        response = self.http.post("/login", data={"username": username, "password": password})
        if response.status_code == 303:
            self.csrf = csrf_of(self.page("/account"))
        return response

    def page(self, path: str, status: int = 200) -> str:
        """A full page load; asserts its status and returns the HTML."""
        response = self.http.get(path)
        assert response.status_code == status, (path, response.status_code, response.text[:500])
        return response.text

    def htmx(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"HX-Request": "true", "HX-Current-URL": f"{BASE}/projects"}
        if self.csrf:
            headers["X-CSRF-Token"] = self.csrf
        headers.update(kwargs.pop("headers", {}))
        return self.http.request(method, path, headers=headers, **kwargs)


def csrf_of(html: str) -> str:
    match = CSRF_ON_BODY.search(html)
    assert match, "the page does not carry the CSRF token on <body>"
    return match.group(1)


def sign_in(app: FastAPI, username: str, password: str) -> UiClient:
    ui = UiClient(app)
    response = ui.login(username, password)
    assert response.status_code == 303, response.text
    return ui
