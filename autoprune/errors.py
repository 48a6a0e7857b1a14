"""Exceptions that the command line turns into one clear line and an exit code."""

from __future__ import annotations

from typing import Any


class AutopruneError(Exception):
    """Base class of the errors autoprune raises on purpose."""


class InputError(AutopruneError, ValueError):
    """Bad user input: an unknown name, a malformed budget or file, a mismatching checkpoint.

    The command line prints the message as one line on stderr and exits with code 2.
    """


class ParameterError(InputError):
    """A setting with a value it cannot take. The message names the setting and the value in the Python
    API's words (``finetune_steps=-1: must be >= 0``, ``amc option warmup=...``); :meth:`for_cli` says the
    same with the command line's flag (``--finetune-steps -1: must be >= 0``).

    ``name`` is the setting's name (an agent option's own name for ``agent`` options), ``allowed`` says
    what it accepts; ``api`` and ``flag`` override how the setting is named in each place.
    """

    def __init__(self, name: str, value: Any, allowed: str, *, agent: str | None = None,
                 api: str | None = None, flag: str | None = None) -> None:
        self.name, self.value, self.allowed, self.agent = name, value, allowed, agent
        self.api = api or (f"{agent} option {name}" if agent else name)
        self.flag = flag or "--" + (f"{agent}-" if agent else "") + name.replace("_", "-")
        super().__init__(f"{self.api}={value!r}: {allowed}")

    def for_cli(self) -> str:
        value = self.value if isinstance(self.value, (int, float, str)) and not isinstance(self.value, bool) \
            else repr(self.value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # a flag's number as it was typed (`--max-ratio 1`), not as argparse made it (1.0)
        return f"{self.flag} {value}: {self.allowed}"


class CandidateError(AutopruneError):
    """One candidate could not be evaluated (diverging fine-tune, out of memory, empty layer, a task
    function that raised or scored NaN).

    The search records the trial as failed with this message and goes on with the next candidate.
    """
