"""SQLAlchemy 2 declarative models of notifyd's contract tables (import needs SQLAlchemy).

``Event`` is mapped to the view ``notify.new_events``, not to ``notify.events``: an INSERT
into the view returns an id for every row, the original event's id for a repeated
``idempotency_key``, so ``session.add(Event(...))`` and commit work on a retry too (on the
table, the skipped row returns no id and the ORM raises ``FlushError``).

Two mapping choices keep that right and are why these models exist rather than a line in
the docs:

* ``id`` has ``server_default=FetchedValue()``. Without it, SQLAlchemy batches several new
  objects into one ``INSERT ... RETURNING`` and matches the returned ids to the objects by
  sorting them ("insertmanyvalues" with the primary key as implicit sentinel), which
  assumes every id is new and increasing. A repeat returns an older id, so the objects
  would get each other's ids. With it, the ORM inserts one row per statement, in order.
* ``eager_defaults``: the returned row also carries ``run_at`` and ``created_at``, which on
  a repeat are the original event's. The other attributes keep what the caller set;
  ``session.refresh(event)`` reads the stored row.

The models use their own declarative base, ``NotifydBase``; one session can use it
alongside the application's own.
"""

from __future__ import annotations

import datetime
from typing import Optional

from sqlalchemy import BigInteger, Boolean, DateTime, FetchedValue, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["NotifydBase", "Event", "Preference", "Notification", "EventOutcome"]


class NotifydBase(DeclarativeBase):
    """Declarative base of notifyd's tables. Never ``create_all`` it: ``notifyd migrate``
    owns the schema."""


class Event(NotifydBase):
    """An event to notify, written through ``notify.new_events`` (see the module doc)."""

    __tablename__ = "new_events"
    __table_args__ = {"schema": "notify"}
    __mapper_args__ = {"eager_defaults": True}

    id: Mapped[int] = mapped_column(
        BigInteger, primary_key=True, server_default=FetchedValue()
    )
    user_id: Mapped[str] = mapped_column(Text)
    event_type: Mapped[str] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)
    link: Mapped[Optional[str]] = mapped_column(Text, default=None)
    idempotency_key: Mapped[Optional[str]] = mapped_column(Text, default=None)
    run_at: Mapped[datetime.datetime] = mapped_column(
        DateTime(timezone=True), server_default=FetchedValue()
    )
    created_at: Mapped[datetime.datetime] = mapped_column(
        DateTime(timezone=True), server_default=FetchedValue()
    )


class Preference(NotifydBase):
    """One on/off switch per (user, event type); no row means on."""

    __tablename__ = "preferences"
    __table_args__ = {"schema": "notify"}

    user_id: Mapped[str] = mapped_column(Text, primary_key=True)
    event_type: Mapped[str] = mapped_column(Text, primary_key=True)
    enabled: Mapped[bool] = mapped_column(Boolean)
    updated_at: Mapped[datetime.datetime] = mapped_column(
        DateTime(timezone=True), server_default=FetchedValue()
    )


class Notification(NotifydBase):
    """A stored notification. The backend only sets ``read_at``."""

    __tablename__ = "notifications"
    __table_args__ = {"schema": "notify"}

    user_id: Mapped[str] = mapped_column(Text, primary_key=True)
    id: Mapped[int] = mapped_column(
        BigInteger, primary_key=True, server_default=FetchedValue()
    )
    event_id: Mapped[int] = mapped_column(BigInteger)
    event_type: Mapped[str] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)
    link: Mapped[Optional[str]] = mapped_column(Text)
    created_at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True))
    read_at: Mapped[Optional[datetime.datetime]] = mapped_column(
        DateTime(timezone=True)
    )


class EventOutcome(NotifydBase):
    """A row of the view ``notify.event_outcomes`` (read only)."""

    __tablename__ = "event_outcomes"
    __table_args__ = {"schema": "notify"}

    event_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    user_id: Mapped[str] = mapped_column(Text)
    event_type: Mapped[str] = mapped_column(Text)
    idempotency_key: Mapped[Optional[str]] = mapped_column(Text)
    created_at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True))
    run_at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True))
    outcome: Mapped[Optional[str]] = mapped_column(Text)
    outcome_reason: Mapped[Optional[str]] = mapped_column(Text)
    processed_at: Mapped[Optional[datetime.datetime]] = mapped_column(
        DateTime(timezone=True)
    )
    notification_id: Mapped[Optional[int]] = mapped_column(BigInteger)
