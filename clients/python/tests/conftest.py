"""Test harness: a fresh database per test on the suite's real Postgres, migrated by the
real ``notifyd migrate``, with real psycopg 3, SQLAlchemy 2 and Django on top.

* The server is ``NOTIFYD_TEST_DATABASE_URL`` (or ``DATABASE_URL``); the role needs CREATEDB.
* The binary is ``NOTIFYD_BIN`` (scripts/test.sh sets it), else ``target/debug/notifyd``.
* One template database per pytest run is migrated with ``notifyd migrate``; each test gets
  a clone of it (``CREATE DATABASE ... TEMPLATE``), dropped afterwards, as is the template.
* ``run_worker`` starts the real ``notifyd worker`` and stops it once the given events have
  an outcome in ``notify.event_outcomes`` (a bounded wait on that condition, not a sleep).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

REPO = Path(__file__).resolve().parents[3]


def server_url() -> str:
    url = os.environ.get("NOTIFYD_TEST_DATABASE_URL") or os.environ.get("DATABASE_URL")
    if not url:
        pytest.exit("set NOTIFYD_TEST_DATABASE_URL or DATABASE_URL (scripts/test.sh does)", 2)
    return url


def url_for(dbname: str) -> str:
    parts = urlsplit(server_url())
    return urlunsplit(parts._replace(path="/" + dbname))


def notifyd_bin() -> str:
    path = os.environ.get("NOTIFYD_BIN") or str(REPO / "target" / "debug" / "notifyd")
    if not os.access(path, os.X_OK):
        pytest.exit(f"notifyd binary not found at {path}: build it (cargo build) or set NOTIFYD_BIN", 2)
    return path


def _admin(sql: str) -> None:
    with psycopg.connect(server_url(), autocommit=True) as c:
        c.execute(sql)


def _create_db(name: str, template: str | None = None) -> None:
    tpl = f" TEMPLATE {template}" if template else ""
    # A clone fails while another session is connected to the template; the template is
    # only connected to while it is migrated, before any clone.
    _admin(f"CREATE DATABASE {name}{tpl}")


def _drop_db(name: str) -> None:
    _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def template_db() -> Iterator[str]:
    name = f"notifyd_pytpl_{os.getpid()}_{secrets.token_hex(4)}"
    _create_db(name)
    try:
        env = dict(os.environ, DATABASE_URL=url_for(name), RUST_LOG="warn")
        done = subprocess.run(
            [notifyd_bin(), "migrate"], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, f"notifyd migrate failed:\n{done.stdout}\n{done.stderr}"
        yield name
    finally:
        _drop_db(name)


@pytest.fixture
def db_name(template_db: str) -> Iterator[str]:
    name = f"notifyd_pytest_{os.getpid()}_{secrets.token_hex(4)}"
    _create_db(name, template_db)
    try:
        yield name
    finally:
        _drop_db(name)


@pytest.fixture
def db_url(db_name: str) -> str:
    return url_for(db_name)


@pytest.fixture
def pg(db_url: str) -> Iterator[psycopg.Connection]:
    """An autocommit psycopg connection: each ``with pg.transaction():`` is one transaction."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        yield conn


def count(conn: psycopg.Connection, sql: str, params: Sequence[object] = ()) -> int:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return int(row[0])


def run_worker(db_url: str, event_ids: Sequence[int], timeout: float = 60.0) -> None:
    """Run ``notifyd worker`` until every event in ``event_ids`` has an outcome."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PORT", "NOTIFYD_LISTEN", "NOTIFYD_METRICS_LISTEN")
    }
    env.update(
        DATABASE_URL=db_url,
        RUST_LOG="warn",
        NOTIFYD_WORKER_NAME=f"pytest-{os.getpid()}",
        NOTIFYD_POLL_INTERVAL_MS="10",
    )
    proc = subprocess.Popen(
        [notifyd_bin(), "worker"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + timeout
    try:
        with psycopg.connect(db_url, autocommit=True) as conn:
            while True:
                left = count(
                    conn,
                    "SELECT count(*) FROM notify.event_outcomes"
                    " WHERE event_id = ANY(%s) AND outcome IS NULL",
                    (list(event_ids),),
                )
                if left == 0:
                    return
                if proc.poll() is not None:
                    out = proc.stdout.read() if proc.stdout else ""
                    raise AssertionError(f"notifyd worker exited ({proc.returncode}):\n{out}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"{left} events still unprocessed after {timeout} s")
                # Wait on the condition, briefly: the worker polls every 10 ms.
                time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout:
            proc.stdout.close()


@pytest.fixture
def orders(pg: psycopg.Connection) -> psycopg.Connection:
    """The business table the examples write in the same transaction as the enqueue."""
    pg.execute(
        "CREATE TABLE public.orders (id bigint PRIMARY KEY, user_id text NOT NULL,"
        " status text NOT NULL DEFAULT 'new')"
    )
    pg.execute("INSERT INTO public.orders (id, user_id) VALUES (7, '42'), (8, '43')")
    return pg


@pytest.fixture
def django_conn(db_name: str, orders: psycopg.Connection) -> Iterator[object]:
    """Django set up once per run (tests/django_settings.py), its default connection pointed
    at this test's database."""
    import django
    from django.conf import settings

    if not settings.configured:
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_settings")
        django.setup()
    from django.db import connections

    conn = connections["default"]
    conn.close()
    conn.settings_dict["NAME"] = db_name
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture
def engine(db_url: str, orders: psycopg.Connection) -> Iterator[object]:
    """A SQLAlchemy 2 engine on this test's database, with psycopg 3 as its driver."""
    from sqlalchemy import create_engine

    eng = create_engine(db_url.replace("postgres://", "postgresql+psycopg://", 1).replace(
        "postgresql://", "postgresql+psycopg://", 1))
    try:
        yield eng
    finally:
        eng.dispose()
