"""Shared by control-plane services (not the agent, not the CLI): database and service runner."""
