#!/usr/bin/env python3
"""Enqueue notifyd notifications from a Python backend, with psycopg 3.

Copy `enqueue_notification` (and, if useful, `set_preference` and `mark_read`) into the
backend. The rules for every column are in jobs/README.md.

The one rule that matters most: call `enqueue_notification` on the *same connection and
inside the same transaction* as the business write it announces. The notification is then
enqueued if and only if that transaction commits; a rollback leaves nothing behind.

Run the demonstration against a migrated database (`notifyd migrate`):

    pip install "psycopg[binary]"
    DATABASE_URL=postgres://user:pass@host:5432/db python3 jobs/enqueue_example.py

It creates a small business table (`demo_messages`) if needed, then:
1. in ONE transaction, writes a message row and enqueues its notification, and commits;
2. retries that enqueue with the same idempotency key: a no-op;
3. in another transaction, writes a message row and enqueues its notification, then fails
   and rolls back: neither the row nor the event exists afterwards.
The last line of its output is a JSON summary (tests/jobs_docs.rs reads it). It exits with
a non-zero status if any of the three did not behave as described.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from typing import Iterable, Optional, Union

try:
    import psycopg
    from psycopg.rows import tuple_row
except ImportError:  # pragma: no cover - exercised by hand
    sys.stderr.write(
        "enqueue_example.py needs psycopg 3 for python3: "
        'run  pip install "psycopg[binary]"  and try again\n'
    )
    sys.exit(2)

# ON CONFLICT DO NOTHING: a repeated idempotency key is a no-op (a plain INSERT would be
# one too), and a transaction racing another one with the same *new* key gets a no-op
# instead of a unique violation. COALESCE keeps the column default (now()) when no delay
# is asked for.
_ENQUEUE = """
INSERT INTO notify.events (user_id, event_type, body, link, idempotency_key, run_at)
VALUES (%s, %s, %s, %s, %s, COALESCE(%s::timestamptz, now()))
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING id
"""

_SET_PREFERENCE = """
INSERT INTO notify.preferences (user_id, event_type, enabled)
VALUES (%s, %s, %s)
ON CONFLICT (user_id, event_type)
DO UPDATE SET enabled = EXCLUDED.enabled, updated_at = now()
"""

_MARK_READ = """
UPDATE notify.notifications SET read_at = now()
WHERE user_id = %s AND id = ANY(%s)
"""

ConnOrCursor = Union["psycopg.Connection", "psycopg.Cursor"]


def _connection(conn_or_cursor: ConnOrCursor) -> "psycopg.Connection":
    # Use our own cursor on the caller's connection (same transaction), so the caller's
    # cursor keeps its results and its row factory does not matter.
    if isinstance(conn_or_cursor, psycopg.Connection):
        return conn_or_cursor
    return conn_or_cursor.connection


def enqueue_notification(
    conn_or_cursor: ConnOrCursor,
    user_id: Union[str, int],
    event_type: str,
    body: str,
    link: Optional[str] = None,
    idempotency_key: Optional[str] = None,
    *,
    run_at: Optional[datetime] = None,
) -> Optional[int]:
    """Enqueue one notification inside the caller's current transaction.

    Does not commit: the event is enqueued when, and only if, the caller's transaction
    commits. Returns the new event id, or None when `idempotency_key` was already used
    (the repeat is a no-op; the first event is kept unchanged).

    `user_id` must equal the JWT `sub` claim of the user (ints are converted to text).
    `body` is plain text, 1..1000 characters; any markup in it is removed by the worker.
    `link` is a relative path ("/messages/7") or an http(s) URL. `run_at` (an aware
    datetime) delays processing until then.

    Invalid values raise at once, from Postgres, naming the constraint, e.g.
    psycopg.errors.CheckViolation with e.diag.constraint_name == "events_body_length",
    or psycopg.errors.ForeignKeyViolation ("events_event_type_known") for an unknown
    type. Like any failed statement this aborts the surrounding transaction; if the
    business write must survive a bad notification, wrap the call in a nested
    `with conn.transaction():` (a savepoint) and catch psycopg.errors.IntegrityError.
    """
    conn = _connection(conn_or_cursor)
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(
            _ENQUEUE,
            (str(user_id), event_type, body, link, idempotency_key, run_at),
        )
        row = cur.fetchone()
    return row[0] if row else None


def set_preference(
    conn_or_cursor: ConnOrCursor, user_id: Union[str, int], event_type: str, enabled: bool
) -> None:
    """Turn one event type on or off for a user (a missing row means on)."""
    conn = _connection(conn_or_cursor)
    with conn.cursor() as cur:
        cur.execute(_SET_PREFERENCE, (str(user_id), event_type, enabled))


def mark_read(conn_or_cursor: ConnOrCursor, user_id: Union[str, int], ids: Iterable[int]) -> int:
    """Mark the authenticated user's notifications read; returns how many changed.

    Ids that belong to another user are ignored: always pass the user from the session.
    """
    conn = _connection(conn_or_cursor)
    with conn.cursor() as cur:
        cur.execute(_MARK_READ, (str(user_id), list(ids)))
        return cur.rowcount


# --------------------------------------------------------------------------------------
# The demonstration.
# --------------------------------------------------------------------------------------

_DEMO_TABLE = """
CREATE TABLE IF NOT EXISTS public.demo_messages (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sender     text NOT NULL,
    recipient  text NOT NULL,
    text       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
)
"""


class _BusinessFailure(Exception):
    """Stands in for anything that makes the business transaction fail after the enqueue."""


def _send_message(conn: "psycopg.Connection", sender: str, recipient: str, text: str):
    """The business write plus its notification. Runs in the caller's transaction."""
    message_id = conn.execute(
        "INSERT INTO public.demo_messages (sender, recipient, text) VALUES (%s, %s, %s)"
        " RETURNING id",
        (sender, recipient, text),
    ).fetchone()[0]
    key = f"demo_message:{message_id}:new_message"
    event_id = enqueue_notification(
        conn,
        recipient,
        "new_message",
        f"You have a new message from {sender}",  # points to the content, never holds it
        link=f"/messages/{message_id}",
        idempotency_key=key,
    )
    return message_id, event_id, key


