"""The business side of the Django tests: an app with an unmanaged ``Order`` model over the
``public.orders`` table the ``orders`` fixture creates."""
