"""User-facing errors: the CLI prints them as one line and exits non-zero, never a traceback."""


class CarraraError(Exception):
    """An error the user caused (bad path, bad value, corrupt file); its message says how to fix it."""