def main() -> int:
    url = os.environ.get("DATABASE_URL", "").strip()
    if not url:
        sys.stderr.write("set DATABASE_URL to the notifyd database (postgres://...)\n")
        return 2

    # autocommit=True, so that every `with conn.transaction():` block is exactly one
    # BEGIN ... COMMIT (or ROLLBACK when the block raises).
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(_DEMO_TABLE)
        failures = []

        # 1. One transaction: the business row and its notification commit together.
        with conn.transaction():
            message_id, event_id, key = _send_message(
                conn, "Alice", "42", "Lunch at noon?"
            )
        print(f"committed: message {message_id}, notification event {event_id} ({key})")
        if event_id is None:
            failures.append("the committed enqueue returned no event id")

        # 2. A retried enqueue with the same key is a no-op.
        with conn.transaction():
            retried = enqueue_notification(
                conn, "42", "new_message", "You have a new message from Alice",
                link=f"/messages/{message_id}", idempotency_key=key,
            )
        print(f"retry with the same idempotency key: {'no-op' if retried is None else retried}")
        if retried is not None:
            failures.append("a repeated idempotency key enqueued a second event")

        # 3. A transaction that fails after the enqueue: nothing is left behind.
        rolled_back = {}
        try:
            with conn.transaction():
                rb_message_id, rb_event_id, rb_key = _send_message(
                    conn, "Mallory", "42", "This message is never sent"
                )
                rolled_back = {
                    "message_id": rb_message_id,
                    "event_id": rb_event_id,
                    "idempotency_key": rb_key,
                }
                raise _BusinessFailure("payment declined")
        except _BusinessFailure as e:
            print(f"rolled back ({e}): message {rb_message_id}, event {rb_event_id}")
        left = conn.execute(
            "SELECT (SELECT count(*) FROM public.demo_messages WHERE id = %s)"
            "     + (SELECT count(*) FROM notify.events WHERE idempotency_key = %s)",
            (rolled_back["message_id"], rolled_back["idempotency_key"]),
        ).fetchone()[0]
        if left != 0:
            failures.append("the rolled-back transaction left rows behind")
        else:
            print("after the rollback: no message row, no event, nothing enqueued")

        print(
            json.dumps(
                {
                    "committed": {
                        "message_id": message_id,
                        "event_id": event_id,
                        "idempotency_key": key,
                    },
                    "retried_event_id": retried,
                    "rolled_back": rolled_back,
                    "failures": failures,
                }
            )
        )
        for f in failures:
            sys.stderr.write(f"enqueue_example.py: {f}\n")
        return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
