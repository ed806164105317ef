"""Who may pull, push or delete in which repository: Kiln's roles, through the one role table.

- ``{owner}/{project}/…``: pull needs the project's viewer role (``Action.view``), push its
  contributor role (``Action.write``), delete its admin role (``Action.admin``);
- ``runtimes/…``: every signed-in user pulls, site admins push and delete.

A caller who cannot see a project is granted nothing, exactly as for a project that does not
exist, so the registry's answers never reveal a private project.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy.orm import Session

from kiln.build.registry.errors import NameInvalid
from kiln.build.registry.names import RepositoryName, parse_repository
from kiln.build.registry.repositories import find_project, find_repository
from kiln.build.registry.tokens import Grant
from kiln.db.models import Project, User
from kiln.domain.authz import ACTION_ROLES, Action, effective_role

PULL, PUSH, DELETE = "pull", "push", "delete"
ALL_ACTIONS = frozenset({PULL, PUSH, DELETE})
PROJECT_ACTIONS = {PULL: Action.view, PUSH: Action.write, DELETE: Action.admin}


@dataclass(frozen=True)
class Scope:
    repository: str
    actions: frozenset[str]

    def header(self) -> str:
        """As in a ``WWW-Authenticate`` challenge: ``repository:alice/x/app:pull,push``."""
        return f"repository:{self.repository}:{','.join(sorted(self.actions))}"


def parse_scopes(values: Iterable[str]) -> list[Scope]:
    """``scope`` parameters of a token request (each may hold several, space-separated).
    Resource types other than ``repository`` (the catalog, plugins) are ignored."""
    scopes = []
    for value in values:
        for item in value.split():
            kind, _, rest = item.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind != "repository" or not name:
                continue
            wanted = {a for a in actions.split(",") if a}
            if "*" in wanted:
                wanted = set(ALL_ACTIONS)
            scopes.append(Scope(name, frozenset(wanted & ALL_ACTIONS)))
    return scopes


def allowed_actions(db: Session, user: User | None, repository: str) -> frozenset[str]:
    if user is None or not user.is_active:
        return frozenset()
    try:
        name = parse_repository(repository)
    except NameInvalid:
        return frozenset()
    if name.is_runtime:
        return ALL_ACTIONS if user.is_site_admin else frozenset({PULL})
    project = repository_project(db, name)
    role = None if project is None else effective_role(db, user, project)
    if role is None:
        return frozenset()
    return frozenset(a for a, action in PROJECT_ACTIONS.items() if role >= ACTION_ROLES[action])


def repository_project(db: Session, name: RepositoryName) -> Project | None:
    """The project a repository belongs to: the one it was created for, once it exists (so a
    project created later whose name maps to the same OCI form never inherits it), else the
    project its name resolves to."""
    existing = find_repository(db, name.name)
    if existing is not None:
        return None if existing.project_id is None else db.get(Project, existing.project_id)
    assert name.owner is not None and name.project is not None
    return find_project(db, name.owner, name.project)


def grants_for(db: Session, user: User, scopes: Iterable[Scope]) -> list[Grant]:
    """What a token for ``user`` may carry: each requested scope cut down to what the user's
    roles allow (a scope with nothing left is left out, and says nothing about why)."""
    grants: dict[str, set[str]] = {}
    for scope in scopes:
        allowed = scope.actions & allowed_actions(db, user, scope.repository)
        if allowed:
            grants.setdefault(scope.repository, set()).update(allowed)
    return [Grant(repo, frozenset(actions)) for repo, actions in grants.items()]
