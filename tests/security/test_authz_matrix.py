"""The authorization matrix: every project endpoint x every kind of caller.

The expectations come from ONE table, written here from CML's role model (not imported from
the code under test): ``ENDPOINTS`` names the lowest project role each endpoint needs, and each
``Scenario`` names the role every principal should end up with. From those two the expected
outcome follows:

- no credentials                      -> 401 (whether or not the project exists);
- signed in but cannot view           -> 404, indistinguishable from a project that does not exist;
- can view, role below what is needed -> 403;
- otherwise                           -> success (2xx/3xx).

Never a 500; every refusal is ``application/problem+json``. A new endpoint is one line in
``ENDPOINTS`` (plus, if it consumes something, a name in ``prepare``).
"""

from __future__ import annotations

import base64
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi.testclient import TestClient

from tests.conftest import Account

ROLES = ("viewer", "operator", "contributor", "admin")
RANK = {name: rank for rank, name in enumerate(ROLES)}

OWNER = "alice"
FILES_API = importlib.util.find_spec("kiln.api.files") is not None
GIT_API = importlib.util.find_spec("kiln.gitserver") is not None and any(
    importlib.util.find_spec(f"kiln.gitserver.{m}") is not None for m in ("http", "routes", "app")
)


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # "{p}" is /api/v1/projects/{owner}/{slug}; "{o}"/"{s}" are owner and slug
    needs: str  # the lowest project role allowed to call it
    json: Any = None
    content: bytes | None = None
    prepare: tuple[str, ...] = ()  # resources the call consumes, re-created before each call
    deletes_project: bool = False  # the project is re-created after each successful call
    git: bool = False  # authenticates with the API key as the HTTP Basic password
    redirects: bool = False  # answers 303 to another origin: the redirect is not followed

    def url(self, owner: str, slug: str) -> str:
        base = f"/api/v1/projects/{owner}/{slug}"
        return self.path.format(p=base, o=owner, s=slug)

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


ENDPOINTS: list[Endpoint] = [
    Endpoint("GET", "{p}", "viewer"),
    Endpoint("PATCH", "{p}", "admin", json={"description": "changed"}),
    Endpoint("GET", "{p}/collaborators", "viewer"),
    Endpoint("PUT", "{p}/collaborators/target", "admin", json={"role": "viewer"}),
    Endpoint("DELETE", "{p}/collaborators/target", "admin", prepare=("collaborator",)),
    Endpoint("GET", "{p}/env", "viewer"),
    Endpoint("PUT", "{p}/env/NEW_VAR", "admin", json={"value": "1"}),
    Endpoint("DELETE", "{p}/env/FOO", "admin", prepare=("env",)),
    Endpoint("DELETE", "{p}", "admin", deletes_project=True),
]
if FILES_API:
    ENDPOINTS += [
        Endpoint("GET", "{p}/files/hello.txt", "viewer", prepare=("file:hello.txt",)),
        Endpoint("GET", "{p}/files/", "viewer"),
        Endpoint("GET", "{p}/files/?format=zip", "viewer"),
        Endpoint("PUT", "{p}/files/new.txt", "contributor", content=b"new"),
        Endpoint("DELETE", "{p}/files/hello.txt", "contributor", prepare=("file:hello.txt",)),
        Endpoint("POST", "{p}/mkdir", "contributor", json={"path": "d"}, prepare=("absent:d",)),
        Endpoint(
            "POST",
            "{p}/move",
            "contributor",
            json={"source": "hello.txt", "destination": "moved.txt"},
            prepare=("file:hello.txt", "absent:moved.txt"),
        ),
    ]
# Applications (no runner here: instances stay queued; stopping one asks a runner that is
# not there, which must not fail the request).
APP = "{p}/applications/web"
ENDPOINTS += [
    Endpoint("GET", "{p}/applications", "viewer"),
    Endpoint(
        "POST",
        "{p}/applications",
        "contributor",
        json={"name": "made", "subdomain": "made-{s}", "script": "app.py"},
        prepare=("file:app.py", "absent-app:made"),
    ),
    Endpoint("GET", APP, "viewer", prepare=("app:web",)),
    Endpoint("PATCH", APP, "contributor", json={"description": "changed"}, prepare=("app:web",)),
    Endpoint("POST", APP + "/start", "operator", prepare=("app:web",)),
    Endpoint("POST", APP + "/restart", "operator", prepare=("app:web",)),
    Endpoint("POST", APP + "/stop", "operator", prepare=("app:web",)),
    Endpoint("GET", APP + "/logs", "viewer", prepare=("app:web",)),
    Endpoint("GET", APP + "/open", "viewer", prepare=("app:web",), redirects=True),
    Endpoint("DELETE", APP, "contributor", prepare=("app:web",)),
]
if GIT_API:
    ENDPOINTS += [
        Endpoint("GET", "/git/{o}/{s}.git/info/refs?service=git-upload-pack", "viewer", git=True),
        Endpoint(
            "GET", "/git/{o}/{s}.git/info/refs?service=git-receive-pack", "contributor", git=True
        ),
    ]


