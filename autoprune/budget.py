"""Resource budgets: parse "50%", "0.5", "2x", "120M", "3.2ms" and check them.

A budget says how much of a resource the pruned model may *keep*: ``--budget-flops 50%`` keeps at
most half of the original FLOPs (AMC's "50% FLOPs"). It is either a fraction of the unpruned model's
value or an absolute amount (a count for FLOPs and params, a time for latency). A candidate is
feasible when every budget holds, measured on the pruned model itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from autoprune.errors import InputError

RESOURCES = ("flops", "params", "latency")

_COUNT_SUFFIX = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_TIME_SUFFIX = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"

# Relative slack when comparing a measured value to a limit: float noise, not a real allowance.
_REL_TOL = 1e-9


@dataclass(frozen=True)
class Budget:
    """At most ``fraction`` of the original ``resource``, or at most ``absolute`` units of it.

    Exactly one of ``fraction`` (in (0, 1]) and ``absolute`` (> 0; seconds for latency) is set.
    """

    resource: str
    fraction: float | None = None
    absolute: float | None = None
    text: str = ""

    def limit(self, base: float) -> float:
        """The largest allowed value, given the unpruned model's value ``base``."""
        return self.fraction * base if self.fraction is not None else float(self.absolute)

    def kept_fraction(self, base: float) -> float:
        """The budget as a fraction of ``base`` (what AMC calls the preserve ratio)."""
        return self.fraction if self.fraction is not None else float(self.absolute) / base

    def holds(self, value: float, base: float) -> bool:
        return value <= self.limit(base) * (1 + _REL_TOL)

    def check_reachable(self, base: float) -> None:
        """Refuse an absolute budget that is not below the unpruned model's value."""
        if self.absolute is not None and self.absolute > base * (1 + _REL_TOL):
            raise InputError(
                f"--budget-{self.resource} {self.text}: the unpruned model needs only "
                f"{format_amount(self.resource, base)}, so the budget is above 100 %"
            )

    @property
    def slug(self) -> str:
        """A short name for study names: ``flops50``, ``params1.2M``, ``latency3.2ms``."""
        if self.fraction is not None:
            return f"{self.resource}{_trim(self.fraction * 100)}"
        return f"{self.resource}{format_amount(self.resource, self.absolute).replace(' ', '')}"

    def __str__(self) -> str:
        if self.fraction is not None:
            return f"{self.resource} <= {_trim(self.fraction * 100)}%"
        return f"{self.resource} <= {format_amount(self.resource, self.absolute)}"


def _trim(x: float) -> str:
    return f"{x:.4g}"


def format_amount(resource: str, value: float) -> str:
    """``1.23M`` for counts, ``3.2 ms`` for latency."""
    if resource == "latency":
        if value >= 1:
            return f"{value:.3g} s"
        if value >= 1e-3:
            return f"{value * 1e3:.3g} ms"
        return f"{value * 1e6:.3g} us"
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.4g}{suffix}"
    return f"{value:.4g}"


def parse_budget(resource: str, text: str) -> Budget:
    """Parse one budget; raise :class:`InputError` with one clear line when it is not valid.

    Accepted: ``50%`` and ``0.5`` (fraction kept), ``2x`` (reduce by 2x, i.e. keep 50 %), and an
    absolute amount: ``120M`` / ``3.5G`` / ``250000`` for FLOPs and params, ``3.2ms`` / ``800us`` /
    ``0.01s`` for latency.
    """
    if resource not in RESOURCES:
        raise InputError(f"unknown budget resource {resource!r}; choose from {', '.join(RESOURCES)}")
    flag = f"--budget-{resource}"
    raw = text
    text = str(text).strip()
    allowed = (
        "write a fraction kept such as 50% or 0.5, a reduction such as 2x, or an amount such as "
        + ("3.2ms" if resource == "latency" else "120M")
    )
    if not text:
        raise InputError(f"{flag}: empty budget; {allowed}")
    m = re.fullmatch(rf"({_NUMBER})\s*(%|x|X|[a-zA-Zµ]*)", text)
    if m is None:
        raise InputError(f"{flag} {raw!r} is not a budget; {allowed}")
    number, unit = float(m.group(1)), m.group(2)
    if not math.isfinite(number):
        raise InputError(f"{flag} {raw!r} is not a finite number; {allowed}")
    if unit == "%":
        fraction = number / 100
    elif unit in ("x", "X"):
        if number < 1:
            raise InputError(f"{flag} {raw!r}: a reduction factor must be at least 1x")
        fraction = 1 / number
    elif unit == "" and number <= 1:
        fraction = number
    elif unit == "" and number < 1000:
        raise InputError(
            f"{flag} {raw!r} is ambiguous: write {_trim(number)}% for a percentage or add a unit (K, M, G)"
            + (" or a time unit (ms)" if resource == "latency" else "")
        )
    elif resource == "latency":
        if unit not in _TIME_SUFFIX:
            raise InputError(f"{flag} {raw!r}: a latency needs a unit (s, ms or us) or %; {allowed}")
        return _absolute(resource, number * _TIME_SUFFIX[unit], raw, flag)
    else:
        if unit not in _COUNT_SUFFIX:
            raise InputError(f"{flag} {raw!r}: unknown suffix {unit!r}; use K, M or G, or %")
        return _absolute(resource, number * _COUNT_SUFFIX[unit], raw, flag)
    if not 0 < fraction <= 1:
        raise InputError(f"{flag} {raw!r} is outside (0, 100%]: a budget keeps part of the original model")
    return Budget(resource, fraction=fraction, text=text)


def _absolute(resource: str, value: float, raw: str, flag: str) -> Budget:
    if not value > 0:
        raise InputError(f"{flag} {raw!r} must be greater than zero")
    return Budget(resource, absolute=value, text=str(raw).strip())


def parse_budgets(**texts: str | None) -> list[Budget]:
    """``parse_budgets(flops="50%", params=None)`` -> the budgets given, in RESOURCES order."""
    return [parse_budget(r, texts[r]) for r in RESOURCES if texts.get(r) is not None]


def all_hold(budgets: Iterable[Budget], values: Mapping[str, float], base: Mapping[str, float]) -> bool:
    """True when every budget holds for the measured ``values`` against the unpruned ``base``."""
    return all(b.holds(values[b.resource], base[b.resource]) for b in budgets)


def budgets_slug(budgets: Iterable[Budget]) -> str:
    return "_".join(b.slug for b in budgets) or "nobudget"
