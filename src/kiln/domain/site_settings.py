"""Site settings a site admin changes while Kiln runs (stored in ``site_settings``).

Each setting has a name, a type and a default; a row exists only once an admin changed it.
Readers on hot paths (the application proxy asks whether public applications are allowed)
cache the answer for a few seconds: a change takes effect everywhere within that time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from kiln.db.app_models import SiteSetting
from kiln.db.models import utcnow
from kiln.domain.errors import InvalidInput


@dataclass(frozen=True)
class Definition:
    name: str
    kind: type
    default: Any
    description: str


PUBLIC_APPLICATIONS = "public_applications"

DEFINITIONS = {
    d.name: d
    for d in (
        Definition(
            PUBLIC_APPLICATIONS,
            bool,
            False,
            "Applications marked public are reachable without signing in. Off: every "
            "application needs a signed-in user who may view its project.",
        ),
    )
}


def get_all(db: Session) -> dict[str, Any]:
    """Every setting's value (stored, else its default)."""
    stored = {row.name: row.value for row in db.scalars(select(SiteSetting))}
    return {name: stored.get(name, d.default) for name, d in DEFINITIONS.items()}


def get(db: Session, name: str) -> Any:
    row = db.get(SiteSetting, name)
    return DEFINITIONS[name].default if row is None else row.value


def update(db: Session, changes: dict[str, Any]) -> dict[str, Any]:
    """Set the named settings (flushed; the caller commits with the audit record). Unknown
    names and values of the wrong type are refused before anything is written."""
    for name, value in changes.items():
        definition = DEFINITIONS.get(name)
        if definition is None:
            known = ", ".join(sorted(DEFINITIONS))
            raise InvalidInput(f"unknown site setting {name[:64]!r}; settings: {known}")
        if type(value) is not definition.kind:
            raise InvalidInput(f"site setting {name} takes a {definition.kind.__name__}")
    for name, value in changes.items():
        row = db.get(SiteSetting, name)
        if row is None:
            db.add(SiteSetting(name=name, value=value, updated_at=utcnow()))
        else:
            row.value, row.updated_at = value, utcnow()
    db.flush()
    return get_all(db)