@dataclass(frozen=True)
class Scenario:
    """A project set-up and the role each principal should have on it (None: no access)."""

    name: str
    owner_is_team: bool
    visibility: str
    roles: dict[str, str | None] = field(default_factory=dict)


COLLABORATORS = {"viewer": "viewer", "operator": "operator", "contributor": "contributor"}
COLLABORATORS["admin-collab"] = "admin"
BASE_ROLES: dict[str, str | None] = {
    "anonymous": None,
    "stranger": None,
    "teammate": None,  # shares a team with alice; that team does not own the project
    **COLLABORATORS,
    "site-admin": "admin",
}

SCENARIOS = [
    Scenario("private", False, "private", {**BASE_ROLES, "alice": "admin"}),
    Scenario(
        "public",
        False,
        "public",
        {**BASE_ROLES, "alice": "admin", "stranger": "viewer", "teammate": "viewer"},
    ),
    Scenario("team-visible", False, "team", {**BASE_ROLES, "alice": "admin", "teammate": "viewer"}),
    Scenario(
        "team-owned",
        True,
        "private",
        # the owning team "lab": teammate is a member, alice its maintainer
        {**BASE_ROLES, "alice": "admin", "teammate": "contributor"},
    ),
    Scenario(
        "team-owned-public",
        True,
        "public",
        {**BASE_ROLES, "alice": "admin", "teammate": "contributor", "stranger": "viewer"},
    ),
]


def expected_status(principal: str, role: str | None, needs: str) -> str:
    if principal == "anonymous":
        return "401"
    if role is None:
        return "404"
    return "ok" if RANK[role] >= RANK[needs] else "403"


def outcome(status: int) -> str:
    return "ok" if status < 400 else str(status)


class People:
    """Every principal, created once per test: each account costs an argon2 hash."""

    def __init__(self, client: TestClient, make_user: Callable[..., Account]) -> None:
        self.client = client
        self.site_admin = make_user("site-admin", site_admin=True)
        self.accounts = {
            name: make_user(name)
            for name in ("alice", "stranger", "teammate", "target", *COLLABORATORS)
        }
        self.accounts["site-admin"] = self.site_admin
        # alice and teammate share the team "lab", which owns the project in team scenarios.
        alice = self.accounts["alice"]
        assert client.post("/api/v1/teams", json={"name": "lab"}, headers=alice.headers).is_success
        r = client.put("/api/v1/teams/lab/members/teammate", json={}, headers=alice.headers)
        assert r.is_success


class World:
    """The project of one scenario (its slug is the scenario's name), driven over HTTP."""

    def __init__(self, people: People, scenario: Scenario) -> None:
        self.client, self.scenario = people.client, scenario
        self.site_admin, self.accounts = people.site_admin, people.accounts
        self.owner = "lab" if scenario.owner_is_team else OWNER
        self.slug = scenario.name
        self.project_gone = False
        self.prepared: set[str] = set()
        self.used_up: set[str] = set()
        self.create_project()

    def call(self, method: str, url: str, who: Account | None, **kw: Any) -> Any:
        headers = who.headers if who else {}
        r = self.client.request(method, url, headers=headers, **kw)
        assert r.status_code < 400, f"set-up call {method} {url} failed: {r.text}"
        return r

    def create_project(self) -> None:
        admin = self.site_admin
        body = {"name": self.slug, "owner": self.owner, "visibility": self.scenario.visibility}
        self.call("POST", "/api/v1/projects", admin, json=body)
        for user, role in COLLABORATORS.items():
            self.call("PUT", f"{self.base}/collaborators/{user}", admin, json={"role": role})

    @property
    def base(self) -> str:
        return f"/api/v1/projects/{self.owner}/{self.slug}"

    def prepare(self, what: str) -> None:
        admin = self.site_admin
        if what == "collaborator":
            self.call("PUT", f"{self.base}/collaborators/target", admin, json={"role": "viewer"})
        elif what == "env":
            self.call("PUT", f"{self.base}/env/FOO", admin, json={"value": "bar"})
        elif what.startswith("file:"):
            self.call("PUT", f"{self.base}/files/{what[5:]}", admin, content=b"hello")
        elif what.startswith("app:"):
            name = what[4:]
            if self.client.get(
                f"{self.base}/applications/{name}", headers=admin.headers
            ).is_success:
                return
            self.prepare("file:app.py")
            body = {"name": name, "subdomain": f"{name}-{self.slug}", "script": "app.py"}
            self.call("POST", f"{self.base}/applications", admin, json=body)
        elif what.startswith("absent-app:"):
            url = f"{self.base}/applications/{what[11:]}"
            r = self.client.delete(url, headers=admin.headers)
            assert r.status_code in (204, 404), r.text
        elif what.startswith("absent:"):
            url = f"{self.base}/files/{what[7:]}?recursive=true"
            r = self.client.delete(url, headers=admin.headers)
            assert r.status_code in (204, 404), r.text
        else:
            raise AssertionError(f"unknown resource {what}")

    def headers(self, principal: str, git: bool) -> dict[str, str]:
        if principal == "anonymous":
            return {}
        account = self.accounts[principal]
        if git:
            raw = base64.b64encode(f"{account.username}:{account.key}".encode()).decode()
            return {"Authorization": f"Basic {raw}"}
        return account.headers

    def request(self, endpoint: Endpoint, principal: str, owner: str | None = None) -> Any:
        """Call ``endpoint``; re-create first whatever an earlier successful call used up."""
        if self.project_gone:
            self.create_project()
            self.project_gone, self.used_up = False, set()
        for what in endpoint.prepare:
            if what in self.used_up or what not in self.prepared:
                self.prepare(what)
                self.prepared.add(what)
                self.used_up.discard(what)
        r = self.client.request(
            endpoint.method,
            endpoint.url(owner or self.owner, self.slug),
            headers=self.headers(principal, endpoint.git),
            json=_for_project(endpoint.json, self.slug),
            content=endpoint.content,
            follow_redirects=not endpoint.redirects,
        )
        if r.status_code < 400 and owner is None and endpoint.method != "GET":
            self.used_up.update(endpoint.prepare)
            self.project_gone = endpoint.deletes_project
        return r


