"""Exceptions raised for bad input.

Every public entry point raises :class:`InputError` (a ``ValueError``) with a
message that says what was wrong and how to fix it. Callers that want to tell
user mistakes apart from bugs catch ``InputError``; the service maps it to a
4xx response and the command line prints it without a traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from a user: the message says what to fix."""


class SessionFileError(InputError):
    """A session file is missing, unreadable or breaks the session layout.

    The message names the file and the field.
    """

    def __init__(self, path, field: str | None, problem: str):
        self.path = str(path)
        self.field = field
        where = f"{self.path}" + (f" [{field}]" if field else "")
        super().__init__(f"{where}: {problem}")


class CheckpointError(InputError):
    """A checkpoint or exported artifact cannot be used (missing, truncated, corrupt, wrong version)."""
