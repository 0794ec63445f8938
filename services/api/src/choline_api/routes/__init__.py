"""The ``/v1`` routers: thin wrappers around ``choline_api.gateway``."""
