"""notifyd's client for Python backends: enqueue notifications, switch preferences, mark
notifications read and look up what became of an event, on the caller's own connection and
inside its transaction.

The functions take a psycopg 3 connection or cursor, a SQLAlchemy 2 Connection or Session,
or Django's ``django.db.connection``; the package itself depends on none of them. ORM
models of the tables are in ``notifyd.django`` and ``notifyd.sqlalchemy``.
"""

from ._client import (
    Connection,
    EventStatus,
    enqueue,
    event_status,
    mark_all_read,
    mark_read,
    set_preference,
)
from .errors import (
    InvalidBody,
    InvalidEvent,
    InvalidIdempotencyKey,
    InvalidUserId,
    NotifydError,
    TypeAlwaysOn,
    UnknownEventType,
    UnsafeLink,
    error_from,
)

__version__ = "0.1.0"

__all__ = [
    "Connection",
    "EventStatus",
    "InvalidBody",
    "InvalidEvent",
    "InvalidIdempotencyKey",
    "InvalidUserId",
    "NotifydError",
    "TypeAlwaysOn",
    "UnknownEventType",
    "UnsafeLink",
    "enqueue",
    "error_from",
    "event_status",
    "mark_all_read",
    "mark_read",
    "set_preference",
]
