"""Errors a user can act on: the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """Bad input: a missing model dir, a store made by another config, a corrupt file."""
