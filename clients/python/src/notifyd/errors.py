"""Typed errors for the values Postgres refuses at INSERT time, one class per constraint.

The constraints of ``notify.events`` and ``notify.preferences`` are the source of truth (see
jobs/README.md, "What each bad input gets"); this module only names them. Each error wraps
the database driver's own exception (``error``, also ``__cause__``), whatever the driver
(psycopg 3 or 2, directly or through SQLAlchemy or Django), and the error does not change
what happened to the transaction: the statement failed, so the surrounding transaction is
aborted, exactly as after any ``IntegrityError``. Roll it back, or run the call in a
savepoint (psycopg ``with conn.transaction():``, SQLAlchemy ``session.begin_nested()``,
Django ``transaction.atomic()``) when the business write must survive a bad notification.
"""

from __future__ import annotations

from typing import Dict, Optional, Type

__all__ = [
    "NotifydError",
    "InvalidEvent",
    "UnknownEventType",
    "InvalidBody",
    "UnsafeLink",
    "InvalidUserId",
    "InvalidIdempotencyKey",
    "TypeAlwaysOn",
    "error_from",
]


class NotifydError(Exception):
    """Base class of every error this package raises for a refused statement."""

    #: What the value must be, in words (set by each subclass).
    rule: str = "the database refused the statement"

    def __init__(
        self,
        message: str,
        *,
        constraint: Optional[str] = None,
        sqlstate: Optional[str] = None,
        error: Optional[BaseException] = None,
    ) -> None:
        super().__init__(message)
        #: The Postgres constraint that refused the row (``events_body_length``, ...), or
        #: the column of a NOT NULL violation.
        self.constraint = constraint
        #: The SQLSTATE (``23514`` check, ``23503`` foreign key, ``23502`` not null).
        self.sqlstate = sqlstate
        #: The driver's exception (``psycopg.errors.CheckViolation``,
        #: ``sqlalchemy.exc.IntegrityError``, ``django.db.IntegrityError``, ...).
        self.error = error


class InvalidEvent(NotifydError):
    """A value refused by a constraint of notifyd's tables. The transaction is aborted."""


class UnknownEventType(InvalidEvent):
    """``event_type`` is not a row of ``notify.event_types``."""

    rule = "event_type must be a name in notify.event_types"


class InvalidBody(InvalidEvent):
    """``body`` is empty, only blank space, or longer than 1000 characters."""

    rule = "body must be 1 to 1000 characters and not only blank space"


class UnsafeLink(InvalidEvent):
    """``link`` is neither a relative path (``/x``) nor a plain http(s) URL."""

    rule = (
        "link must be a relative path starting with one '/' or an http(s) URL with a "
        "plain host, at most 2048 characters, without blanks, quotes or angle brackets"
    )


class InvalidUserId(InvalidEvent):
    """``user_id`` is empty, longer than 128 characters, or holds blanks or control characters."""

    rule = "user_id must be 1 to 128 characters without blanks or control characters"


class InvalidIdempotencyKey(InvalidEvent):
    """``idempotency_key`` is empty or longer than 255 characters."""

    rule = "idempotency_key must be NULL or 1 to 255 characters"


class TypeAlwaysOn(InvalidEvent):
    """A preference tried to switch off a critical event type, or digests."""

    rule = "a critical event type (notify.event_types.critical) and digest cannot be switched off"


_BY_CONSTRAINT: Dict[str, Type[InvalidEvent]] = {
    "events_event_type_known": UnknownEventType,
    "preferences_event_type_known": UnknownEventType,
    "events_body_length": InvalidBody,
    "events_link_safe": UnsafeLink,
    "events_user_id_valid": InvalidUserId,
    "preferences_user_id_valid": InvalidUserId,
    "events_idempotency_key_length": InvalidIdempotencyKey,
    "preferences_type_always_on": TypeAlwaysOn,
}

# NOT NULL violations name the column, not a constraint.
_BY_NULL_COLUMN: Dict[str, Type[InvalidEvent]] = {
    "user_id": InvalidUserId,
    "event_type": UnknownEventType,
    "body": InvalidBody,
}


def _driver_error(exc: BaseException) -> Optional[BaseException]:
    """The DB-API exception behind ``exc``: itself (psycopg), ``.orig`` (SQLAlchemy) or
    ``__cause__`` (Django wraps the driver's error as the cause of its own)."""
    seen = 0
    current: Optional[BaseException] = exc
    while current is not None and seen < 5:
        if getattr(current, "diag", None) is not None:
            return current
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__
        seen += 1
    return None


def error_from(exc: BaseException) -> Optional[NotifydError]:
    """The typed error for a database exception from any supported driver, or None.

    For code that writes the tables through its ORM (``Event.objects.create``,
    ``session.add``) and wants the typed error::

        except IntegrityError as e:
            raise (notifyd.error_from(e) or e) from e
    """
    if isinstance(exc, NotifydError):
        return exc
    err = _driver_error(exc)
    if err is None:
        return None
    diag = getattr(err, "diag", None)
    sqlstate = getattr(err, "sqlstate", None) or getattr(err, "pgcode", None)
    constraint = getattr(diag, "constraint_name", None)
    cls: Optional[Type[InvalidEvent]] = None
    if isinstance(constraint, str):
        cls = _BY_CONSTRAINT.get(constraint)
    if cls is None and sqlstate == "23502":
        column = getattr(diag, "column_name", None)
        if isinstance(column, str):
            cls = _BY_NULL_COLUMN.get(column)
            constraint = column
    if cls is None:
        return None
    primary = getattr(diag, "message_primary", None) or str(err).splitlines()[0]
    message = f"{constraint}: {cls.rule} ({primary})"
    return cls(
        message,
        constraint=constraint,
        sqlstate=sqlstate if isinstance(sqlstate, str) else None,
        error=exc,
    )