def _for_project(body: Any, slug: str) -> Any:
    """A JSON body whose text values may name the project's slug as ``{s}`` (names that must
    be unique on the whole site, such as an application's subdomain)."""
    if not isinstance(body, dict):
        return body
    return {k: v.format(s=slug) if isinstance(v, str) else v for k, v in body.items()}


def test_authorization_matrix(client: TestClient, make_user: Callable[..., Account]) -> None:
    """Every scenario, four checks each; all mismatches are reported together."""
    people = People(client, make_user)
    problems = []
    for scenario in SCENARIOS:
        world = World(people, scenario)
        found = [
            *every_endpoint_for_every_principal(world),
            *hidden_projects_look_missing(world),
            *refusal_comes_before_body_validation(world),
            *project_list_shows_what_each_caller_may_view(world),
        ]
        problems += [f"[{scenario.name}] {p}" for p in found]
    assert not problems, "\n".join(problems)


def every_endpoint_for_every_principal(world: World) -> Iterator[str]:
    for endpoint in ENDPOINTS:
        for principal, role in world.scenario.roles.items():
            r = world.request(endpoint, principal)
            expected = expected_status(principal, role, endpoint.needs)
            got = outcome(r.status_code)
            if r.status_code >= 500 or got != expected:
                yield f"{endpoint} as {principal}: want {expected}, got {r.text[:150]}"
            elif r.status_code >= 400 and r.headers["content-type"] != "application/problem+json":
                yield f"{endpoint} as {principal}: not problem+json: {r.text[:100]}"


def hidden_projects_look_missing(world: World) -> Iterator[str]:
    """Same status and same words (but the name) for an existing project one cannot see."""
    hidden = [p for p, role in world.scenario.roles.items() if role is None]
    for endpoint in ENDPOINTS:
        for principal in hidden:
            real = world.request(endpoint, principal)
            missing = world.request(endpoint, principal, owner="nobody-here")
            if real.status_code != missing.status_code:
                yield f"{endpoint} as {principal}: {real.status_code} != {missing.status_code}"
            else:
                real_detail = real.json()["detail"].replace(f"{world.owner}/", "X/")
                missing_detail = missing.json()["detail"].replace("nobody-here/", "X/")
                if real_detail != missing_detail:
                    yield f"{endpoint} as {principal}: {real_detail!r} != {missing_detail!r}"


def refusal_comes_before_body_validation(world: World) -> Iterator[str]:
    """A caller without the role learns nothing from a malformed body: 403/404, not 422."""
    url = f"{world.base}/collaborators/target"
    for principal, role in world.scenario.roles.items():
        headers = world.headers(principal, git=False)
        r = world.client.put(url, json={"role": "emperor"}, headers=headers)
        expected = expected_status(principal, role, "admin")
        want = 422 if expected == "ok" else int(expected)
        if r.status_code != want:
            yield f"PUT collaborator with a bad body as {principal}: want {want}, got {r.text}"


def project_list_shows_what_each_caller_may_view(world: World) -> Iterator[str]:
    for principal, role in world.scenario.roles.items():
        r = world.client.get("/api/v1/projects", headers=world.headers(principal, git=False))
        if principal == "anonymous":
            if r.status_code != 401:
                yield f"project list as anonymous: {r.status_code}"
            continue
        listed = {(p["owner"], p["slug"]) for p in r.json()["items"]}
        if ((world.owner, world.slug) in listed) != (role is not None):
            yield f"project list as {principal}: listed={not role}, role={role}"
