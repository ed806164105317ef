"""Administration pages for runtimes, resource profiles and quotas."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from kiln.db.engine import make_sessionmaker, transaction
from kiln.db.workload_models import Runtime
from tests.conftest import Account
from tests.integration.web_ui_client import UiClient, sign_in

PAGES = ["/admin/runtimes", "/admin/profiles", "/admin/quotas"]


@pytest.fixture
def admin_ui(app: FastAPI, admin: Account) -> UiClient:
    return sign_in(app, admin.username, admin.password)


def _audit(client: TestClient, admin: Account, action: str) -> list[dict[str, Any]]:
    r = client.get(f"/api/v1/audit?action={action}", headers=admin.headers)
    assert r.status_code == 200
    items: list[dict[str, Any]] = r.json()["items"]
    return items


def _profiles(client: TestClient, admin: Account) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = client.get(
        "/api/v1/resource-profiles", headers=admin.headers
    ).json()
    return listed


def _quotas(client: TestClient, admin: Account) -> list[dict[str, Any]]:
    r = client.get("/api/v1/quotas", headers=admin.headers)
    assert r.status_code == 200
    items: list[dict[str, Any]] = r.json()["items"]
    return items


# ---- who may see the pages ----------------------------------------------------------------


@pytest.mark.parametrize("path", PAGES)
def test_resource_pages_need_a_site_admin(app: FastAPI, alice: Account, path: str) -> None:
    ui = sign_in(app, alice.username, alice.password)
    assert "this needs a site administrator" in ui.page(path, status=403)
    assert "/admin/runtimes" not in ui.page("/projects")  # the top bar does not offer them
    anonymous = UiClient(app).http.get(path)
    assert anonymous.status_code == 303
    assert anonymous.headers["location"].startswith("/login?next=")


def test_admins_reach_every_page_from_the_top_bar(admin_ui: UiClient) -> None:
    projects = admin_ui.page("/projects")
    assert 'href="/admin/runtimes"' in projects
    for path in PAGES:
        page = admin_ui.page(path)
        # The tabs link the three pages; the top bar marks "Resources" as where we are.
        for other in PAGES:
            assert f'href="{other}"' in page
        assert 'href="/admin/runtimes" class="active">Resources' in page


def test_non_admin_actions_are_refused_and_change_nothing(
    app: FastAPI, client: TestClient, alice: Account, bob: Account, admin: Account
) -> None:
    ui = sign_in(app, alice.username, alice.password)
    size = {"cpu": "1", "memory": "2", "memory_unit": "GiB"}
    attempts = [
        ("POST", "/admin/profiles", {"name": "mine", **size}),
        ("POST", "/admin/quotas", {"kind": "user", "name": "alice", **size}),
        ("POST", "/admin/runtimes/builtin/default", {}),
    ]
    for method, path, data in attempts:
        r = ui.htmx(method, path, data=data)
        assert r.status_code == 403, (path, r.text)
        assert r.headers["content-type"] == "application/problem+json"
    admin_ui = sign_in(app, admin.username, admin.password)
    assert admin_ui.htmx("POST", "/admin/profiles", data={"name": "small", **size}).is_success
    assert admin_ui.htmx("POST", "/admin/quotas", data={"kind": "user", "name": "bob", **size})
    for method, path in [
        ("POST", "/admin/profiles/small"),
        ("POST", "/admin/profiles/small/default"),
        ("DELETE", "/admin/profiles/small"),
        ("DELETE", "/admin/quotas/users/bob"),
    ]:
        r = ui.htmx(method, path, data=size if method == "POST" else None)
        assert r.status_code == 403, (path, r.text)
    assert [p["name"] for p in _profiles(client, admin)] == ["small"]
    assert _profiles(client, admin)[0]["is_default"] is False
    assert [q["name"] for q in _quotas(client, admin)] == ["bob"]


def test_forms_need_the_csrf_token(admin_ui: UiClient, client: TestClient, admin: Account) -> None:
    data = {"name": "small", "cpu": "1", "memory": "2"}
    r = admin_ui.htmx("POST", "/admin/profiles", data=data, headers={"X-CSRF-Token": "forged"})
    assert r.status_code == 403
    assert "CSRF" in r.json()["detail"]
    assert _profiles(client, admin) == []


# ---- runtimes -----------------------------------------------------------------------------


def test_runtimes_page_lists_the_catalog_and_explains_how_to_add(
    admin_ui: UiClient, client: TestClient, admin: Account, engine: Engine
) -> None:
    page = admin_ui.page("/admin/runtimes")
    assert 'id="runtime-builtin"' in page
    assert "badge-active" in page  # the built-in runtime is the default
    assert "Only the built-in runtime so far" in page
    assert "kiln runtimes add IMAGE.tar --name NAME" in page
    assert 'data-copy="runtime-add-cmd"' in page

    digest = "sha256:" + "ab" * 32
    with transaction(make_sessionmaker(engine)) as db:
        db.add(
            Runtime(
                name="py312-lab",
                source="oci-archive",
                digest=digest,
                editors=["terminal", "jupyterlab"],
                python_version="3.12.4",
                description="Python 3.12 with JupyterLab",
                size_bytes=3 * 1024**3,
            )
        )
    page = admin_ui.page("/admin/runtimes")
    assert "Only the built-in runtime so far" not in page
    row = page.split('id="runtime-py312-lab"')[1].split("</tr>")[0]
    assert "oci-archive" in row and "3.12.4" in row and "terminal, jupyterlab" in row
    assert f'title="{digest}">{digest[:19]}<' in row  # short, the whole digest on hover
    assert "3.0 GiB" in row and "Python 3.12 with JupyterLab" in row
    assert 'hx-post="/admin/runtimes/py312-lab/default"' in row

    made = admin_ui.htmx("POST", "/admin/runtimes/py312-lab/default")
    assert made.status_code == 200
    assert "<html" not in made.text  # the table, swapped in place
    assert 'hx-post="/admin/runtimes/builtin/default"' in made.text
    assert 'hx-post="/admin/runtimes/py312-lab/default"' not in made.text
    listed = client.get("/api/v1/runtimes", headers=admin.headers).json()
    assert [(r["name"], r["is_default"]) for r in listed] == [
        ("builtin", False),
        ("py312-lab", True),
    ]
    (event,) = _audit(client, admin, "runtime.default")
    assert event["target"] == "runtime:py312-lab" and event["actor_name"] == admin.username

    missing = admin_ui.htmx("POST", "/admin/runtimes/nope/default")
    assert missing.status_code == 404
    assert missing.json()["detail"] == "runtime 'nope' not found"


# ---- resource profiles --------------------------------------------------------------------


def test_profiles_created_edited_made_default_and_deleted_through_the_forms(
    admin_ui: UiClient, client: TestClient, admin: Account
) -> None:
    assert "No resource profiles yet" in admin_ui.page("/admin/profiles")
    small = admin_ui.htmx(
        "POST",
        "/admin/profiles",
        data={"name": "small", "cpu": "0.5", "memory": "512", "memory_unit": "MiB"},
    )
    assert small.status_code == 200
    assert 'id="profiles"' in small.text and "<html" not in small.text
    assert "0.5 vCPU" in small.text and "512.0 MiB" in small.text
    large = admin_ui.htmx(
        "POST",
        "/admin/profiles",
        data={"name": "large", "cpu": "4", "memory": "1.5", "gpu": "", "is_default": "true"},
    )
    assert large.status_code == 200
    assert _profiles(client, admin) == [
        {"name": "small", "cpu": 0.5, "memory_mib": 512, "gpu": 0, "is_default": False},
        {"name": "large", "cpu": 4.0, "memory_mib": 1536, "gpu": 0, "is_default": True},
    ]

    form = admin_ui.htmx("GET", "/admin/profiles/large/edit")
    assert form.status_code == 200
    assert 'hx-post="/admin/profiles/large"' in form.text
    assert 'name="cpu" value="4"' in form.text
    assert 'name="memory" value="1536"' in form.text  # not whole GiB: shown in MiB
    assert '<option value="MiB" selected>' in form.text
    assert admin_ui.htmx("GET", "/admin/profiles/nope/edit").status_code == 404

    edited = admin_ui.htmx(
        "POST", "/admin/profiles/large", data={"cpu": "8", "memory": "32", "gpu": "1"}
    )
    assert edited.status_code == 200
    assert "8 vCPU" in edited.text and "32.0 GiB" in edited.text
    form = admin_ui.htmx("GET", "/admin/profiles/large/edit")
    assert 'name="memory" value="32"' in form.text and '<option value="GiB" selected>' in form.text

    made = admin_ui.htmx("POST", "/admin/profiles/small/default")
    assert made.status_code == 200
    assert [(p["name"], p["is_default"]) for p in _profiles(client, admin)] == [
        ("small", True),
        ("large", False),
    ]
    deleted = admin_ui.htmx("DELETE", "/admin/profiles/small")
    assert deleted.status_code == 200
    assert 'id="profile-small"' not in deleted.text
    assert [p["name"] for p in _profiles(client, admin)] == ["large"]
    assert _profiles(client, admin)[0] == {
        "name": "large",
        "cpu": 8.0,
        "memory_mib": 32768,
        "gpu": 1,
        "is_default": False,
    }
    assert admin_ui.htmx("DELETE", "/admin/profiles/small").status_code == 404

    assert [e["target"] for e in _audit(client, admin, "profile.create")] == [
        "profile:large",
        "profile:small",
    ]
    updates = _audit(client, admin, "profile.update")
    assert [e["details"] for e in updates] == [
        {"is_default": True},
        {"cpu": 8.0, "memory_mib": 32768, "gpu": 1},
    ]
    assert [e["target"] for e in _audit(client, admin, "profile.delete")] == ["profile:small"]


BAD_PROFILES = [
    ({"cpu": "lots"}, "cpu: Input should be a valid number"),
    ({"cpu": "0"}, "cpu: Input should be greater than 0"),
    ({"cpu": "nan"}, "cpu:"),
    ({"cpu": "0.0001"}, "cpu must be between 0.001 and 256 vCPU"),
    ({"memory": "two"}, "memory must be a number, not 'two'"),
    ({"memory": "inf"}, "memory must be a finite number"),
    ({"memory": "16", "memory_unit": "MiB"}, "memory_mib: Input should be greater than or equal"),
    ({"memory_unit": "TiB"}, "memory_unit: Input should be 'GiB' or 'MiB'"),
    ({"gpu": "-1"}, "gpu: Input should be greater than or equal to 0"),
    ({"gpu": "1.5"}, "gpu: Input should be a valid integer"),
    ({"name": "Bad Name"}, "profile name"),
]


@pytest.mark.parametrize(("change", "message"), BAD_PROFILES)
def test_bad_profile_input_is_refused_with_the_api_message_and_nothing_written(
    admin_ui: UiClient, client: TestClient, admin: Account, change: dict[str, str], message: str
) -> None:
    data = {"name": "medium", "cpu": "2", "memory": "4", "memory_unit": "GiB", **change}
    r = admin_ui.htmx("POST", "/admin/profiles", data=data)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"  # shown in the form
    assert message in r.json()["detail"]
    assert _profiles(client, admin) == []
    assert _audit(client, admin, "profile.create") == []


def test_bad_edits_and_duplicates_change_nothing(
    admin_ui: UiClient, client: TestClient, admin: Account
) -> None:
    good = {"cpu": "1", "memory": "2", "memory_unit": "GiB"}
    assert admin_ui.htmx("POST", "/admin/profiles", data={"name": "small", **good}).is_success
    before = _profiles(client, admin)
    dup = admin_ui.htmx("POST", "/admin/profiles", data={"name": "small", **good})
    assert dup.status_code == 409
    assert dup.json()["detail"] == "a resource profile named 'small' already exists"
    for change, message in BAD_PROFILES[:-1]:
        r = admin_ui.htmx("POST", "/admin/profiles/small", data={**good, **change})
        assert r.status_code == 422, (change, r.text)
        assert message in r.json()["detail"]
    missing = admin_ui.htmx("POST", "/admin/profiles/nope", data=good)
    assert missing.status_code == 404
    assert _profiles(client, admin) == before
    assert _audit(client, admin, "profile.update") == []


# ---- quotas -------------------------------------------------------------------------------


def test_quotas_set_listed_and_removed_through_the_forms(
    admin_ui: UiClient, client: TestClient, admin: Account, alice: Account
) -> None:
    page = admin_ui.page("/admin/quotas")
    assert "<strong>4 vCPU</strong>, <strong>8.0 GiB</strong>" in page  # the site default
    assert "KILN_RUNNER_USER_QUOTA_CPU_MILLIS" in page
    assert "No quotas of their own" in page
    assert client.post("/api/v1/teams", json={"name": "ml"}, headers=alice.headers).is_success

    r = admin_ui.htmx(
        "POST",
        "/admin/quotas",
        data={"kind": "user", "name": "alice", "cpu": "8", "memory": "32", "memory_unit": "GiB"},
    )
    assert r.status_code == 200
    assert 'id="quota-user-alice"' in r.text and "8 vCPU" in r.text and "32.0 GiB" in r.text
    r = admin_ui.htmx(
        "POST",
        "/admin/quotas",
        data={"kind": "team", "name": "ml", "cpu": "16", "memory": "65536", "memory_unit": "MiB"},
    )
    assert 'id="quota-team-ml"' in r.text and "64.0 GiB" in r.text
    again = admin_ui.htmx(
        "POST", "/admin/quotas", data={"kind": "user", "name": "alice", "cpu": "6", "memory": "8"}
    )
    assert again.status_code == 200  # replaces alice's quota
    assert [(q["kind"], q["name"], q["cpu"]) for q in _quotas(client, admin)] == [
        ("user", "alice", 6.0),
        ("team", "ml", 16.0),
    ]
    mine = client.get("/api/v1/quotas/users/alice", headers=alice.headers).json()
    assert (mine["cpu"], mine["memory_mib"]) == (6.0, 8192)

    removed = admin_ui.htmx("DELETE", "/admin/quotas/users/alice")
    assert removed.status_code == 200
    assert 'id="quota-user-alice"' not in removed.text and 'id="quota-team-ml"' in removed.text
    mine = client.get("/api/v1/quotas/users/alice", headers=alice.headers).json()
    assert (mine["cpu"], mine["memory_mib"]) == (4.0, 8192)  # back to the site default
    gone = admin_ui.htmx("DELETE", "/admin/quotas/users/alice")
    assert gone.status_code == 404
    assert gone.json()["detail"] == "user 'alice' has no quota of its own"
    assert admin_ui.htmx("DELETE", "/admin/quotas/teams/ml").status_code == 200
    assert "No quotas of their own" in admin_ui.page("/admin/quotas")
    assert admin_ui.htmx("DELETE", "/admin/quotas/groups/ml").status_code == 422

    assert [e["target"] for e in _audit(client, admin, "quota.set")] == [
        "user:alice",
        "team:ml",
        "user:alice",
    ]
    assert [e["target"] for e in _audit(client, admin, "quota.remove")] == [
        "team:ml",
        "user:alice",
    ]


@pytest.mark.parametrize(
    ("change", "status", "message"),
    [
        ({"name": "nobody"}, 404, "nobody"),
        ({"kind": "team", "name": "nope"}, 404, "nope"),
        ({"kind": "project"}, 422, "kind: Input should be 'user' or 'team'"),
        ({"cpu": "-1"}, 422, "cpu: Input should be greater than 0"),
        ({"cpu": "1000"}, 422, "cpu: Input should be less than or equal to 256"),
        ({"memory": "1e400"}, 422, "memory must be a finite number"),
        ({"memory": ""}, 422, "memory: Field required"),
        ({"gpu": "x"}, 422, "gpu: Input should be a valid integer"),
    ],
)
def test_bad_quota_input_is_refused_and_nothing_written(
    admin_ui: UiClient,
    client: TestClient,
    admin: Account,
    alice: Account,
    change: dict[str, str],
    status: int,
    message: str,
) -> None:
    data = {"kind": "user", "name": "alice", "cpu": "4", "memory": "16", **change}
    r = admin_ui.htmx("POST", "/admin/quotas", data=data)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]
    assert _quotas(client, admin) == []
    assert _audit(client, admin, "quota.set") == []


def test_quota_list_pages(
    admin_ui: UiClient, make_user: Any, client: TestClient, admin: Account
) -> None:
    for i in range(52):
        make_user(f"user{i:02d}")
        r = client.put(
            f"/api/v1/quotas/users/user{i:02d}",
            json={"cpu": 1, "memory_mib": 1024},
            headers=admin.headers,
        )
        assert r.status_code == 200
    first = admin_ui.page("/admin/quotas")
    assert first.count('id="quota-user-') == 50
    assert "Next page" in first and "First page" not in first
    after = first.split('href="/admin/quotas?')[1].split('"')[0].replace("&amp;", "&")
    second = admin_ui.page(f"/admin/quotas?{after}")
    assert second.count('id="quota-user-') == 2 and "user51" in second
    assert "First page" in second and "Next page" not in second
