"""The one base class of every error a user can act on.

Each part raises its own subclass where the bad value is first seen (a config field, an input
row, a model file, a run folder), with one sentence naming the field, what was expected and what
came. Entry points map them in one place: the CLI to exit code `exit_code` (2: the caller's
mistake), the HTTP service to a 4xx answer.
"""

from __future__ import annotations

__all__ = ["FordeError"]


class FordeError(Exception):
    """A problem with what the user gave (argument, file, config, input); the message says what to do."""

    exit_code = 2  # the CLI's exit code for it
