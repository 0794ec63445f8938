"""Choline's light shared code.

Everything here imports without FastAPI, SQLAlchemy or torch, so the worker-agent on a
rented box and the CLI on a laptop can use it. Modules:

- ``errors``    the one exception tree, mapped to HTTP status and CLI exit codes at the edge
- ``logs``      ``configure_logging()`` (human or JSON) and secret redaction
- ``settings``  pydantic-settings base class (``CHOLINE_`` prefix), ``CHOLINE_HOME`` layout
- ``specs``     GPU spec parser (``4x3090`` → count, model, memory)
- ``events``    the event envelope and typed event models
- ``subjects``  every NATS subject and JetStream stream definition
- ``bus``       NATS/JetStream connection, publish with dedup ids, durable consumers, request/reply
- ``storage``   object storage interface and its S3 implementation (minio client)
- ``faults``    test-only fault barriers
- ``embedded``  launchers for the embedded nats-server and ``weed mini``
"""

__version__ = "0.1.0"
