"""Real SQLAlchemy 2 (psycopg 3 driver) with notifyd.sqlalchemy's models: ORM add + commit
(one object and several in one flush), Core insert, a repeated key giving back the
original id, constraint violations as SQLAlchemy's IntegrityError, rollbacks."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from sqlalchemy import BigInteger, Engine, Text, insert, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import notifyd
from conftest import count
from notifyd.sqlalchemy import Event, EventOutcome, Notification, Preference


class AppBase(DeclarativeBase):
    pass


class Order(AppBase):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    user_id: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text)


def shipped(order_id: int) -> Event:
    return Event(
        user_id="42",
        event_type="status_change",
        body=f"Order #{order_id} has shipped",
        link=f"/orders/{order_id}",
        idempotency_key=f"order-{order_id}-shipped",
    )


def test_session_add_and_commit_with_a_repeated_key(engine: Engine, pg: psycopg.Connection) -> None:
    ids = []
    for _attempt in range(2):
        with Session(engine) as session:
            order = session.get(Order, 7)
            assert order is not None
            order.status = "shipped"
            event = shipped(7)
            session.add(event)
            session.commit()  # the FlushError on the second attempt, on the table
            ids.append(event.id)
            first_seen = (event.run_at, event.created_at)
    assert ids[0] == ids[1]
    stored = pg.execute("SELECT run_at, created_at FROM notify.events").fetchone()
    assert stored == first_seen, "eager defaults bring back the original event's times"
    assert count(pg, "SELECT count(*) FROM notify.events") == 1
    assert count(pg, "SELECT count(*) FROM notify.queue") == 1
    assert pg.execute("SELECT status FROM orders WHERE id = 7").fetchone() == ("shipped",)


def test_several_objects_in_one_flush_get_their_own_ids(engine: Engine, pg: psycopg.Connection) -> None:
    """The ORM must not batch them into one INSERT and match ids by sorting (see
    notifyd.sqlalchemy): a repeat's id is older than the new ones."""
    with Session(engine) as session, session.begin():
        old = shipped(8)
        session.add(old)
        session.flush()
        old_id = old.id
    with Session(engine, expire_on_commit=False) as session, session.begin():
        new_a = Event(user_id="1", event_type="new_message", body="a", idempotency_key="a")
        repeat = shipped(8)
        new_b = Event(user_id="2", event_type="new_message", body="b")
        session.add_all([new_a, repeat, new_b])
        session.flush()
        got = {e.id: e for e in (new_a, repeat, new_b)}
    assert repeat.id == old_id
    assert len(got) == 3 and new_a.id > old_id and new_b.id > old_id
    bodies = dict(pg.execute("SELECT id, body FROM notify.events").fetchall())
    assert bodies == {old_id: "Order #8 has shipped", new_a.id: "a", new_b.id: "b"}


def test_core_insert_returns_the_original_id(engine: Engine, pg: psycopg.Connection) -> None:
    stmt = (
        insert(Event)
        .values(user_id="42", event_type="new_message", body="x", idempotency_key="core")
        .returning(Event.id)
    )
    with engine.begin() as conn:
        first = conn.execute(stmt).scalar_one()
    with engine.begin() as conn:
        again = conn.execute(stmt).scalar_one()
        # executemany through the view: every row inserted or found, none lost.
        conn.execute(
            insert(Event),
            [
                {"user_id": "1", "event_type": "new_message", "body": "m1", "idempotency_key": "core"},
                {"user_id": "2", "event_type": "new_message", "body": "m2", "idempotency_key": "m2"},
            ],
        )
    assert first == again
    assert count(pg, "SELECT count(*) FROM notify.events") == 2
    # The table is still the documented plain-SQL path, through Core as well.
    with engine.begin() as conn:
        row = conn.execute(
            text(
                "INSERT INTO notify.events (user_id, event_type, body, idempotency_key)"
                " VALUES ('42', 'new_message', 'x', 'core')"
                " ON CONFLICT (idempotency_key) DO NOTHING RETURNING id"
            )
        ).first()
    assert row is None


@pytest.mark.parametrize(
    ("fields", "constraint"),
    [
        ({"event_type": "no_such_type"}, "events_event_type_known"),
        ({"body": ""}, "events_body_length"),
        ({"user_id": "a\tb"}, "events_user_id_valid"),
        ({"link": "//evil.example"}, "events_link_safe"),
        ({"idempotency_key": "k" * 256}, "events_idempotency_key_length"),
    ],
)
def test_a_refused_value_is_sqlalchemys_integrity_error(
    engine: Engine, pg: psycopg.Connection, fields: dict[str, str], constraint: str
) -> None:
    values: dict[str, Any] = {"user_id": "42", "event_type": "new_message", "body": "ok", **fields}
    with pytest.raises(IntegrityError) as caught:
        with Session(engine) as session, session.begin():
            order = session.get(Order, 7)
            assert order is not None
            order.status = "shipped"
            session.add(Event(**values))
    assert constraint in str(caught.value)
    assert caught.value.orig.diag.constraint_name == constraint  # type: ignore[union-attr]
    mapped = notifyd.error_from(caught.value)
    assert mapped is not None and mapped.constraint == constraint
    assert pg.execute("SELECT status FROM orders WHERE id = 7").fetchone() == ("new",)
    assert count(pg, "SELECT count(*) FROM notify.events") == 0


def test_a_rolled_back_session_leaves_no_event(engine: Engine, pg: psycopg.Connection) -> None:
    with Session(engine) as session:
        order = session.get(Order, 7)
        assert order is not None
        order.status = "shipped"
        session.add(shipped(7))
        session.flush()
        session.rollback()
    assert count(pg, "SELECT count(*) FROM notify.events") == 0
    assert count(pg, "SELECT count(*) FROM notify.queue") == 0
    # A savepoint keeps the business write when the notification is refused.
    with Session(engine) as session, session.begin():
        order = session.get(Order, 7)
        assert order is not None
        order.status = "shipped"
        try:
            with session.begin_nested():
                session.add(Event(user_id="42", event_type="nope", body="x"))
        except IntegrityError:
            pass
    assert pg.execute("SELECT status FROM orders WHERE id = 7").fetchone() == ("shipped",)
    assert count(pg, "SELECT count(*) FROM notify.events") == 0


def test_read_models(engine: Engine, pg: psycopg.Connection) -> None:
    with Session(engine, expire_on_commit=False) as session, session.begin():
        event = shipped(7)
        session.add(event)
        session.add(Preference(user_id="42", event_type="new_message", enabled=False))
    pg.execute(
        "INSERT INTO notify.notifications (user_id, event_id, event_type, body, created_at)"
        " VALUES ('42', %s, 'status_change', 'Order #7 has shipped', now())",
        (event.id,),
    )
    with Session(engine) as session:
        outcome = session.get(EventOutcome, event.id)
        assert outcome is not None and outcome.outcome == "stored"
        note = session.scalars(select(Notification).where(Notification.user_id == "42")).one()
        assert note.id == outcome.notification_id and note.read_at is None
        pref = session.get(Preference, ("42", "new_message"))
        assert pref is not None and pref.enabled is False
