"""The backend's side of notifyd's contract, on the caller's own connection.

Every function runs one or two statements on the connection it is given and never commits,
rolls back or opens a transaction of its own: it takes part in the caller's transaction,
so an event is enqueued if and only if the business write around it commits.

The connection kinds are told apart by duck typing, so that no driver is imported here:

* SQLAlchemy 2 ``Connection``, ``Session`` or ``scoped_session`` (any class from the
  ``sqlalchemy`` package in its MRO): statements go through ``execute(text(...))``, so
  SQLAlchemy's own transaction bookkeeping (autobegin, commit) stays right;
* anything with a ``cursor()`` method taking the ``%s`` paramstyle: a psycopg 3 (or
  psycopg2) connection, or Django's ``django.db.connection``;
* a psycopg cursor: a cursor of its ``.connection`` is used, so the caller's cursor keeps
  its results and its row factory does not matter.

SQL is written once with ``{name}`` placeholders and rendered per style.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .errors import error_from

__all__ = [
    "Connection",
    "EventStatus",
    "enqueue",
    "event_status",
    "mark_all_read",
    "mark_read",
    "set_preference",
]

#: A psycopg 3 connection or cursor, a SQLAlchemy 2 Connection or Session, Django's
#: ``django.db.connection`` (or ``connections[alias]``), or another DB-API connection with
#: the ``%s`` paramstyle. Typed as Any because no driver is a dependency of this package.
Connection = Any

UserId = Union[str, int]

# A new event: the unchanged enqueue path (ON CONFLICT keeps a racing transaction with
# the same new key from failing: it waits, then gets no row). No row back means the key
# exists; the second statement reads the original event's id.
_INSERT_EVENT = """
INSERT INTO notify.events (user_id, event_type, body, link, idempotency_key, run_at)
VALUES ({user_id}, {event_type}, {body}, {link}, {idempotency_key},
        COALESCE(CAST({run_at} AS timestamptz), now()))
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING id
"""

_EXISTING_EVENT = """
SELECT id FROM notify.events WHERE idempotency_key = {idempotency_key}
"""

_MARK_READ = """
UPDATE notify.notifications SET read_at = now()
WHERE user_id = {user_id} AND id = ANY(CAST({ids} AS bigint[])) AND read_at IS NULL
"""

_MARK_ALL_READ = """
UPDATE notify.notifications SET read_at = now()
WHERE user_id = {user_id} AND read_at IS NULL
"""

_SET_PREFERENCE = """
INSERT INTO notify.preferences (user_id, event_type, enabled)
VALUES ({user_id}, {event_type}, {enabled})
ON CONFLICT (user_id, event_type)
DO UPDATE SET enabled = EXCLUDED.enabled, updated_at = now()
"""

_EVENT_STATUS = """
SELECT event_id, user_id, event_type, idempotency_key, created_at, run_at,
       outcome, outcome_reason, processed_at, notification_id
FROM notify.event_outcomes
WHERE event_id = {event_id}
"""


@dataclasses.dataclass(frozen=True)
class EventStatus:
    """One row of ``notify.event_outcomes``: what became of an event."""

    event_id: int
    user_id: str
    event_type: str
    idempotency_key: Optional[str]
    created_at: datetime.datetime
    run_at: datetime.datetime
    #: None (not processed yet, or delayed until ``run_at``), ``"stored"``,
    #: ``"opted_out"``, ``"rate_limited"`` or ``"invalid"``.
    outcome: Optional[str]
    #: Why an ``invalid`` event was refused.
    outcome_reason: Optional[str]
    processed_at: Optional[datetime.datetime]
    #: The notification's id in ``notify.notifications`` when ``outcome == "stored"``.
    notification_id: Optional[int]

    @property
    def processed(self) -> bool:
        return self.outcome is not None


def _is_sqlalchemy(conn: object) -> bool:
    return any(c.__module__.startswith("sqlalchemy.") for c in type(conn).__mro__)


def _row_tuple(row: Any) -> Tuple[Any, ...]:
    if isinstance(row, Mapping):  # psycopg dict_row and the like
        return tuple(row.values())
    return tuple(row)


def _run(
    conn: Connection, sql: str, params: Dict[str, Any], *, rows: bool
) -> Tuple[List[Tuple[Any, ...]], int]:
    """Run one statement; return its rows (when ``rows``) and its row count. A refused
    value raises the typed error, with the driver's exception as its cause."""
    try:
        if _is_sqlalchemy(conn):
            from sqlalchemy import text  # the caller has SQLAlchemy: it passed one of its objects

            result = conn.execute(
                text(sql.format(**{k: f":{k}" for k in params})), params
            )
            fetched = [_row_tuple(r) for r in result.fetchall()] if rows else []
            return fetched, int(result.rowcount)
        target = conn
        if not callable(getattr(target, "cursor", None)):
            target = getattr(conn, "connection", None)
            if not callable(getattr(target, "cursor", None)):
                raise TypeError(
                    f"notifyd: unsupported connection type {type(conn).__module__}."
                    f"{type(conn).__qualname__}: pass a psycopg 3 connection or cursor, a "
                    "SQLAlchemy Connection or Session, or django.db.connection"
                )
        with target.cursor() as cur:
            cur.execute(sql.format(**{k: f"%({k})s" for k in params}), params)
            fetched = [_row_tuple(r) for r in cur.fetchall()] if rows else []
            return fetched, int(cur.rowcount)
    except Exception as e:
        typed = error_from(e)
        if typed is not None:
            raise typed from e
        raise


