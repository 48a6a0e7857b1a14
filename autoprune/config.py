"""The typed configuration of a search, validated once and shared by the Python API and the command line.

:class:`SearchConfig` holds how a search runs (agent, budgets, limits, how a ratio becomes a pruned
model, the evaluator's settings, where trials are stored); :class:`SourceConfig` holds where the
command line's model and data come from. Each field declares its meaning and the values it accepts
next to it (as scikit-learn declares parameter constraints), and construction checks them all, raising
:class:`~autoprune.errors.ParameterError` in the API's words (``finetune_steps=-1: must be >= 0``); the
command line's flags are generated from the same declarations (:func:`add_arguments`) and report the
same error with their own names (``--finetune-steps -1: must be >= 0``). Both configurations are stored
with the study (``to_dict``) and read back whole (``from_dict``) by ``worker``, ``apply``, ``report``
and ``compare``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from autoprune.errors import InputError, ParameterError

# the agent ``autoprune search`` runs without --agent: the one that beat uniform on Fashion-MNIST at its
# default settings (benchmarks/quality.py; the README's "Search quality")
DEFAULT_AGENT = "sensitivity"


def setting(default: Any, help: str, *, metavar: str | None = None, low: float | None = None,
            high: float | None = None, low_open: bool = False, high_open: bool = False,
            choices: tuple | None = None, kind: type | None = None, repeat: bool = False, flag: bool = True) -> Any:
    """A configuration field: its default, its meaning and the values it accepts (``low`` / ``high``
    inclusive unless ``*_open``, or ``choices``). ``repeat`` makes a flag that may be given several times;
    ``flag=False`` keeps the field off the command line."""
    meta = {"help": help, "metavar": metavar, "low": low, "high": high, "low_open": low_open,
            "high_open": high_open, "choices": choices, "kind": kind, "repeat": repeat, "flag": flag}
    if isinstance(default, (dict, list, tuple)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def _allowed(meta: Mapping[str, Any]) -> str:
    if meta["choices"] is not None:
        return "choose from " + ", ".join(map(str, meta["choices"]))
    parts = []
    if meta["low"] is not None:
        parts.append(f"{'>' if meta['low_open'] else '>='} {meta['low']:g}")
    if meta["high"] is not None:
        parts.append(f"{'<' if meta['high_open'] else '<='} {meta['high']:g}")
    kind = {int: "an integer", float: "a number", str: "text", bool: "true or false"}.get(meta["kind"], "a value")
    return f"must be {kind}" + (f" {' and '.join(parts)}" if parts else "")


def _check(name: str, value: Any, meta: Mapping[str, Any]) -> Any:
    """``value`` converted to the field's kind and checked against its rules."""
    kind = meta["kind"]
    if value is None or kind is None:
        return value
    bad = ParameterError(name, value, _allowed(meta))
    if kind is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if isinstance(value, bool):
        raise bad
    try:
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            value = int(value)
        elif kind is float:
            value = float(value)
        elif kind is str:
            if not isinstance(value, str):
                raise TypeError
    except (TypeError, ValueError):
        raise bad from None
    if isinstance(value, float) and not math.isfinite(value):
        raise bad
    if meta["choices"] is not None and value not in meta["choices"]:
        raise bad
    if meta["low"] is not None and (value < meta["low"] or (meta["low_open"] and value == meta["low"])):
        raise bad
    if meta["high"] is not None and (value > meta["high"] or (meta["high_open"] and value == meta["high"])):
        raise bad
    return value


