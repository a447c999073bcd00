"""The notifyd package's functions on each connection kind (psycopg 3 connection and cursor,
SQLAlchemy Connection and Session, Django), its typed errors, and event_status after the
real worker ran."""

from __future__ import annotations

import datetime
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

import notifyd
from conftest import count, run_worker

# Each kind: a context manager giving (connection-like object, commit, rollback).
Kind = Callable[..., Any]


@contextmanager
def psycopg_kind(db_url: str, **_: Any) -> Iterator[tuple[Any, Callable[[], None], Callable[[], None]]]:
    with psycopg.connect(db_url) as conn:
        yield conn, conn.commit, conn.rollback


@contextmanager
def psycopg_cursor_kind(db_url: str, **_: Any) -> Iterator[tuple[Any, Callable[[], None], Callable[[], None]]]:
    with psycopg.connect(db_url, row_factory=dict_row) as conn:
        yield conn.cursor(), conn.commit, conn.rollback


@contextmanager
def sqlalchemy_connection_kind(engine: Any, **_: Any) -> Iterator[tuple[Any, Callable[[], None], Callable[[], None]]]:
    with engine.connect() as conn:
        yield conn, conn.commit, conn.rollback


@contextmanager
def sqlalchemy_session_kind(engine: Any, **_: Any) -> Iterator[tuple[Any, Callable[[], None], Callable[[], None]]]:
    from sqlalchemy.orm import sessionmaker

    session = sessionmaker(engine)()  # a sessionmaker's subclass of Session
    try:
        yield session, session.commit, session.rollback
    finally:
        session.close()


@contextmanager
def django_kind(django_conn: Any, **_: Any) -> Iterator[tuple[Any, Callable[[], None], Callable[[], None]]]:
    from django.db import connection

    connection.set_autocommit(False)
    try:
        yield connection, connection.commit, connection.rollback
    finally:
        connection.rollback()
        connection.set_autocommit(True)


KINDS = {
    "psycopg": psycopg_kind,
    "psycopg_cursor": psycopg_cursor_kind,
    "sqlalchemy_connection": sqlalchemy_connection_kind,
    "sqlalchemy_session": sqlalchemy_session_kind,
    "django": django_kind,
}


@pytest.fixture(params=sorted(KINDS))
def kind(request: pytest.FixtureRequest, db_url: str) -> Any:
    name = request.param
    extra: dict[str, Any] = {"db_url": db_url}
    if name.startswith("sqlalchemy"):
        extra["engine"] = request.getfixturevalue("engine")
    if name == "django":
        extra["django_conn"] = request.getfixturevalue("django_conn")
    return lambda: KINDS[name](**extra)


def test_enqueue_commit_repeat_and_rollback(kind: Any, pg: psycopg.Connection) -> None:
    with kind() as (conn, commit, rollback):
        first = notifyd.enqueue(conn, 42, "new_message", "Hi", link="/m/1", idempotency_key="k1")
        again = notifyd.enqueue(conn, "42", "new_message", "Other", idempotency_key="k1")
        plain = notifyd.enqueue(conn, "43", "system_alert", "Maintenance tonight")
        commit()
        later = notifyd.enqueue(conn, "42", "new_message", "Hi", idempotency_key="k1")
        delayed = notifyd.enqueue(
            conn, "42", "system_alert", "Trial ends",
            run_at=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1),
        )
        gone = notifyd.enqueue(conn, "42", "new_message", "rolled back", idempotency_key="k2")
        rollback()
    assert isinstance(first, int) and first == again == later
    assert plain != first and delayed not in (first, plain) and gone not in (first, plain)
    rows = pg.execute("SELECT id, user_id, body, link FROM notify.events ORDER BY id").fetchall()
    assert rows == [(first, "42", "Hi", "/m/1"), (plain, "43", "Maintenance tonight", None)]
    assert count(pg, "SELECT count(*) FROM notify.queue") == 2


@pytest.mark.parametrize(
    ("args", "kwargs", "typed", "constraint"),
    [
        (("42", "no_such_type", "x"), {}, notifyd.UnknownEventType, "events_event_type_known"),
        (("42", "new_message", "\u00a0"), {}, notifyd.InvalidBody, "events_body_length"),
        (("42", "new_message", "é" * 1001), {}, notifyd.InvalidBody, "events_body_length"),
        (("", "new_message", "x"), {}, notifyd.InvalidUserId, "events_user_id_valid"),
        (("42", "new_message", "x"), {"link": "data:text/html,x"}, notifyd.UnsafeLink, "events_link_safe"),
        (("42", "new_message", "x"), {"idempotency_key": ""}, notifyd.InvalidIdempotencyKey,
         "events_idempotency_key_length"),
        (("42", "new_message", None), {}, notifyd.InvalidBody, "body"),
    ],
)
def test_each_refused_value_raises_its_typed_error(
    kind: Any, pg: psycopg.Connection, args: tuple[Any, ...], kwargs: dict[str, Any],
    typed: type[notifyd.NotifydError], constraint: str,
) -> None:
    with kind() as (conn, _commit, rollback):
        with pytest.raises(typed) as caught:
            notifyd.enqueue(conn, *args, **kwargs)
        rollback()
    err = caught.value
    assert isinstance(err, notifyd.InvalidEvent) and isinstance(err, notifyd.NotifydError)
    assert err.constraint == constraint and constraint in str(err)
    assert err.sqlstate in ("23503", "23514", "23502")
    assert err.error is err.__cause__ and err.error is not None
    assert count(pg, "SELECT count(*) FROM notify.events") == 0


