"""Errors that stop the daemon at startup with one clear line (no traceback)."""


class StartupError(Exception):
    """Something the daemon needs at startup is not available (a port, the API server config)."""