class _Config:
    """What both configurations share: checking the declared rules, and the dict form kept with a study."""

    def _check_fields(self) -> None:
        for f in fields(self):
            if f.metadata.get("kind") is not None:
                object.__setattr__(self, f.name, _check(f.name, getattr(self, f.name), f.metadata))

    def to_dict(self) -> dict[str, Any]:
        import json

        return json.loads(json.dumps({f.name: getattr(self, f.name) for f in fields(self)}, default=list))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """The configuration recorded in ``data`` (a study's or a policy's); other keys are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in cls._legacy(dict(data)).items() if k in known})

    @staticmethod
    def _legacy(data: dict[str, Any]) -> dict[str, Any]:
        return data

    def replace(self, **changes: Any):
        """A copy with ``changes``, checked again."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class SearchConfig(_Config):
    """How a search runs. Every field is a keyword argument of :func:`autoprune.search` and a flag of
    ``autoprune search`` (``finetune_steps`` is ``--finetune-steps``; ``budgets={"flops": "50%"}`` is
    ``--budget-flops 50%``; an agent option ``agent_options={"warmup": 10}`` is ``--amc-warmup 10``)."""

    agent: str = setting(DEFAULT_AGENT, "search agent (see `autoprune agents`)", metavar="NAME", kind=str)
    budgets: dict[str, Any] = setting({}, "what the pruned model may keep, by resource: flops, params, latency, "
                                      "energy",
                                      flag=False)
    trials: int | None = setting(None, "candidates to evaluate (default: the agent's)", metavar="N", low=1, kind=int)
    timeout: float | None = setting(None, "stop proposing candidates after this many seconds", metavar="SECONDS",
                                    low=0, low_open=True, kind=float)
    finetune_steps: int = setting(0, "fine-tune steps per candidate", metavar="N", low=0, kind=int)
    seed: int = setting(0, "seeds the training batches, the random criterion and the agent", metavar="N", kind=int)
    criterion: str = setting("l1", "which channels a ratio removes (see `autoprune criteria`); unstructured and "
                             "N:M take l1, l2 (both |w| per weight) or random", metavar="NAME", kind=str)
    criterion_batches: int = setting(8, "training batches that the data criteria (taylor, apoz, lda, regression, "
                                     "...) and --reconstruct read", metavar="N", low=1, kind=int)
    reconstruct: bool = setting(False, "after pruning, refit every conv/linear layer reading pruned channels by "
                                "least squares to the unpruned model's outputs on training batches (He et al. "
                                "2017); channel granularity", kind=bool)
    granularity: str = setting("channel", "channel (channels removed), unstructured (weight masks) or N:M such as "
                               "2:4 (N of every M weights along the input dimension)", metavar="G", kind=str)
    ignore: tuple[str, ...] = setting((), "module names (glob) whose groups stay whole; repeatable",
                                      metavar="PATTERN", repeat=True)
    max_ratio: float = setting(0.9, "largest fraction removed from a group", metavar="X", low=0, high=1,
                               low_open=True, high_open=True, kind=float)
    distill: float = setting(0.0, "weight of distillation from the unpruned model in every fine-tune", metavar="X",
                             low=0, high=1, high_open=True, kind=float)
    bn_batches: int = setting(20, "training batches of adaptive batch-norm recalibration before every score "
                              "(0: off)", metavar="N", low=0, kind=int)
    finetune_lr: float = setting(0.01, "peak learning rate of the fine-tune (SGD, cosine)", metavar="LR", low=0,
                                 low_open=True, kind=float)
    finetune_l1: float = setting(0.0, "weight λ of a sparsity penalty on conv and linear weights in every fine-tune "
                                 "(the evaluator's, ICE-Pick's); 0: off", metavar="LAMBDA", low=0, kind=float)
    finetune_penalty: str = setting("l1", "the penalty --finetune-l1 weighs: l1 (Σ|w|) or group (group lasso: Σ of "
                                    "the L2 norms of output channels)", choices=("l1", "group"), kind=str)
    latency_batch: int = setting(1, "samples per timed forward pass for latency (1: one input's latency)",
                                 metavar="N", low=1, kind=int)
    energy_costs: str = setting("mac=1,rf=1,pe=2,buffer=6,dram=200", "energy of a MAC and of one access to the "
                                "register file, inter-PE network, global buffer and DRAM (Eyeriss's, relative to a "
                                "MAC; see autoprune.energy); keys not given keep these", metavar="K=V[,K=V...]")
    amp: str = setting("auto", "bf16 autocast on CUDA: auto (where timing shows it pays), on or off",
                       choices=("auto", "on", "off"), kind=str)
    device: str = setting("auto", "auto (CUDA when present), cpu or cuda", metavar="DEVICE", kind=str)
    storage: str | None = setting(None, "Optuna storage URL (command line: sqlite:///autoprune.db; Python: in "
                                  "memory)", metavar="URL", kind=str)
    study: str | None = setting(None, "study name (default <model>-<task>-<agent>-<budget>); the same name resumes",
                                metavar="NAME", kind=str)
    agent_options: dict[str, Any] = setting({}, "the agent's own options", flag=False)

    def __post_init__(self) -> None:
        from autoprune.agents import get_agent
        from autoprune.budget import parse_budgets
        from autoprune.evaluator import resolve_device
        from autoprune.policy import parse_granularity
        from autoprune.pruning import get_criterion
        from autoprune.pruning.masks import check_criterion

        self._check_fields()
        resolve_device(self.device)
        object.__setattr__(self, "ignore", tuple(self.ignore or ()))
        if not all(isinstance(p, str) for p in self.ignore):
            raise ParameterError("ignore", self.ignore, "must be module-name patterns (strings)")
        agent = get_agent(self.agent)
        granularity = parse_granularity(self.granularity)
        object.__setattr__(self, "granularity", granularity)
        if granularity == "channel":
            get_criterion(self.criterion)
        else:
            check_criterion(granularity, self.criterion)
            if self.reconstruct:
                raise ParameterError("granularity", granularity, "removes no channels, so no layer reads pruned "
                                     "channels to refit: use granularity channel, or leave reconstruct off")
            if agent.channel_only:
                raise ParameterError("granularity", granularity,
                                     f"agent {agent.name!r} removes channels itself and supports only channel")
        if not isinstance(self.budgets, Mapping):
            raise ParameterError("budgets", self.budgets, 'must be a mapping such as {"flops": "50%"}')
        parsed = parse_budgets(self.budgets)
        if not parsed:
            raise InputError("give at least one budget: budgets={'flops': '50%'} (--budget-flops 50%), "
                             "params, latency or energy")
        object.__setattr__(self, "budgets", {b.resource: self.budgets[b.resource] for b in parsed})
        from autoprune.energy import EnergyCosts

        object.__setattr__(self, "energy_costs", EnergyCosts.parse(self.energy_costs).text())
        if "energy" in self.budgets and granularity != "channel":
            raise ParameterError("granularity", granularity, "an energy budget needs channel: masked weights still "
                                 "move, and energy is modelled for removed channels only")
        if not isinstance(self.agent_options, Mapping):
            raise ParameterError("agent_options", self.agent_options, "must be a mapping of option names to values")
        # the agent checks its options (and fills in its defaults): the same rules as its flags
        object.__setattr__(self, "agent_options", dict(agent(**self.agent_options).settings()))

    def replace(self, **changes: Any) -> SearchConfig:
        """A copy with ``changes``, checked again. Another ``agent`` starts from its own default options
        unless ``agent_options`` are given too (the filled-in options of one agent are not another's)."""
        if changes.get("agent", self.agent) != self.agent and "agent_options" not in changes:
            changes["agent_options"] = {}
        return dataclasses.replace(self, **changes)

    @staticmethod
    def _legacy(data: dict[str, Any]) -> dict[str, Any]:
        from autoprune.agents import list_agents

        # policies and studies of earlier versions: budgets as display strings beside budget_args
        if not isinstance(data.get("budgets"), Mapping) and isinstance(data.get("budget_args"), Mapping):
            data["budgets"] = dict(data["budget_args"])
        if isinstance(data.get("amp"), bool):
            data["amp"] = "on" if data["amp"] else "off"
        # options an agent had then and no longer has (sensitivity's stale_after) are dropped from a record
        agent = list_agents().get(data.get("agent"))
        if agent is not None and isinstance(data.get("agent_options"), Mapping):
            data["agent_options"] = {k: v for k, v in data["agent_options"].items() if k in agent.options}
        return data

    # -- derived ------------------------------------------------------------------------------
    def budget_list(self):
        """The budgets as :class:`~autoprune.budget.Budget` objects."""
        from autoprune.budget import parse_budgets

        return parse_budgets(self.budgets)

    def agent_class(self):
        from autoprune.agents import get_agent

        return get_agent(self.agent)

    def make_agent(self):
        return self.agent_class()(**self.agent_options)

    def amp_setting(self) -> bool | str:
        return {"auto": "auto", "on": True, "off": False}[self.amp]