def test_a_refused_value_aborts_the_transaction_unless_in_a_savepoint(pg: psycopg.Connection, orders: Any) -> None:
    with pg.transaction():
        pg.execute("UPDATE orders SET status = 'shipped' WHERE id = 7")
        try:
            with pg.transaction():  # a savepoint
                notifyd.enqueue(pg, "42", "new_message", "x", link="javascript:x")
        except notifyd.UnsafeLink:
            pass
        notifyd.enqueue(pg, "42", "new_message", "the good one")
    assert pg.execute("SELECT status FROM orders WHERE id = 7").fetchone() == ("shipped",)
    with pytest.raises(psycopg.errors.InFailedSqlTransaction):
        with pg.transaction():
            with pytest.raises(notifyd.UnknownEventType):
                notifyd.enqueue(pg, "42", "nope", "x")
            pg.execute("SELECT 1")
    assert count(pg, "SELECT count(*) FROM notify.events") == 1


def test_a_critical_type_cannot_be_switched_off(kind: Any, pg: psycopg.Connection) -> None:
    with kind() as (conn, commit, _rollback):
        notifyd.set_preference(conn, "42", "security_alert", True)
        commit()
    for event_type in ("security_alert", "digest"):
        with kind() as (conn, _commit, rollback):
            with pytest.raises(notifyd.TypeAlwaysOn) as refused:
                notifyd.set_preference(conn, "42", event_type, False)
            rollback()
        assert refused.value.constraint == "preferences_type_always_on"
        assert refused.value.sqlstate == "23514"
        assert isinstance(refused.value, notifyd.InvalidEvent)
    assert pg.execute(
        "SELECT enabled FROM notify.preferences WHERE user_id = '42' AND event_type = 'security_alert'"
    ).fetchone() == (True,)


def test_preferences_outcomes_and_read_state_after_the_worker(kind: Any, db_url: str, pg: psycopg.Connection) -> None:
    with kind() as (conn, commit, _rollback):
        notifyd.set_preference(conn, "42", "status_change", False)
        notifyd.set_preference(conn, "42", "system_alert", False)
        notifyd.set_preference(conn, "42", "system_alert", True)
        stored_a = notifyd.enqueue(conn, "42", "new_message", "One <b>new</b> message", link="/m/1")
        stored_b = notifyd.enqueue(conn, "42", "system_alert", "Maintenance")
        opted_out = notifyd.enqueue(conn, "42", "status_change", "Order shipped")
        invalid = notifyd.enqueue(conn, "42", "new_message", "<script>alert(1)</script>")
        other_user = notifyd.enqueue(conn, "43", "new_message", "Hello 43")
        pending = notifyd.event_status(conn, stored_a)
        assert notifyd.event_status(conn, 10**12) is None
        commit()
    assert pending is not None and pending.outcome is None and not pending.processed
    assert pending.user_id == "42" and pending.event_type == "new_message"

    run_worker(db_url, [stored_a, stored_b, opted_out, invalid, other_user])

    with kind() as (conn, commit, _rollback):
        statuses = {i: notifyd.event_status(conn, i) for i in (stored_a, stored_b, opted_out, invalid)}
        read = notifyd.mark_read(conn, "42", [s.notification_id for s in statuses.values() if s and s.notification_id])
        # Another user's ids do not match, whatever they are.
        foreign = pg.execute("SELECT id FROM notify.notifications WHERE user_id = '43'").fetchone()
        assert foreign is not None
        not_mine = notifyd.mark_read(conn, "42", [foreign[0]])
        again = notifyd.mark_all_read(conn, "42")
        all_43 = notifyd.mark_all_read(conn, 43)
        commit()
    outcomes = {i: (s.outcome if s else "missing") for i, s in statuses.items()}
    assert outcomes == {stored_a: "stored", stored_b: "stored", opted_out: "opted_out", invalid: "invalid"}
    a = statuses[stored_a]
    assert a is not None and a.processed and a.notification_id is not None and a.processed_at is not None
    bad = statuses[invalid]
    assert bad is not None and bad.outcome_reason and "markup" in bad.outcome_reason
    assert (read, not_mine, again, all_43) == (2, 0, 0, 1)
    assert count(pg, "SELECT count(*) FROM notify.notifications WHERE read_at IS NULL") == 0
    body = pg.execute("SELECT body FROM notify.notifications WHERE event_id = %s", (stored_a,)).fetchone()
    assert body == ("One new message",)


def test_racing_enqueues_with_one_new_key(db_url: str, pg: psycopg.Connection) -> None:
    """The package's own path (ON CONFLICT on the table, then a lookup): the second waits,
    then returns the first's id."""
    out: dict[str, Any] = {}
    with psycopg.connect(db_url) as first:
        first_id = notifyd.enqueue(first, "42", "new_message", "first", idempotency_key="race")

        def second() -> None:
            with psycopg.connect(db_url) as conn:
                out["pid"] = conn.info.backend_pid
                out["id"] = notifyd.enqueue(conn, "42", "new_message", "second", idempotency_key="race")
                conn.commit()

        t = threading.Thread(target=second)
        t.start()
        from test_view import _wait_until_blocked

        _wait_until_blocked(pg, out)
        first.commit()
    t.join(30)
    assert out.get("id") == first_id
    assert count(pg, "SELECT count(*) FROM notify.events") == 1


def test_an_unsupported_connection_is_named() -> None:
    with pytest.raises(TypeError, match="unsupported connection type builtins.object"):
        notifyd.enqueue(object(), "42", "new_message", "x")


def test_the_package_type_checks_strictly() -> None:
    """mypy --strict over the installed package's source (pyproject.toml's [tool.mypy])."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(root / "pyproject.toml")],
        cwd=root, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
