"""Real Django 5.2 (PostgreSQL backend, psycopg 3) with notifyd.django's unmanaged models:
create, save and bulk_create inside transaction.atomic() with a business write, a repeated
idempotency_key giving back the original id, constraint violations as Django's own
IntegrityError, and rollbacks leaving nothing."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

import notifyd
from conftest import count


def event_rows(pg: psycopg.Connection) -> list[tuple[Any, ...]]:
    return pg.execute("SELECT id, user_id, body, idempotency_key FROM notify.events ORDER BY id").fetchall()


def test_the_models_pass_django_checks(django_conn: Any) -> None:
    from django.core import checks

    assert [str(m) for m in checks.run_checks()] == []


def test_create_and_save_with_a_repeated_key_give_the_original_id(
    django_conn: Any, pg: psycopg.Connection
) -> None:
    from django.db import transaction

    from notifyd.django.models import Event
    from tests_app.models import Order

    def ship() -> Event:
        with transaction.atomic():
            order = Order.objects.get(id=7)
            order.status = "shipped"
            order.save()
            return Event.objects.create(
                user_id=order.user_id,
                event_type="status_change",
                body="Order #7 has shipped",
                link="/orders/7",
                idempotency_key="order-7-shipped",
            )

    first = ship()
    retry = ship()  # the crash: TypeError on the second call, on the table
    assert isinstance(first.id, int) and retry.id == first.id
    assert retry.run_at == first.run_at and retry.created_at == first.created_at
    # save() of a new instance is the same INSERT.
    with transaction.atomic():
        third = Event(user_id="42", event_type="status_change", body="again", idempotency_key="order-7-shipped")
        third.save()
    assert third.id == first.id
    third.refresh_from_db()
    assert third.body == "Order #7 has shipped", "the stored event is kept unchanged"
    assert event_rows(pg) == [(first.id, "42", "Order #7 has shipped", "order-7-shipped")]
    assert count(pg, "SELECT count(*) FROM notify.queue") == 1
    assert pg.execute("SELECT status FROM orders WHERE id = 7").fetchone() == ("shipped",)
    # Reading through the model works too.
    assert Event.objects.get(idempotency_key="order-7-shipped").id == first.id


def test_bulk_create_returns_every_id_repeats_included(django_conn: Any, pg: psycopg.Connection) -> None:
    from django.db import transaction

    from notifyd.django.models import Event

    with transaction.atomic():
        old = Event.objects.create(user_id="1", event_type="new_message", body="old", idempotency_key="old")
    with transaction.atomic():
        made = Event.objects.bulk_create(
            [
                Event(user_id="1", event_type="new_message", body="a", idempotency_key="a"),
                Event(user_id="2", event_type="new_message", body="b", idempotency_key="old"),
                Event(user_id="3", event_type="new_message", body="c"),
                Event(user_id="4", event_type="new_message", body="a again", idempotency_key="a"),
            ]
        )
    ids = [e.id for e in made]
    assert ids[1] == old.id and ids[3] == ids[0]
    assert len(set(ids)) == 3 and all(isinstance(i, int) for i in ids)
    assert count(pg, "SELECT count(*) FROM notify.events") == 3
    assert count(pg, "SELECT count(*) FROM notify.queue") == 3
    # ignore_conflicts: ON CONFLICT DO NOTHING on the view; Django sets no ids then.
    with transaction.atomic():
        Event.objects.bulk_create(
            [
                Event(user_id="1", event_type="new_message", body="a", idempotency_key="a"),
                Event(user_id="5", event_type="new_message", body="e", idempotency_key="e"),
            ],
            ignore_conflicts=True,
        )
    assert count(pg, "SELECT count(*) FROM notify.events") == 4
    assert count(pg, "SELECT count(*) FROM notify.events WHERE idempotency_key = 'a'") == 1


@pytest.mark.parametrize(
    ("fields", "constraint", "typed"),
    [
        ({"event_type": "no_such_type"}, "events_event_type_known", notifyd.UnknownEventType),
        ({"body": "   "}, "events_body_length", notifyd.InvalidBody),
        ({"body": "x" * 1001}, "events_body_length", notifyd.InvalidBody),
        ({"user_id": "4 2"}, "events_user_id_valid", notifyd.InvalidUserId),
        ({"link": "javascript:alert(1)"}, "events_link_safe", notifyd.UnsafeLink),
        ({"idempotency_key": ""}, "events_idempotency_key_length", notifyd.InvalidIdempotencyKey),
    ],
)
def test_a_refused_value_is_djangos_integrity_error_naming_the_constraint(
    django_conn: Any, pg: psycopg.Connection, fields: dict[str, str], constraint: str, typed: type
) -> None:
    from django.db import IntegrityError, transaction

    from notifyd.django.models import Event
    from tests_app.models import Order

    values = {"user_id": "42", "event_type": "new_message", "body": "ok", **fields}
    with pytest.raises(IntegrityError) as caught:
        with transaction.atomic():
            Order.objects.filter(id=7).update(status="shipped")
            Event.objects.create(**values)
    assert constraint in str(caught.value)
    assert caught.value.__cause__.diag.constraint_name == constraint  # type: ignore[union-attr]
    mapped = notifyd.error_from(caught.value)
    assert isinstance(mapped, typed) and mapped.constraint == constraint
    # The whole business transaction rolled back with it.
    assert pg.execute("SELECT status FROM orders WHERE id = 7").fetchone() == ("new",)
    assert count(pg, "SELECT count(*) FROM notify.events") == 0


def test_a_savepoint_keeps_the_business_write(django_conn: Any, pg: psycopg.Connection) -> None:
    from django.db import IntegrityError, transaction

    from notifyd.django.models import Event
    from tests_app.models import Order

    with transaction.atomic():
        Order.objects.filter(id=7).update(status="shipped")
        try:
            with transaction.atomic():  # a savepoint
                Event.objects.create(user_id="42", event_type="new_message", body="")
        except IntegrityError:
            pass
    assert pg.execute("SELECT status FROM orders WHERE id = 7").fetchone() == ("shipped",)
    assert count(pg, "SELECT count(*) FROM notify.events") == 0


def test_a_rolled_back_transaction_leaves_no_event(django_conn: Any, pg: psycopg.Connection) -> None:
    from django.db import transaction

    from notifyd.django.models import Event
    from tests_app.models import Order

    class PaymentDeclined(Exception):
        pass

    with pytest.raises(PaymentDeclined):
        with transaction.atomic():
            Order.objects.filter(id=7).update(status="shipped")
            Event.objects.create(user_id="42", event_type="status_change", body="shipped", idempotency_key="rb")
            Event.objects.bulk_create([Event(user_id="42", event_type="new_message", body="x")])
            raise PaymentDeclined()
    assert count(pg, "SELECT count(*) FROM notify.events") == 0
    assert count(pg, "SELECT count(*) FROM notify.queue") == 0
    assert pg.execute("SELECT status FROM orders WHERE id = 7").fetchone() == ("new",)
    # The key is free again: the rolled-back event never existed.
    with transaction.atomic():
        e = Event.objects.create(user_id="42", event_type="status_change", body="shipped", idempotency_key="rb")
    assert count(pg, "SELECT count(*) FROM notify.events WHERE id = %s", (e.id,)) == 1


def test_preferences_and_notifications_models(django_conn: Any, pg: psycopg.Connection) -> None:
    from django.db import connection, transaction

    from notifyd.django.models import Notification, Preference

    with transaction.atomic():
        notifyd.set_preference(connection, "42", "system_alert", False)
    pref = Preference.objects.get(user_id="42", event_type="system_alert")
    assert pref.enabled is False and pref.pk == ("42", "system_alert")
    with transaction.atomic():
        Preference.objects.create(user_id="42", event_type="new_message", enabled=True)
    assert count(pg, "SELECT count(*) FROM notify.preferences WHERE user_id = '42'") == 2
    # Notifications are the worker's; stand one in directly to read and mark it.
    pg.execute(
        "INSERT INTO notify.notifications (user_id, event_id, event_type, body, created_at)"
        " VALUES ('42', 1, 'new_message', 'hi', now()), ('43', 2, 'new_message', 'hi', now())"
    )
    assert Notification.objects.filter(user_id="42", read_at__isnull=True).count() == 1
    from django.utils import timezone

    changed = Notification.objects.filter(user_id="42", read_at__isnull=True).update(read_at=timezone.now())
    assert changed == 1
    assert count(pg, "SELECT count(*) FROM notify.notifications WHERE read_at IS NULL") == 1
