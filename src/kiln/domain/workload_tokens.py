"""Tokens that workloads hold to call Kiln's API: a session's ``KILN_WORKERS_TOKEN``.

A token is 32 random bytes (``kwt_…``), made when the session is claimed for its start and
handed to the runner in the session's environment; the database keeps only its SHA-256, as
for API keys. It is good for its scope only (``workers``: the ``/api/v1/workers`` routes,
for the session's own project, as the user who started the session, with that user's
current role) and only while the session is live: once the session stops or ends, the token
is worthless. Anywhere else it is refused (``kiln.api.deps``): it is not an API key.
"""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from kiln.db.models import utcnow
from kiln.db.workload_models import Workload, WorkloadToken
from kiln.domain.errors import NotAuthenticated
from kiln.domain.passwords import hash_token, new_token
from kiln.scheduling.states import WorkloadState

PREFIX = "kwt_"  # not kiln_ (API keys): the two are told apart before any lookup
WORKERS = "workers"
WORKERS_ENV = "KILN_WORKERS_TOKEN"
# A stopping session is on its way out: its token already stops working.
VALID_STATES = frozenset(
    {WorkloadState.QUEUED, WorkloadState.WAITING, WorkloadState.STARTING, WorkloadState.RUNNING}
)


def issue(db: Session, workload: Workload, scope: str) -> str:
    """A new token for ``workload`` (flushed; the caller commits before handing it out).
    A workload has one token: issuing again (a start retried from scratch) replaces it."""
    token = new_token(PREFIX)
    db.execute(delete(WorkloadToken).where(WorkloadToken.workload_id == workload.id))
    db.add(
        WorkloadToken(
            workload_id=workload.id, token_hash=hash_token(token), scope=scope, created_at=utcnow()
        )
    )
    db.flush()
    return token


def session_env(db: Session, workload: Workload) -> dict[str, str]:
    """The variables that carry a session's tokens into it."""
    return {WORKERS_ENV: issue(db, workload, WORKERS)}


def resolve(db: Session, token: str, scope: str) -> Workload:
    """The live workload holding ``token`` for ``scope``, or ``NotAuthenticated`` (401)."""
    row = db.execute(
        select(WorkloadToken, Workload)
        .join(Workload, Workload.id == WorkloadToken.workload_id)
        .where(WorkloadToken.token_hash == hash_token(token))
    ).first()
    if row is None or row[0].scope != scope:
        raise NotAuthenticated("the workers token is not valid")
    workload: Workload = row[1]
    if WorkloadState(workload.state) not in VALID_STATES:
        raise NotAuthenticated(
            f"the workers token belongs to session {workload.id}, which is {workload.state}: "
            "a token works only while its session runs"
        )
    return workload