def enqueue(
    conn: Connection,
    user_id: UserId,
    event_type: str,
    body: str,
    *,
    link: Optional[str] = None,
    idempotency_key: Optional[str] = None,
    run_at: Optional[datetime.datetime] = None,
) -> int:
    """Enqueue one notification inside the caller's current transaction; return its id.

    A repeated ``idempotency_key`` enqueues nothing and returns the id of the ORIGINAL
    event, which is kept unchanged (its body, link and outcome). A transaction racing
    another one with the same new key waits for it, then gets the other's id if it
    committed, or inserts its own event if it rolled back.

    ``user_id`` must equal the JWT ``sub`` of the user (an int is written as text).
    ``body`` is plain text, 1 to 1000 characters; the worker removes any markup. ``link``
    is a relative path (``"/messages/7"``) or an http(s) URL. ``run_at`` (an aware
    datetime) delays processing until then.

    Raises UnknownEventType, InvalidBody, UnsafeLink, InvalidUserId or
    InvalidIdempotencyKey when Postgres refuses a value; the transaction is then aborted.
    """
    params: Dict[str, Any] = {
        "user_id": str(user_id),
        "event_type": event_type,
        "body": body,
        "link": link,
        "idempotency_key": idempotency_key,
        "run_at": run_at,
    }
    # Two rounds at most in practice; the third only if the original event was deleted
    # (retention) between the INSERT and the SELECT, which frees its key again.
    for _ in range(3):
        found, _count = _run(conn, _INSERT_EVENT, params, rows=True)
        if found:
            return int(found[0][0])
        found, _count = _run(
            conn, _EXISTING_EVENT, {"idempotency_key": idempotency_key}, rows=True
        )
        if found:
            return int(found[0][0])
    raise RuntimeError(
        f"notifyd: the event with idempotency_key {idempotency_key!r} was neither "
        "inserted nor found (deleted meanwhile?); retry the transaction"
    )


def mark_read(conn: Connection, user_id: UserId, ids: Iterable[int]) -> int:
    """Mark the user's notifications ``ids`` read; return how many changed.

    Ids of other users' notifications, and ones already read, are left alone: always
    pass the authenticated user.
    """
    wanted: Sequence[int] = [int(i) for i in ids]
    _rows, count = _run(
        conn, _MARK_READ, {"user_id": str(user_id), "ids": list(wanted)}, rows=False
    )
    return count


def mark_all_read(conn: Connection, user_id: UserId) -> int:
    """Mark every unread notification of the user read; return how many changed."""
    _rows, count = _run(conn, _MARK_ALL_READ, {"user_id": str(user_id)}, rows=False)
    return count


def set_preference(
    conn: Connection, user_id: UserId, event_type: str, enabled: bool
) -> None:
    """Switch one event type on or off for a user (no row means on). Applies to events
    the worker processes from the commit on, queued ones included."""
    _run(
        conn,
        _SET_PREFERENCE,
        {"user_id": str(user_id), "event_type": event_type, "enabled": bool(enabled)},
        rows=False,
    )


def event_status(conn: Connection, event_id: int) -> Optional[EventStatus]:
    """What became of an event (from ``notify.event_outcomes``), or None when no event
    has this id (never enqueued, rolled back, or deleted after the retention window)."""
    found, _count = _run(conn, _EVENT_STATUS, {"event_id": int(event_id)}, rows=True)
    if not found:
        return None
    return EventStatus(*found[0])