@dataclass(frozen=True)
class SourceConfig(_Config):
    """Where the command line's model and data come from (recorded, so that ``worker`` and ``apply``
    rebuild them)."""

    model: str = setting("resnet20", "zoo name (see `autoprune models`), torchvision:NAME or "
                         "path/to/file.py:factory", metavar="NAME", kind=str)
    checkpoint: str | None = setting(None, "state dict of the trained model (loaded with weights_only=True)",
                                     metavar="FILE", kind=str)
    dataset: str = setting("digits", "digits (bundled), cifar10, cifar100, mnist, fashionmnist or imagefolder",
                           metavar="NAME", kind=str)
    data_root: str | None = setting(None, "folder holding the dataset's files", metavar="DIR", kind=str)
    download: bool = setting(False, "download a torchvision dataset into --data-root", kind=bool)
    image_size: int | None = setting(None, "side that imagefolder images are resized to (default 32)", metavar="N",
                                     low=1, kind=int)
    task: str | None = setting(None, "path/to/file.py:factory, a function returning an autoprune.Task (instead of "
                               "--dataset)", metavar="FILE:FUNCTION", kind=str)
    pretrain_steps: int | None = setting(None, "train the model this many steps first (cached; default 500 for a "
                                         "zoo or torchvision model without --checkpoint)", metavar="N", low=0,
                                         kind=int)
    batch_size: int = setting(128, "training batch size of a built-in dataset", metavar="N", low=1, kind=int)

    def __post_init__(self) -> None:
        self._check_fields()

    @classmethod
    def from_info(cls, info: Mapping[str, Any], **overrides: Any) -> SourceConfig:
        """The source a policy's or a study's model information records (``info["source"]``; policies of
        earlier versions name the model ``name`` beside its dataset and checkpoint), with ``overrides``
        (those that are not None) applied."""
        recorded = info.get("source")
        if isinstance(recorded, Mapping):
            data = dict(recorded)
        else:
            data = {"model": info.get("name"), **{k: info.get(k) for k in ("checkpoint", "dataset", "data_root",
                                                                             "pretrain_steps")}}
            if info.get("pretrain_steps"):
                data["checkpoint"] = None  # the cached pretrained weights: trained again when missing
        data.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if v is not None and k in known})


