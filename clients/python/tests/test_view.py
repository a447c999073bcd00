"""notify.new_events, the ORM enqueue view, in plain SQL (psycopg 3): every INSERT returns an
id, the original one for a repeated key; notify.events itself behaves as before."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg import errors

from conftest import count

INSERT_VIEW = (
    "INSERT INTO notify.new_events (user_id, event_type, body, link, idempotency_key)"
    " VALUES (%s, %s, %s, %s, %s) RETURNING id, user_id, body, link, run_at, created_at"
)


def jobs(pg: psycopg.Connection) -> int:
    return count(pg, "SELECT count(*) FROM notify.queue")


def test_a_repeated_key_returns_the_original_event(pg: psycopg.Connection) -> None:
    first = pg.execute(INSERT_VIEW, ("42", "new_message", "Hi", "/m/1", "k1")).fetchone()
    again = pg.execute(INSERT_VIEW, ("43", "status_change", "Changed", None, "k1")).fetchone()
    assert first is not None and again is not None
    # The original id and stored values come back; the repeat's values are dropped.
    assert again == first
    assert count(pg, "SELECT count(*) FROM notify.events") == 1
    assert jobs(pg) == 1
    # No key: never deduplicated.
    a = pg.execute(INSERT_VIEW, ("42", "new_message", "x", None, None)).fetchone()
    b = pg.execute(INSERT_VIEW, ("42", "new_message", "x", None, None)).fetchone()
    assert a is not None and b is not None and a[0] != b[0]
    assert jobs(pg) == 3


def test_multi_row_insert_returns_one_row_per_value_in_order(pg: psycopg.Connection) -> None:
    old = pg.execute(INSERT_VIEW, ("42", "new_message", "old", None, "old")).fetchone()
    assert old is not None
    rows = pg.execute(
        "INSERT INTO notify.new_events (user_id, event_type, body, idempotency_key) VALUES"
        " ('1', 'new_message', 'a', 'new-a'), ('2', 'new_message', 'b', 'old'),"
        " ('3', 'new_message', 'c', 'new-a'), ('4', 'new_message', 'd', NULL)"
        " RETURNING id, body"
    ).fetchall()
    assert [r[1] for r in rows] == ["a", "old", "a", "d"]
    assert rows[1][0] == old[0]
    assert rows[2][0] == rows[0][0], "a repeat within one statement finds the first row"
    assert count(pg, "SELECT count(*) FROM notify.events") == 3
    assert jobs(pg) == 3


def test_on_conflict_do_nothing_works_on_the_view_and_the_table(pg: psycopg.Connection) -> None:
    # No target: what Django's bulk_create(ignore_conflicts=True) sends.
    sql = (
        "INSERT INTO notify.new_events (user_id, event_type, body, idempotency_key)"
        " VALUES ('42', 'new_message', 'x', 'k') ON CONFLICT DO NOTHING RETURNING id"
    )
    first = pg.execute(sql).fetchone()
    assert pg.execute(sql).fetchone() == first
    # The documented table form is unchanged: a repeat returns no row.
    table = (
        "INSERT INTO notify.events (user_id, event_type, body, idempotency_key)"
        " VALUES ('42', 'new_message', 'x', 'k') ON CONFLICT (idempotency_key) DO NOTHING RETURNING id"
    )
    assert pg.execute(table).fetchone() is None
    assert pg.execute(table.replace("'k'", "'k2'")).fetchone() is not None
    assert count(pg, "SELECT count(*) FROM notify.events") == 2


def test_defaults_and_refused_id(pg: psycopg.Connection) -> None:
    row = pg.execute(
        "INSERT INTO notify.new_events (user_id, event_type, body, run_at)"
        " VALUES ('42', 'new_message', 'x', NULL) RETURNING run_at, created_at, now()"
    ).fetchone()
    assert row is not None and row[0] == row[1] == row[2], "NULL run_at means now()"
    delayed = pg.execute(
        "INSERT INTO notify.new_events (user_id, event_type, body, run_at)"
        " VALUES ('42', 'new_message', 'x', now() + interval '1 day') RETURNING run_at > now()"
    ).fetchone()
    assert delayed == (True,)
    with pytest.raises(errors.GeneratedAlways):
        pg.execute(
            "INSERT INTO notify.new_events (id, user_id, event_type, body) VALUES (1, '42', 'new_message', 'x')"
        )


@pytest.mark.parametrize(
    ("values", "error", "constraint"),
    [
        (("42", "no_such_type", "x", None, None), errors.ForeignKeyViolation, "events_event_type_known"),
        (("42", "new_message", " ", None, None), errors.CheckViolation, "events_body_length"),
        (("42", "new_message", "x" * 1001, None, None), errors.CheckViolation, "events_body_length"),
        (("4 2", "new_message", "x", None, None), errors.CheckViolation, "events_user_id_valid"),
        (("42", "new_message", "x", "javascript:alert(1)", None), errors.CheckViolation, "events_link_safe"),
        (("42", "new_message", "x", None, ""), errors.CheckViolation, "events_idempotency_key_length"),
        ((None, "new_message", "x", None, None), errors.NotNullViolation, None),
    ],
)
def test_constraint_violations_keep_their_names(
    pg: psycopg.Connection, values: tuple[Any, ...], error: type[Exception], constraint: str | None
) -> None:
    with pytest.raises(error) as caught:
        pg.execute(INSERT_VIEW, values)
    assert isinstance(caught.value, psycopg.Error)
    assert caught.value.diag.constraint_name == constraint
    if constraint:
        assert constraint in str(caught.value)
    else:
        assert caught.value.diag.column_name == "user_id"


def _insert_in_thread(url: str, key: str, out: dict[str, Any]) -> threading.Thread:
    def run() -> None:
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                out["pid"] = conn.info.backend_pid
                with conn.transaction():
                    row = conn.execute(INSERT_VIEW, ("42", "new_message", "second", None, key)).fetchone()
                    out["row"] = row
        except Exception as e:  # reported by the test
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t


def _wait_until_blocked(pg: psycopg.Connection, out: dict[str, Any]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pid = out.get("pid")
        if pid is not None and count(
            pg,
            "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'",
            (pid,),
        ):
            return
        assert "error" not in out, out
        time.sleep(0.02)
    raise AssertionError("the second transaction never waited for the first")


@pytest.mark.parametrize("first_commits", [True, False])
def test_two_transactions_racing_with_one_new_key(
    db_url: str, pg: psycopg.Connection, first_commits: bool
) -> None:
    """The second waits for the first; then it returns the first's id (commit), or inserts
    its own event (rollback). Neither gets an error."""
    out: dict[str, Any] = {}
    with psycopg.connect(db_url) as first:
        row = first.execute(INSERT_VIEW, ("42", "new_message", "first", None, "race")).fetchone()
        assert row is not None
        thread = _insert_in_thread(db_url, "race", out)
        _wait_until_blocked(pg, out)
        if first_commits:
            first.commit()
        else:
            first.rollback()
    thread.join(30)
    assert not thread.is_alive()
    assert "error" not in out, out
    second = out["row"]
    stored = pg.execute("SELECT id, body FROM notify.events WHERE idempotency_key = 'race'").fetchall()
    if first_commits:
        assert second[0] == row[0] and second[2] == "first"
        assert stored == [(row[0], "first")]
    else:
        assert second[0] != row[0] and second[2] == "second"
        assert stored == [(second[0], "second")]
    assert jobs(pg) == 1


def test_a_non_owner_role_enqueues_through_the_view(db_name: str, db_url: str, pg: psycopg.Connection) -> None:
    """The view's trigger runs as the caller: the rights a plain INSERT ... RETURNING into
    notify.events needs, plus INSERT and SELECT on the view, are enough (no right on the
    queue: the enqueue trigger writes notify.queue_* as its owner); INSERT on the view alone
    grants nothing on the table."""
    role = f"{db_name}_backend"
    pg.execute(f"CREATE ROLE {role} NOLOGIN")
    try:
        # What the backend needs for INSERT INTO notify.events ... RETURNING id: no right on
        # the queue (the enqueue trigger writes its row as the owner).
        pg.execute(f"GRANT USAGE ON SCHEMA notify TO {role}")
        pg.execute(f"GRANT INSERT, SELECT ON notify.new_events TO {role}")
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(f"SET ROLE {role}")
            with pytest.raises(errors.InsufficientPrivilege, match="events"):
                conn.execute(INSERT_VIEW, ("42", "new_message", "x", None, "r1"))
            pg.execute(f"GRANT INSERT, SELECT ON notify.events TO {role}")
            first = conn.execute(INSERT_VIEW, ("42", "new_message", "x", None, "r1")).fetchone()
            again = conn.execute(INSERT_VIEW, ("42", "new_message", "y", None, "r1")).fetchone()
            assert first is not None and again == first
            assert conn.execute("SELECT current_user").fetchone() == (role,)
        assert jobs(pg) == 1
    finally:
        pg.execute(f"DROP OWNED BY {role}")
        pg.execute(f"DROP ROLE {role}")
