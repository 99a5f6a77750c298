"""Errors a user can act on: the CLI prints them as one line and exits non-zero."""

from pathlib import Path


class UserError(Exception):
    """Bad input: a missing model dir, a store made by another config, a corrupt file."""


def local_dir(path, key: str, expected: str, problem: str = "is not a directory") -> Path:
    """`path` (the config key `key`) with ~ expanded, which must be a directory on this machine; otherwise one
    line: "{key} {path} {problem} (expected {expected})"."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserError(f"{key} {p} {problem} (expected {expected})")
    return p
