"""The Python examples in jobs/README.md run as written (each block is read from the README
at test time, so an edit that breaks one fails here), twice each: the retry gives back
the first run's event id, and one event and one job exist."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import psycopg
import pytest

from conftest import REPO, count

README = REPO / "jobs" / "README.md"
NAMES = ["psycopg", "django", "sqlalchemy-orm", "sqlalchemy-core", "savepoint"]


def examples() -> dict[str, str]:
    text = README.read_text(encoding="utf-8")
    found = dict(re.findall(r"<!-- python-example: ([\w-]+) -->\n```python\n(.*?)\n```", text, re.S))
    return found


def run_twice(name: str, namespace: dict[str, Any]) -> list[Any]:
    code = compile(examples()[name], f"{README}:{name}", "exec")
    ids = []
    for _ in range(2):
        scope = dict(namespace)
        exec(code, scope)  # noqa: S102 - the documented example itself
        ids.append(scope["event_id"])
    return ids


def check(pg: psycopg.Connection, ids: list[Any]) -> None:
    assert isinstance(ids[0], int) and ids[0] == ids[1]
    assert pg.execute("SELECT id, idempotency_key FROM notify.events").fetchall() == [
        (ids[0], "order-7-shipped")
    ]
    assert count(pg, "SELECT count(*) FROM notify.queue") == 1
    assert pg.execute("SELECT status FROM orders WHERE id = 7").fetchone() == ("shipped",)


def test_the_readme_has_every_example() -> None:
    assert sorted(examples()) == sorted(NAMES)


def test_psycopg_example(pg: psycopg.Connection, orders: Any) -> None:
    check(pg, run_twice("psycopg", {"conn": pg, "order_id": 7, "user_id": "42"}))


def test_django_example(django_conn: Any, pg: psycopg.Connection) -> None:
    from tests_app.models import Order

    check(pg, run_twice("django", {"order": Order.objects.get(id=7)}))


def test_sqlalchemy_orm_example(engine: Any, pg: psycopg.Connection) -> None:
    from test_sqlalchemy import Order

    check(pg, run_twice("sqlalchemy-orm", {"engine": engine, "Order": Order, "order_id": 7, "user_id": "42"}))


def test_sqlalchemy_core_example(engine: Any, pg: psycopg.Connection) -> None:
    from test_sqlalchemy import Order

    orders_table = Order.__table__
    check(pg, run_twice("sqlalchemy-core", {"engine": engine, "orders": orders_table, "order_id": 7, "user_id": "42"}))


def test_savepoint_example(pg: psycopg.Connection, orders: Any) -> None:
    import notifyd

    scope: dict[str, Any] = {"conn": pg, "order_id": 7, "user_id": "42", "notifyd": notifyd}
    exec(compile(examples()["savepoint"], f"{README}:savepoint", "exec"), scope)  # noqa: S102
    assert scope["refused"] == "events_link_safe"
    assert pg.execute("SELECT status FROM orders WHERE id = 7").fetchone() == ("shipped",)
    assert count(pg, "SELECT count(*) FROM notify.events") == 0
