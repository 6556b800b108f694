"""The errors vpit raises for user mistakes, as one family.

`vpit` (the CLI) prints a `VpitError` as one line, without a traceback: it is a problem with
what the user asked for (a bad config value, a missing input, an infeasible mixture, a stale
cache), and its message says what to change. Every other exception is a bug or an accident
of the environment and keeps its traceback. Subclasses also derive from the builtin error
they refine (ValueError, FileNotFoundError), so `except ValueError` in user code still works.
"""

from __future__ import annotations

__all__ = ["ConfigError", "InputError", "Terminated", "VpitError"]


class VpitError(Exception):
    """A user mistake: the message names the field or file and the fix."""


class ConfigError(VpitError, ValueError):
    """A config, spec or command-line value is invalid; the message names its key path."""


class InputError(VpitError, FileNotFoundError):
    """An input file or folder does not exist or is not what the command needs."""


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, like KeyboardInterrupt, so no `except Exception` eats it)."""
