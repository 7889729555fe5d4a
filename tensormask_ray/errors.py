"""Errors meant for the user: the CLI prints their message (which names the thing at fault) and
exits non-zero without a traceback. Everything else is a bug and keeps its traceback."""


class UserError(Exception):
    """Bad input from the user: a file, a record, a key, an address. The message names it."""
