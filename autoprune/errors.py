"""Exceptions that the command line turns into one clear line and an exit code."""

from __future__ import annotations


class AutopruneError(Exception):
    """Base class of the errors autoprune raises on purpose."""


class InputError(AutopruneError, ValueError):
    """Bad user input: an unknown name, a malformed budget or file, a mismatching checkpoint.

    The command line prints the message as one line on stderr and exits with code 2.
    """


class CandidateError(AutopruneError):
    """One candidate could not be evaluated (diverging fine-tune, out of memory, empty layer).

    The search records the trial as failed with this message and goes on with the next candidate.
    """
