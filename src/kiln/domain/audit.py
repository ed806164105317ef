"""The audit log: who did what, when, from where, with what outcome."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from kiln.db.models import AuditEvent, User


def record(
    db: Session,
    action: str,
    *,
    actor: User | None = None,
    actor_name: str | None = None,
    target: str = "",
    address: str = "",
    outcome: str = "success",
    **details: Any,
) -> None:
    """Add an event to the caller's transaction: it commits with the change it describes."""
    db.add(
        AuditEvent(
            action=action,
            actor_id=actor.id if actor else None,
            actor_name=actor.username if actor else (actor_name or "")[:64],
            target=target[:1024],
            address=address[:64],
            outcome=outcome,
            details=details,
        )
    )


def record_now(factory: sessionmaker[Session], action: str, **kwargs: Any) -> None:
    """Record in its own transaction: for failures, whose own transaction rolls back."""
    with factory() as db, db.begin():
        record(db, action, **kwargs)
