from django.db import models


class Order(models.Model):
    id = models.BigIntegerField(primary_key=True)
    user_id = models.TextField()
    status = models.TextField()

    class Meta:
        managed = False
        db_table = "orders"
