"""Policy: how much of each prunable group to remove, with the metadata to re-apply it.

JSON form (schema ``autoprune.policy/1``)::

    {"schema": "autoprune.policy/1",
     "model": {"name": "resnet20", "dataset": "digits", "in_channels": 1, "num_classes": 10,
               "image_size": 8, "groups": 9},
     "granularity": "channel", "criterion": "l1",
     "ratios": {"layer1.0.conv1": 0.5, ...},
     "metrics": {...}, "search": {...}}

A ratio is the fraction of channels *removed* from a group (0 keeps the group whole). Names are the
module paths of each group's leading layer, as listed by :class:`autoprune.space.Space`.

The granularity says how a ratio is realised (:mod:`autoprune.pruning.masks` for the masked ones):
``"channel"`` removes channels physically; ``"unstructured"`` masks that fraction of the weights,
smallest magnitudes first, in every layer producing the group's channels; ``"N:M"`` (``"2:4"``, any
``0 < N < M``) keeps the N largest of every M consecutive weights along the input dimension of those
layers, so its only ratios are 0 (dense) and ``1 - N/M``.

Which channels a ratio removes is normally decided by the criterion, on the base model's weights. A
policy may instead name them: the optional ``"keep"`` object maps a group to the sorted indices (into
the unpruned group) of the channels it keeps, as agents that learn per-channel importances do
(Pruning from Scratch keeps the channels with the largest gates). The pruner honours ``keep`` where it
is given and the criterion elsewhere; each ``keep`` list must hold as many channels as its ratio keeps.

``"reconstruct": true`` (channel granularity only) says that after the channels are removed, every
conv/linear layer reading pruned channels was refitted by least squares to reproduce the unpruned
model's outputs on the search's seeded training batches (:mod:`autoprune.pruning.regression`); applying
such a policy needs those batches (a task) and gives the same weights for the same seed. Policies
without the key are not refitted.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoprune.errors import InputError, ParameterError

SCHEMA = "autoprune.policy/1"
GRANULARITIES = ("channel", "unstructured", "N:M")  # "N:M" stands for any "n:m" with 0 < n < m, e.g. "2:4"
_NM = re.compile(r"(\d+):(\d+)")


def parse_granularity(granularity: Any) -> str:
    """The canonical spelling of a granularity (``"channel"``, ``"unstructured"`` or ``"n:m"``);
    :class:`InputError` naming the accepted forms otherwise."""
    if isinstance(granularity, str):
        text = granularity.strip()
        if text in ("channel", "unstructured"):
            return text
        match = _NM.fullmatch(text)
        if match:
            n, m = int(match[1]), int(match[2])
            if 0 < n < m:
                return f"{n}:{m}"
            raise ParameterError("granularity", granularity, "N:M keeps N of every M weights and needs "
                                 "0 < N < M (e.g. 2:4)")
    raise ParameterError("granularity", granularity, "choose channel, unstructured or N:M with 0 < N < M (e.g. 2:4)")


def nm_pattern(granularity: str) -> tuple[int, int] | None:
    """(N, M) of an N:M granularity such as ``"2:4"``; None for channel and unstructured."""
    match = _NM.fullmatch(granularity)
    return (int(match[1]), int(match[2])) if match else None


def snap_ratio(granularity: str, ratio: float) -> float:
    """The ratio ``granularity`` can realise nearest to ``ratio``. N:M has two: 0 (dense) and
    ``1 - N/M``; a ratio of at least half of ``1 - N/M`` snaps to it, a smaller one to 0. Channel and
    unstructured ratios are returned unchanged."""
    nm = nm_pattern(granularity)
    if nm is None:
        return float(ratio)
    sparse = 1.0 - nm[0] / nm[1]
    return sparse if ratio >= sparse / 2 else 0.0


@dataclass
class Policy:
    """Per-group removal ratios plus what is needed to re-apply and judge them."""

    ratios: dict[str, float]
    granularity: str = "channel"
    criterion: str = "l1"
    model: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)
    keep: dict[str, list[int]] | None = None  # explicit kept channel indices per group (see module doc)
    reconstruct: bool = False  # consumers of pruned channels refitted by least squares (see module doc)

    def __post_init__(self) -> None:
        self.granularity = parse_granularity(self.granularity)
        self.ratios = {str(k): float(v) for k, v in self.ratios.items()}
        for name, r in self.ratios.items():
            if not (math.isfinite(r) and 0.0 <= r < 1.0):
                raise InputError(f"policy ratio for {name!r} is {r}; a ratio removed must be in [0, 1)")
        nm = nm_pattern(self.granularity)
        if nm is not None:
            sparse = 1.0 - nm[0] / nm[1]
            for name, r in self.ratios.items():
                if not (abs(r) < 1e-9 or abs(r - sparse) < 1e-9):
                    raise InputError(f"policy ratio for {name!r} is {r}; a {self.granularity} policy allows only "
                                     f"0 (dense) or {sparse:g} ({self.granularity})")
            self.ratios = {k: (sparse if r > 0 else 0.0) for k, r in self.ratios.items()}
        if not isinstance(self.reconstruct, bool):
            raise InputError(f"policy 'reconstruct' is {self.reconstruct!r}; it must be true or false")
        if self.reconstruct and self.granularity != "channel":
            raise InputError(f"policy 'reconstruct' refits layers after channels are removed, which a "
                             f"{self.granularity} policy does not do; it applies to granularity channel only")
        if self.keep is not None and self.granularity != "channel":
            raise InputError(f"policy 'keep' names channels, which a {self.granularity} policy does not remove")
        if self.keep is not None:
            self.keep = {str(k): sorted(int(i) for i in v) for k, v in self.keep.items()}
            for name, idxs in self.keep.items():
                if name not in self.ratios:
                    raise InputError(f"policy 'keep' names {name!r}, which has no ratio")
                if not idxs or idxs[0] < 0 or len(set(idxs)) != len(idxs):
                    raise InputError(
                        f"policy 'keep' for {name!r} must be distinct channel indices >= 0, at least one"
                    )

    @classmethod
    def uniform(cls, names: list[str], ratio: float, **kw: Any) -> Policy:
        return cls({n: ratio for n in names}, **kw)

    def key(self) -> tuple:
        """A hashable identity for caches: what is pruned and how, not the metadata."""
        key = (
            self.granularity,
            self.criterion,
            tuple(sorted((k, round(v, 6)) for k, v in self.ratios.items())),
        )
        if self.keep is not None:  # only then, so that keys of criterion-only policies do not change
            key += (tuple(sorted((k, tuple(v)) for k, v in self.keep.items())),)
        if self.reconstruct:  # likewise: keys of policies without the refit do not change
            key += ("reconstruct",)
        return key

    def to_dict(self) -> dict[str, Any]:
        out = {
            "schema": SCHEMA,
            "model": dict(self.model),
            "granularity": self.granularity,
            "criterion": self.criterion,
            "ratios": dict(self.ratios),
            "metrics": dict(self.metrics),
            "search": dict(self.search),
        }
        if self.keep is not None:
            out["keep"] = {k: list(v) for k, v in self.keep.items()}
        if self.reconstruct:
            out["reconstruct"] = True
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json() + "\n")
        tmp.replace(path)  # never leave a half-written policy behind
        return path

    @classmethod
    def from_dict(cls, data: Any, source: str = "policy") -> Policy:
        if not isinstance(data, Mapping):
            raise InputError(f"{source}: a policy must be a JSON object, got {type(data).__name__}")
        schema = data.get("schema")
        if schema != SCHEMA:
            raise InputError(f"{source}: unsupported schema {schema!r}; expected {SCHEMA!r}")
        ratios = data.get("ratios")
        if not isinstance(ratios, Mapping) or not ratios:
            raise InputError(f"{source}: 'ratios' must be a non-empty object of group name -> ratio")
        for name, r in ratios.items():
            if isinstance(r, bool) or not isinstance(r, (int, float)):
                raise InputError(f"{source}: ratio for {name!r} is {r!r}, not a number")
        granularity = data.get("granularity", "channel")  # validated with the ratios, in __post_init__
        for key in ("model", "metrics", "search"):
            if not isinstance(data.get(key, {}), Mapping):
                raise InputError(f"{source}: {key!r} must be a JSON object")
        criterion = data.get("criterion", "l1")
        if not isinstance(criterion, str):
            raise InputError(f"{source}: 'criterion' must be a string")
        keep = data.get("keep")
        if keep is not None:
            if not isinstance(keep, Mapping) or not all(
                isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
                for v in keep.values()
            ):
                raise InputError(f"{source}: 'keep' must be an object of group name -> list of channel indices")
            keep = {k: list(v) for k, v in keep.items()}
        reconstruct = data.get("reconstruct", False)
        if not isinstance(reconstruct, bool):
            raise InputError(f"{source}: 'reconstruct' is {reconstruct!r}; it must be true or false")
        try:
            return cls(
                ratios=dict(ratios),
                granularity=granularity,
                criterion=criterion,
                model=dict(data.get("model", {})),
                metrics=dict(data.get("metrics", {})),
                search=dict(data.get("search", {})),
                keep=keep,
                reconstruct=reconstruct,
            )
        except InputError as e:
            raise InputError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, text: str, source: str = "policy") -> Policy:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{source}: not valid JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_dict(data, source)

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"policy file {str(path)!r} does not exist")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"policy file {str(path)!r} cannot be read: {e}") from None
        return cls.from_json(text, source=str(path))

    def check_names(self, names: list[str], model_desc: str = "the model") -> None:
        """Refuse a policy whose group names are not exactly the model's prunable groups."""
        unknown = sorted(set(self.ratios) - set(names))
        missing = [n for n in names if n not in self.ratios]
        if unknown or missing:
            parts = []
            if unknown:
                parts.append(f"{len(unknown)} unknown group(s) such as {unknown[0]!r}")
            if missing:
                parts.append(f"{len(missing)} missing group(s) such as {missing[0]!r}")
            hint = ""
            if self.model.get("name"):
                hint = f" (the policy was made for {self.model.get('name')!r})"
            raise InputError(f"policy does not fit {model_desc}: {' and '.join(parts)}{hint}")
