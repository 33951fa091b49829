"""Errors the user can act on: the CLI prints them as one line and exits non-zero, no traceback."""


class UserError(Exception):
    """Bad input, a missing checkpoint, a refused overwrite: something the user can fix."""
