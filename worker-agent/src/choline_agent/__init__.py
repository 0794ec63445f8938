"""The worker-agent: runs on the box, next to the user's script.

It reports its version (``AGENT_VERSION``) so the control plane gates features on a
minimum version rather than breaking old agents. Runs on Python 3.10+ with choline-core
only (no FastAPI, SQLAlchemy or torch of its own).
"""

AGENT_VERSION = "0.1.0"
