"""Minimal Django settings for the tests: the real PostgreSQL backend (psycopg 3) on the
suite's server. NAME is replaced per test by the ``django_conn`` fixture."""

import os
from urllib.parse import unquote, urlsplit

_url = urlsplit(os.environ.get("NOTIFYD_TEST_DATABASE_URL") or os.environ.get("DATABASE_URL", ""))

SECRET_KEY = "notifyd-tests"
USE_TZ = True
INSTALLED_APPS = ["notifyd.django", "tests_app"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "postgres",
        "USER": unquote(_url.username or ""),
        "PASSWORD": unquote(_url.password or ""),
        "HOST": _url.hostname or "",
        "PORT": str(_url.port or ""),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
