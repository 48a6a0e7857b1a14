"""Resource budgets: parse "50%", "0.5", "2x", "120M", "3.2ms" and check them.

A budget says how much of a resource the pruned model may *keep*: ``--budget-flops 50%`` keeps at
most half of the original FLOPs (AMC's "50% FLOPs"). It is either a fraction of the unpruned model's
value or an absolute amount (a count for FLOPs and params, MAC-equivalents for energy
(:mod:`autoprune.energy`), a time for latency). A candidate is feasible when every budget holds,
measured on the pruned model itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from autoprune.errors import InputError, ParameterError

if TYPE_CHECKING:
    from autoprune.evaluator import Evaluator

RESOURCES = ("flops", "params", "latency", "energy")

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
            raise ParameterError(
                f"budget_{self.resource}", self.text, f"the unpruned model needs only "
                f"{format_amount(self.resource, base)}, so the budget is above 100 %",
                api=f"budgets[{self.resource!r}]", flag=f"--budget-{self.resource}")

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
    """Parse one budget; raise :class:`~autoprune.errors.ParameterError` naming it (``budgets['flops']``
    in Python, ``--budget-flops`` on the command line) when it is not valid.

    Accepted: ``50%`` and ``0.5`` (fraction kept), ``2x`` (reduce by 2x, i.e. keep 50 %), and an
    absolute amount: ``120M`` / ``3.5G`` / ``250000`` for FLOPs and params, MAC-equivalents such as
    ``40M`` for energy, ``3.2ms`` / ``800us`` / ``0.01s`` for latency.
    """
    if resource not in RESOURCES:
        raise ParameterError("budgets", resource, f"unknown resource; choose from {', '.join(RESOURCES)}",
                             flag="--budget-<resource>")
    raw = text
    text = str(text).strip()

    def bad(why: str) -> ParameterError:
        return ParameterError(f"budget_{resource}", raw, why, api=f"budgets[{resource!r}]",
                              flag=f"--budget-{resource}")

    allowed = (
        "write a fraction kept such as 50% or 0.5, a reduction such as 2x, or an amount such as "
        + ("3.2ms" if resource == "latency" else "120M")
    )
    if not text:
        raise bad(f"empty budget; {allowed}")
    m = re.fullmatch(rf"({_NUMBER})\s*(%|x|X|[a-zA-Zµ]*)", text)
    if m is None:
        raise bad(f"not a budget; {allowed}")
    number, unit = float(m.group(1)), m.group(2)
    if not math.isfinite(number):
        raise bad(f"not a finite number; {allowed}")
    if unit == "%":
        fraction = number / 100
    elif unit in ("x", "X"):
        if number < 1:
            raise bad("a reduction factor must be at least 1x")
        fraction = 1 / number
    elif unit == "" and number <= 1:
        fraction = number
    elif unit == "" and number < 1000:
        raise bad(
            f"ambiguous: write {_trim(number)}% for a percentage or add a unit (K, M, G)"
            + (" or a time unit (ms)" if resource == "latency" else "")
        )
    elif resource == "latency":
        if unit not in _TIME_SUFFIX:
            raise bad(f"a latency needs a unit (s, ms or us) or %; {allowed}")
        return _absolute(resource, number * _TIME_SUFFIX[unit], raw, bad)
    else:
        if unit not in _COUNT_SUFFIX:
            raise bad(f"unknown suffix {unit!r}; use K, M or G, or %")
        return _absolute(resource, number * _COUNT_SUFFIX[unit], raw, bad)
    if not 0 < fraction <= 1:
        raise bad("outside (0, 100%]: a budget keeps part of the original model")
    return Budget(resource, fraction=fraction, text=text)


def _absolute(resource: str, value: float, raw: str, bad: Callable[[str], ParameterError]) -> Budget:
    if not value > 0:
        raise bad("must be greater than zero")
    return Budget(resource, absolute=value, text=str(raw).strip())


def parse_budgets(budgets: Mapping[str, str | float | None] | None = None, **texts: str | float | None) -> list[Budget]:
    """``parse_budgets({"flops": "50%"})`` or ``parse_budgets(flops="50%", params=None)`` -> the budgets
    given, in RESOURCES order; an unknown resource is refused naming the known ones."""
    given = {**dict(budgets or {}), **texts}
    for r in given:
        if r not in RESOURCES:
            raise ParameterError("budgets", r, f"unknown resource; choose from {', '.join(RESOURCES)}",
                                 flag="--budget-<resource>")
    return [parse_budget(r, given[r]) for r in RESOURCES if given.get(r) is not None]


def all_hold(budgets: Iterable[Budget], values: Mapping[str, float], base: Mapping[str, float]) -> bool:
    """True when every budget holds for the measured ``values`` against the unpruned ``base``."""
    return all(b.holds(values[b.resource], base[b.resource]) for b in budgets)


def budgets_slug(budgets: Iterable[Budget]) -> str:
    return "_".join(b.slug for b in budgets) or "nobudget"


def bisect(fits: Callable[[Any], bool], lo: float, hi: float, *, tol: float | None = None) -> Any:
    """The least value in ``(lo, hi]`` that ``fits``, where ``fits`` is monotone (false up to some point,
    true after it), ``fits(lo)`` is false and ``fits(hi)`` true: over integers when ``tol`` is None,
    else over reals to within ``tol``. The one bisection every "meet the budget tightly" uses."""
    if tol is None:
        lo, hi = int(lo), int(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid) else (mid, hi)
        return hi
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


class Budgets:
    """The budgets of one search (iterable: its :class:`Budget` items), judged with one evaluator's cost model.

    Agents plan with :meth:`fits` (predicted FLOPs and params, measured latency under a latency budget);
    a recorded candidate is feasible when :meth:`holds` for what was measured on the pruned model.
    :meth:`fit` is the one shift-to-the-budget bisection and :meth:`unreachable` the one refusal of a
    budget that cannot be met.

    Parameters
    ----------
    budgets: what the pruned model may keep (all must hold).
    evaluator: whose cost model and unpruned figures the budgets are read against.
    max_ratio: the largest fraction removed from any group.
    """

    def __init__(self, budgets: Iterable[Budget], evaluator: Evaluator, max_ratio: float = 0.9) -> None:
        self.budgets = list(budgets)
        if not self.budgets:
            raise InputError("give at least one budget: flops, params, latency or energy (--budget-flops 50%, ...)")
        if not 0.0 < max_ratio < 1.0:
            raise ParameterError("max_ratio", max_ratio, "must lie in (0, 1)")
        self.evaluator = evaluator
        self.max_ratio = float(max_ratio)
        if any(b.resource == "energy" for b in self.budgets) and evaluator.granularity != "channel":
            raise ParameterError("granularity", evaluator.granularity, "an energy budget needs channel: masked "
                                 "weights still move, and energy is modelled for removed channels only")
        self.latency = any(b.resource == "latency" for b in self.budgets)
        if self.latency:
            evaluator.latency = True  # the unpruned model's latency is then part of evaluator.base
        for b in self.budgets:
            b.check_reachable(self.base[b.resource])

    @property
    def base(self) -> dict[str, float]:
        return self.evaluator.base

    def __iter__(self):
        return iter(self.budgets)

    def __len__(self) -> int:
        return len(self.budgets)

    def __str__(self) -> str:
        return ", ".join(str(b) for b in self.budgets)

    # -- planning: predicted cost --------------------------------------------------------------
    def cost(self, ratios: Mapping[str, float]) -> dict[str, float]:
        """Predicted FLOPs/params, and measured latency when a latency budget is set."""
        return self.evaluator.cost(ratios, latency=self.latency)

    def fits(self, ratios: Mapping[str, float]) -> bool:
        """True when every budget holds for the predicted cost of ``ratios``. Under a latency budget the
        analytic budgets are checked first, so that no model is pruned and timed when they fail."""
        if self.latency:
            analytic = [b for b in self.budgets if b.resource != "latency"]
            cost = self.evaluator.cost(ratios, latency=False)
            if analytic and not all_hold(analytic, cost, self.base):
                return False
        return all_hold(self.budgets, self.cost(ratios), self.base)

    def fit(self, ratios: Mapping[str, float] | None = None, tol: float = 1e-4) -> dict[str, float]:
        """``ratios`` with every group shifted by one common amount (clipped to [0, max_ratio]) to the
        least pruning that meets the budgets, as tightly as the granularity allows. From no ratios this
        is the tightest uniform ratio. Refuses (:meth:`unreachable`) when even max_ratio everywhere fails."""
        ratios = dict(ratios or {})
        names = self.evaluator.space.names

        def shifted(t: float) -> dict[str, float]:
            return {n: min(self.max_ratio, max(0.0, ratios.get(n, 0.0) + t)) for n in names}

        if self.fits(shifted(-1.0)):
            return shifted(-1.0)
        if not self.fits(shifted(1.0)):
            self.unreachable()
        return shifted(bisect(lambda t: self.fits(shifted(t)), -1.0, 1.0, tol=tol))

    # -- judging: measured figures -------------------------------------------------------------
    def holds(self, resources: Mapping[str, float]) -> bool:
        """Whether every budget holds for figures measured on a pruned model (feasibility)."""
        return all_hold(self.budgets, resources, self.base)

    def violations(self, resources: Mapping[str, float]) -> dict[str, float]:
        """One value per budget, by resource, <= 0 when it holds: the measured value over the limit,
        minus one (Optuna's constraint convention)."""
        base = self.base
        return {b.resource: resources[b.resource] / b.limit(base[b.resource]) - 1.0 for b in self.budgets}

    # -- the refusal ----------------------------------------------------------------------------
    def unreachable(self, how: str | None = None, ratios: Mapping[str, float] | None = None) -> NoReturn:
        """Raise the one "budget cannot be met" :class:`InputError`: what the most pruning allowed (or
        ``ratios``, described by ``how``) still leaves, and what could be changed."""
        ev = self.evaluator
        most = dict(ratios) if ratios is not None else dict.fromkeys(ev.space.names, self.max_ratio)
        if how is None:
            if ev.granularity == "channel":
                how = f"removing {self.max_ratio:.0%} of every prunable group"
            else:
                top = max(ev.policy(most).ratios.values(), default=0.0)
                how = f"{ev.granularity} masks at {top:.0%} sparsity in every prunable group's layers"
        if not ev.space.names:
            raise InputError("budget cannot be met: the model has no prunable group (every group is pinned)")
        cost = self.cost(most)
        base = self.base
        parts = [
            f"{b.resource} {format_amount(b.resource, cost[b.resource])} "
            f"({cost[b.resource] / base[b.resource]:.1%}) > {b}"
            for b in self.budgets if not b.holds(cost[b.resource], base[b.resource])
        ]
        if not parts:  # a timing that failed the budget a moment ago passes it now: noise at the limit
            raise InputError(
                f"budget is at the edge of what this model can reach here: with {how}, measured latency "
                f"passed and failed {self} in turn; loosen the budget or time less noisily"
            )
        reasons = getattr(ev.space, "pinned_reasons", {})
        kept = "; ".join(f"{n}: {why}" for n, why in list(reasons.items())[:2]) + ("; ..." if len(reasons) > 2 else "")
        hint = (f"{len(reasons)} of {len(ev.space.groups)} groups are pinned, kept whole: {kept}; --ignore pins more"
                if reasons else "pinned layers are kept whole; --ignore pins more")
        if any(b.resource == "latency" and not b.holds(cost["latency"], base["latency"]) for b in self.budgets):
            hint += (f"; latency is timed at batch {ev.latency_batch}, where per-layer overhead that "
                     "pruning cannot remove may dominate: a larger --latency-batch times compute-bound passes")
        raise InputError(f"budget cannot be met: {how} still leaves " + "; ".join(parts) + f" ({hint})")
