"""Errors the user can fix: each message names the file, field, node or sample at fault and what to do.

`fednano` prints these as one line and exits with code 2 (`fednano --debug ...` shows the traceback);
any other exception is a bug and keeps its traceback. Each module's error (ConfigError, DataError,
BundleError) derives from UserError and from the builtin it always was.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or set-up, not a bug."""


class ConfigError(UserError, ValueError):
    """A config file or value is malformed; the message names the file and field. (Here rather than in config.py so
    that the registries config.py asks for their checks need not import it.)"""
