"""The errors a user can cause.

Every error rdjax raises on purpose derives from `RdjaxError`; the command line
(rdjax.cli.invoke, the one place that does it) prints its message, or an OSError's, as a
single `error: ...` line and exits with status 1. Python callers
see ordinary exceptions: the subclasses also derive from ValueError or OSError, so
existing `except ValueError` code keeps working.
"""

from __future__ import annotations


class RdjaxError(Exception):
    """An error whose message alone tells the user what to change."""


class ConfigError(RdjaxError, ValueError):
    """A config value or command-line flag that cannot run."""


class DataError(RdjaxError, ValueError):
    """A dataset folder or file that does not have the expected layout or content."""


class PortError(RdjaxError, ValueError):
    """A weights file that cannot be read or does not fit the architecture."""


class WorkdirError(RdjaxError, OSError):
    """A workdir (or output path) that is missing, unwritable or not an rdjax workdir."""


class TrainingError(RdjaxError, RuntimeError):
    """Training cannot go on (for example a non-finite loss)."""


def one_line(error: BaseException) -> str:
    """The message as one line: OSError's strerror and filename, else its first line."""
    if isinstance(error, OSError) and not isinstance(error, RdjaxError) and error.strerror:
        text = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training, after the state was saved where that was safe; the message
    says where a rerun resumes (the CLI prints it and exits with status 130). A
    KeyboardInterrupt, so no `except Exception` on the way swallows it."""
