"""Django integration: add ``"notifyd.django"`` to ``INSTALLED_APPS`` for the unmanaged
models in ``notifyd.django.models`` (app label ``notifyd``; Django 5.2 or later). It adds no
migrations: ``notifyd migrate`` owns the schema. The functions of ``notifyd`` take
``django.db.connection`` (or ``connections[alias]``) as their connection."""
