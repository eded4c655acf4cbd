"""The one error family of ctcurate.

Every error a user can cause (a bad parameter, a missing or malformed input file, a release
that does not verify) is a :class:`CtcurateError`. The CLI turns it into a one-line message
and a non-zero exit; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class CtcurateError(Exception):
    """Base class of every error a user can cause."""

    exit_code: int = 1


class ParamsError(CtcurateError):
    """A params.yaml section is missing, has an unknown key or a value out of range."""

    exit_code = 2


class InputError(CtcurateError):
    """An input file or folder is missing or unusable as a whole."""

    exit_code = 3


class AccountingError(CtcurateError):
    """A stage's inputs do not balance: seen != used + quarantined + skipped."""

    exit_code = 4


class VerifyError(CtcurateError):
    """A release does not match its manifest."""

    exit_code = 5


class LockedError(CtcurateError):
    """Another process holds the lock on an output."""

    exit_code = 6


class OutputError(CtcurateError):
    """An output path that a stage may not replace, or a full disk while writing it."""

    exit_code = 7


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines too) made one space."""
    return " ".join(str(text).split())
