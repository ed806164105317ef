"""Rules for names that appear in URLs and paths."""

from __future__ import annotations

import re
import unicodedata

from kiln.domain.errors import InvalidInput

_SLUG = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$")
# Names that would collide with routes or git paths.
_RESERVED = frozenset({"api", "git", "static", "x-api-key"})
# Owner names (users, teams) that would collide with the registry: /v2/ is its API and
# runtimes/{name} its site namespace beside {owner}/{project}/{name}.
_RESERVED_OWNERS = frozenset({"runtimes", "v2"})


def check_slug(value: str, what: str) -> str:
    """A lowercase URL-safe identifier: usernames, team names, project slugs."""
    if not _SLUG.match(value) or ".." in value or value.endswith(".git"):
        raise InvalidInput(
            f"{what} {value[:80]!r} is not valid: use 1-64 lowercase letters, digits, '.', '_' "
            "or '-', starting and ending with a letter or digit"
        )
    if value in _RESERVED:
        raise InvalidInput(f"{what} {value!r} is reserved")
    return value


def check_owner_name(value: str, what: str) -> str:
    """A user or team name: a slug that is none of Kiln's own prefixes."""
    check_slug(value, what)
    if value in _RESERVED_OWNERS:
        raise InvalidInput(f"{what} {value!r} is reserved (Kiln's registry uses it)")
    return value


def slugify(name: str) -> str:
    """The URL form of a display name: 'My <b>Project</b>' -> 'my-b-project-b'."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")[:64].strip("-")
    return slug or "project"


def check_display_name(value: str, what: str, max_len: int = 100) -> str:
    value = value.strip()
    if not value:
        raise InvalidInput(f"{what} must not be empty")
    if len(value) > max_len:
        raise InvalidInput(f"{what} is longer than {max_len} characters")
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise InvalidInput(f"{what} must not contain control characters")
    return value
