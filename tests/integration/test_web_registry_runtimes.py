"""The admin's runtimes page adds a runtime from an image in Kiln's registry."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.conftest import Account
from tests.integration.web_ui_client import sign_in
from tests.registry_support import bearer, make_image, push_image, push_scope, token


def test_an_admin_adds_a_runtime_from_the_registry_in_the_page(
    app: FastAPI, client: TestClient, admin: Account, alice: Account
) -> None:
    image = make_image({"usr/local/bin/jupyter-lab": b"#!lab\n", "bin/sh": b"#!sh\n"})
    auth = bearer(token(client, admin, push_scope("runtimes/lab")))
    assert push_image(client, "runtimes/lab", image, "4.2", auth).status_code == 201

    ui = sign_in(app, admin.username, admin.password)
    page = ui.page("/admin/runtimes")
    assert 'hx-post="/admin/runtimes"' in page and "runtimes/python:3.12" in page
    assert "skopeo copy docker-archive:python.tar docker://testserver/runtimes/python:3.12" in page

    missing = ui.htmx("POST", "/admin/runtimes", data={"image": "runtimes/lab:9"})
    assert missing.status_code == 404
    assert "not in the registry" in missing.json()["detail"]
    bad = ui.htmx("POST", "/admin/runtimes", data={"image": "Runtimes/LAB"})
    assert bad.status_code == 422 and "invalid repository name" in bad.json()["detail"]

    added = ui.htmx(
        "POST", "/admin/runtimes", data={"image": "runtimes/lab:4.2", "description": "Lab 4.2"}
    )
    assert added.status_code == 200, added.text
    assert 'id="runtime-lab-4.2"' in added.text and "runtimes/lab" in added.text
    assert "Lab 4.2" in added.text
    listed = {r["name"]: r for r in client.get("/api/v1/runtimes", headers=alice.headers).json()}
    assert listed["lab-4.2"]["source"] == "registry"
    assert listed["lab-4.2"]["image_digest"] == image.digest
    audit = client.get("/api/v1/audit?action=runtime.create", headers=admin.headers).json()
    assert audit["items"][0]["target"] == "runtime:lab-4.2"

    not_admin = sign_in(app, alice.username, alice.password)
    refused = not_admin.htmx("POST", "/admin/runtimes", data={"image": "runtimes/lab:4.2"})
    assert refused.status_code == 403
