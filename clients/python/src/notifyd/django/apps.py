from django.apps import AppConfig


class NotifydConfig(AppConfig):
    name = "notifyd.django"
    label = "notifyd"
    verbose_name = "notifyd"
    default_auto_field = "django.db.models.BigAutoField"