# -- command-line flags from the declarations --------------------------------------------------------


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, config: type[_Config], *, exclude: tuple[str, ...] = (),
                  defaults: Mapping[str, Any] | None = None) -> None:
    """Add a flag for every field of ``config`` (but ``exclude``d ones and those kept off the command
    line). Flags default to None, so that :func:`given` tells what the user set; the help shows the
    field's default (or ``defaults``' override)."""
    defaults = dict(defaults or {})
    for f in fields(config):
        meta = f.metadata
        if not meta.get("flag", True) or f.name in exclude:
            continue
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        shown = f" (default {default})" if default not in (None, (), False) else ""
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": (meta["help"] + shown).replace("%", "%%")}
        if meta["kind"] is bool:
            kw["action"] = "store_true"
        elif meta.get("repeat"):
            kw.update(action="append", metavar=meta["metavar"])
        else:
            kw.update(type=meta["kind"] or str, metavar=meta["metavar"])
            if meta["choices"] is not None:
                kw["choices"] = meta["choices"]
                kw.pop("metavar")
        parser.add_argument(flag_of(f.name), **kw)


def given(args: argparse.Namespace, config: type[_Config]) -> dict[str, Any]:
    """The fields of ``config`` the user set on the command line."""
    names = {f.name for f in fields(config)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None and v is not False}


def add_agent_arguments(parser: argparse.ArgumentParser) -> None:
    """``--<agent>-<option>`` for every agent option, with a readable metavar (``--amc-warmup N``)."""
    from autoprune.agents import list_agents

    for name, cls in list_agents().items():
        if not cls.options:
            continue
        group = parser.add_argument_group(f"{name} agent options")
        for key, opt in cls.options.items():
            shown = f" (default {opt.default})" if opt.default is not None else ""
            kw: dict[str, Any] = {"dest": f"agentopt__{name}__{key}", "default": None,
                                  "help": f"{opt.help}{shown}".replace("%", "%%")}
            if opt.choices is not None:
                kw["choices"] = opt.choices
            else:
                kw["metavar"] = opt.display_metavar()
            group.add_argument(f"--{name}-{key.replace('_', '-')}", **kw)  # checked by the agent, as in Python


def agent_options_given(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The ``--<agent>-<option>`` values given, by agent."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if key.startswith("agentopt__") and value is not None:
            _, agent, opt = key.split("__", 2)
            out.setdefault(agent, {})[opt] = value
    return out


def budgets_given(args: argparse.Namespace) -> dict[str, str]:
    from autoprune.budget import RESOURCES

    return {r: getattr(args, f"budget_{r}") for r in RESOURCES
            if getattr(args, f"budget_{r}", None) is not None}


def for_cli(error: InputError) -> str:
    """An error's one line in the command line's words."""
    if isinstance(error, ParameterError):
        return error.for_cli()
    return str(error).splitlines()[0] if str(error) else type(error).__name__
