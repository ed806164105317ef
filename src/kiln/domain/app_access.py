"""Who may use which origin of the content domain, and where its traffic goes.

Every host ``{label}.{content domain}`` is one origin of user content, chosen by its first
DNS label:

| label                   | what                                   | who                          |
| ----------------------- | -------------------------------------- | ---------------------------- |
| ``{session id}``        | the session's editor (JupyterLab)      | ``USE_SESSION`` (contributor) |
| ``app-{session id}``    | the session's ``CDSW_APP_PORT``        | ``USE_SESSION`` (contributor) |
| ``read-only-{session id}`` | the session's ``CDSW_READONLY_PORT`` | viewers of the project       |
| ``{subdomain}``         | an application                         | viewers; anyone when public  |

``admit`` decides for one label and one user (or nobody, for a public application) on every
look; the proxy caches a yes for a few seconds only, so removing a collaborator, stopping an
application or turning public applications off takes effect within that time. A caller who
may not see the project is told the address does not exist; a caller who is not signed in
is sent to sign in first (``NotAuthenticated``), whether the application exists or not, so
neither answer reveals a private application.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass

from sqlalchemy.orm import Session

from kiln.db.models import Project, User, utcnow
from kiln.db.workload_models import Workload
from kiln.domain import applications as apps
from kiln.domain import session_access, site_settings
from kiln.domain.authz import USE_SESSION, Action, authorize, effective_role
from kiln.domain.errors import Conflict, KilnError, NotAuthenticated, NotFound
from kiln.domain.session_editors import CDSW_APP_PORT, CDSW_READONLY_PORT
from kiln.scheduling.states import WorkloadState

APP_PREFIX = "app-"
READ_ONLY_PREFIX = "read-only-"


class Kind(enum.Enum):
    EDITOR = "editor"
    SESSION_APP = "session app port"
    SESSION_READ_ONLY = "session read-only port"
    APPLICATION = "application"


def kind_of(label: str) -> tuple[Kind, str]:
    """What a label names, and the session id or subdomain inside it."""
    if label.startswith(APP_PREFIX):
        return Kind.SESSION_APP, label.removeprefix(APP_PREFIX)
    if label.startswith(READ_ONLY_PREFIX):
        return Kind.SESSION_READ_ONLY, label.removeprefix(READ_ONLY_PREFIX)
    if apps.SESSION_ID_SHAPE.fullmatch(label):
        return Kind.EDITOR, label
    return Kind.APPLICATION, label


@dataclass(frozen=True)
class Identity:
    """What the app is told about the signed-in user (``Remote-User`` and friends)."""

    username: str
    name: str
    email: str


@dataclass(frozen=True)
class Grant:
    """Forward this origin's traffic to ``endpoint``, as ``identity`` (None: anonymous); the
    traffic keeps session ``session_id`` from its idle timeout."""

    endpoint: str
    identity: Identity | None
    session_id: str | None = None


class Unavailable(KilnError):
    """The origin exists and the caller may use it, but nothing answers there now."""

    status = 503
    title = "Not available"

    def __init__(self, detail: str, state: str) -> None:
        super().__init__(detail)
        self.state = state  # starting, waiting, stopped, crashed, ...

    @property
    def coming(self) -> bool:
        """Will it answer by itself soon (worth a page that looks again)?"""
        return self.state in ("starting", "waiting", "crashed", "restarting")


def identity(user: User) -> Identity:
    return Identity(user.username, user.full_name, user.email)


def _user(db: Session, user: User | int | None) -> User | None:
    if user is None or isinstance(user, User):
        return user
    found = db.get(User, user)
    if found is None or not found.is_active:
        raise session_access.AccessRefused(
            "the account this access was granted to is gone or disabled"
        )
    return found


def admit(
    db: Session,
    label: str,
    user: User | int | None,
    now: dt.datetime | None = None,
    grant: str = "",
) -> Grant:
    """May ``user`` (None: nobody signed in) use origin ``label`` now, and where does its
    traffic go? ``grant`` names the sign-in the access came from, which must still be there
    (``session_access.grant_alive``). Raises NotAuthenticated, NotFound, Forbidden,
    Conflict or ``Unavailable``."""
    kind, key = kind_of(label)
    found = _user(db, user)
    if found is not None and not session_access.grant_alive(db, grant, found.id):
        raise NotAuthenticated("the Kiln sign-in this access came from has ended; sign in again")
    if kind is Kind.APPLICATION:
        return _application(db, key, found, now or utcnow())
    if found is None:
        raise NotAuthenticated("sign in to Kiln to open this session")
    if kind is Kind.EDITOR:
        admission = session_access.admit(db, key, found)
        return Grant(admission.workload.endpoint, identity(found), admission.workload.id)
    return _session_port(db, kind, key, found)


def _session_port(db: Session, kind: Kind, session_id: str, user: User) -> Grant:
    row = db.get(Workload, session_id[:32]) if session_id.isascii() else None
    project = db.get(Project, row.project_id) if row is not None else None
    missing = NotFound(f"no session {session_id[:40]!r}")
    if row is None or row.kind != "session" or project is None:
        raise missing
    action = USE_SESSION if kind is Kind.SESSION_APP else Action.view
    try:
        authorize(db, user, project, action)
    except NotFound:
        raise missing from None
    if row.state != WorkloadState.RUNNING:
        raise Conflict(f"session {row.id} is {row.state}, not running")
    port = CDSW_APP_PORT if kind is Kind.SESSION_APP else CDSW_READONLY_PORT
    endpoint = row.ports.get(str(port), "")
    if not endpoint:
        raise Conflict(f"session {row.id} has no web UI port (it started before Kiln had them)")
    return Grant(endpoint, identity(user), row.id)


def _application(db: Session, subdomain: str, user: User | None, now: dt.datetime) -> Grant:
    app = apps.by_subdomain(db, subdomain)
    project = db.get(Project, app.project_id) if app is not None else None
    public = (
        app is not None
        and app.public
        and bool(site_settings.get(db, site_settings.PUBLIC_APPLICATIONS))
    )
    if user is None and not public:
        raise NotAuthenticated("sign in to Kiln to open this application")
    role = effective_role(db, user, project) if user is not None and project is not None else None
    if app is None or project is None or (role is None and not public):
        raise NotFound("there is no application at this address")
    current, pending = apps.current_instance(db, app), apps.next_instance(db, app)
    status = apps.describe(app, current, pending, now)
    if not status.serving or current is None or not current.endpoint:
        raise Unavailable(f"{app.name}: {status.message}", status.state)
    return Grant(current.endpoint, identity(user) if user is not None else None)
