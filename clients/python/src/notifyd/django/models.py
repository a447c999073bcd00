"""Unmanaged Django models of notifyd's contract (Django 5.2 or later).

``Event`` is the view ``notify.new_events``, not the table ``notify.events``: an INSERT into
the view returns an id for every row, the ORIGINAL event's id for a repeated
``idempotency_key``, so ``Event.objects.create()``, ``save()`` and ``bulk_create()`` work on
a retry too (on the table, the skipped row returns no id and Django fails with
"'NoneType' object is not iterable"). ``run_at`` and ``created_at`` have database defaults,
so Django reads them back from the INSERT; on a repeat they are the original event's. The
other attributes keep what the caller set; ``refresh_from_db()`` reads the stored row.

``bulk_create(ignore_conflicts=True)`` works as well, but Django then sets no ids (as on
any table); without ``ignore_conflicts`` it sets every id, repeats included.

A value a constraint refuses raises ``django.db.IntegrityError`` naming the constraint
(``events_body_length``, ...) and aborts the transaction; ``notifyd.error_from(e)`` turns it
into the typed error.

``managed = False`` everywhere: Django never creates, alters or migrates these tables.
"""

from django.db import models
from django.db.models.functions import Now


class Event(models.Model):
    """An event to notify. Create it inside the business write's ``transaction.atomic()``."""

    id = models.BigAutoField(primary_key=True)
    user_id = models.TextField()
    event_type = models.TextField()
    body = models.TextField()
    link = models.TextField(null=True, blank=True)
    idempotency_key = models.TextField(null=True, blank=True)
    run_at = models.DateTimeField(db_default=Now())
    created_at = models.DateTimeField(db_default=Now(), editable=False)

    class Meta:
        managed = False
        db_table = 'notify"."new_events'

    def __str__(self) -> str:
        return f"event {self.id} for {self.user_id}: {self.event_type}"


class Preference(models.Model):
    """One on/off switch per (user, event type); no row means on. Use
    ``notifyd.set_preference(connection, ...)`` to switch one atomically."""

    pk = models.CompositePrimaryKey("user_id", "event_type")
    user_id = models.TextField()
    event_type = models.TextField()
    enabled = models.BooleanField()
    updated_at = models.DateTimeField(db_default=Now())

    class Meta:
        managed = False
        db_table = 'notify"."preferences'


class Notification(models.Model):
    """A stored notification. The backend only sets ``read_at``, and always filters by the
    authenticated user: ``Notification.objects.filter(user_id=user, id__in=ids)``."""

    pk = models.CompositePrimaryKey("user_id", "id")
    user_id = models.TextField()
    id = models.BigIntegerField()
    event_id = models.BigIntegerField(unique=True)
    event_type = models.TextField()
    body = models.TextField()
    link = models.TextField(null=True)
    created_at = models.DateTimeField()
    read_at = models.DateTimeField(null=True)

    class Meta:
        managed = False
        db_table = 'notify"."notifications'
