"""Cursor pagination over a query ordered by an integer primary key."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute, Session

from kiln.domain.errors import InvalidInput

T = TypeVar("T")
MAX_LIMIT = 200
# Ids are INTEGER columns: PostgreSQL refuses to even compare them with anything larger.
MAX_ROW_ID = 2**31 - 1


@dataclass
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": last_id}).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded.encode()))["after"]
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise InvalidInput("cursor is not valid; use the next_cursor of a previous page") from exc
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_ROW_ID:
        raise InvalidInput("cursor is not valid; use the next_cursor of a previous page")
    return value


def paginate(
    db: Session,
    query: Select[T],
    key: InstrumentedAttribute[Any],
    limit: int,
    cursor: str | None,
    descending: bool = False,
) -> Page[T]:
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"limit must be between 1 and {MAX_LIMIT}")
    if cursor:
        after = decode_cursor(cursor)
        query = query.where(key < after if descending else key > after)
    query = query.order_by(key.desc() if descending else key).limit(limit + 1)
    rows = list(db.scalars(query))
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(getattr(rows[-1], key.key)) if more and rows else None
    return Page(rows, next_cursor)
