"""The one role table: effective roles, and the SQL listing that must agree with them."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from kiln.db.engine import make_sessionmaker
from kiln.db.models import (
    Collaborator,
    OwnerKind,
    Project,
    Role,
    Team,
    TeamMember,
    TeamRole,
    User,
    Visibility,
)
from kiln.domain.authz import Action, authorize, effective_role, visible_projects_clause
from kiln.domain.errors import Forbidden, NotFound
from kiln.domain.passwords import hash_password

HASH = hash_password("irrelevant-here")  # one argon2 hash shared by every test user


@pytest.fixture
def db(engine: Engine) -> Iterator[Session]:
    with make_sessionmaker(engine)() as session:
        yield session


def user(db: Session, name: str, *, site_admin: bool = False, active: bool = True) -> User:
    row = User(username=name, password_hash=HASH, is_site_admin=site_admin, is_active=active)
    db.add(row)
    db.flush()
    return row


def team(db: Session, name: str, members: dict[User, TeamRole]) -> Team:
    row = Team(name=name)
    row.members = [TeamMember(user_id=u.id, role=r) for u, r in members.items()]
    db.add(row)
    db.flush()
    return row


def project(db: Session, slug: str, owner: User | Team, visibility: Visibility) -> Project:
    is_team = isinstance(owner, Team)
    row = Project(
        owner_name=owner.name if isinstance(owner, Team) else owner.username,
        owner_kind=OwnerKind.team if is_team else OwnerKind.user,
        owner_user_id=None if is_team else owner.id,
        owner_team_id=owner.id if is_team else None,
        name=slug,
        slug=slug,
        visibility=visibility,
    )
    db.add(row)
    db.flush()
    return row


def collaborate(db: Session, p: Project, u: User, role: Role) -> None:
    db.add(Collaborator(project_id=p.id, user_id=u.id, role=role))
    db.flush()


def test_roles_from_every_source_and_the_highest_wins(db: Session) -> None:
    owner, member, maintainer = user(db, "owner"), user(db, "member"), user(db, "maint")
    collab, outsider, boss = (
        user(db, "collab"),
        user(db, "outsider"),
        user(db, "boss", site_admin=True),
    )
    gone = user(db, "gone", active=False)
    lab = team(db, "lab", {member: TeamRole.member, maintainer: TeamRole.maintainer})
    mine = project(db, "mine", owner, Visibility.private)
    theirs = project(db, "theirs", lab, Visibility.private)
    collaborate(db, mine, collab, Role.operator)
    collaborate(db, mine, gone, Role.admin)
    collaborate(db, theirs, member, Role.viewer)  # lower than what the team gives
    collaborate(db, theirs, collab, Role.admin)

    assert effective_role(db, owner, mine) == Role.admin
    assert effective_role(db, boss, mine) == Role.admin
    assert effective_role(db, collab, mine) == Role.operator
    assert effective_role(db, outsider, mine) is None
    assert effective_role(db, gone, mine) is None, "a disabled account has no role"
    assert effective_role(db, None, mine) is None
    assert effective_role(db, member, theirs) == Role.contributor
    assert effective_role(db, maintainer, theirs) == Role.admin
    assert effective_role(db, collab, theirs) == Role.admin
    assert effective_role(db, owner, theirs) is None

    with pytest.raises(NotFound):
        authorize(db, outsider, mine, Action.view)
    with pytest.raises(Forbidden, match="admin role"):
        authorize(db, collab, mine, Action.admin)
    assert authorize(db, collab, mine, Action.operate) == Role.operator


def test_visibility_gives_viewers_and_no_more(db: Session) -> None:
    owner, mate, outsider = user(db, "owner"), user(db, "mate"), user(db, "outsider")
    team(db, "lab", {owner: TeamRole.member, mate: TeamRole.member})
    public = project(db, "pub", owner, Visibility.public)
    shared = project(db, "shared", owner, Visibility.team)
    assert effective_role(db, outsider, public) == Role.viewer
    assert effective_role(db, mate, shared) == Role.viewer
    assert effective_role(db, outsider, shared) is None
    with pytest.raises(Forbidden):
        authorize(db, outsider, public, Action.operate)


@pytest.mark.parametrize("seed", range(3))
def test_the_listing_shows_exactly_the_projects_one_may_view(db: Session, seed: int) -> None:
    """``visible_projects_clause`` (SQL) and ``effective_role`` (Python) are two statements of
    one rule; on random worlds they must agree for every user and project."""
    rng = random.Random(seed)
    users = [user(db, f"u{i}", site_admin=i == 0, active=i != 1) for i in range(8)]
    teams = [
        team(db, f"t{i}", {u: rng.choice(list(TeamRole)) for u in rng.sample(users, 3)})
        for i in range(3)
    ]
    projects = []
    for i in range(12):
        owner: User | Team = rng.choice(users + teams)
        p = project(db, f"p{i}", owner, rng.choice(list(Visibility)))
        for u in rng.sample(users, 2):
            if u is not owner:
                collaborate(db, p, u, rng.choice(list(Role)))
        projects.append(p)
    for u in users:
        listed = set(db.scalars(select(Project.slug).where(visible_projects_clause(u))))
        may_view = {p.slug for p in projects if effective_role(db, u, p) is not None}
        assert listed == may_view, u.username
