"""Energy of a model's convolution and linear layers, after Yang, Chen and Sze, "Designing
Energy-Efficient Convolutional Neural Networks using Energy-Aware Pruning" (CVPR 2017), Sec. 3.

A layer's energy is the sum of its **computation** and its **data movement**::

    E = e_MAC · MACs  +  Σ_level  e_level · a_level

where ``a_level`` counts the reads and writes of weights, input activations and output activations
(partial sums) at each level of the memory hierarchy, and ``e_level`` is the cost of one access there.
The default costs are those the paper takes from Eyeriss (Chen et al., ISCA 2016), relative to one
MAC (``e_MAC = 1``): register file (``rf``) 1, inter-PE (``pe``) 2, global buffer (``buffer``) 6,
DRAM (``dram``) 200. Energy is therefore in **MAC-equivalents** (one MAC's energy is 1), for one input
sample, as FLOPs are (:mod:`autoprune.cost`).

The paper reads the access counts off an optimised mapping of Eyeriss's row-stationary (RS) dataflow.
autoprune uses one fixed, documented mapping instead, so that the counts follow from a layer's shape
alone (and a policy's energy from its ratios alone). For a layer with ``C`` input and ``M`` output
channels in ``G`` groups (``C_g = C/G`` inputs per filter, ``M_g = M/G`` filters per group), a kernel
of ``K`` weights per input channel laid out in ``R`` rows (``R = kh`` for a 2-D convolution, the
product of every kernel dimension but the last in general, 1 for a linear layer), ``Q`` input and
``P`` output positions per channel (tokens for a linear layer), and ``N`` positions at which each
weight runs (``P``; ``Q`` for a transposed convolution)::

    #W   = M · C_g · K             weights
    #I   = C · Q                   input activations
    #O   = M · P                   output activations
    MACs = #W · N                  (the FLOPs of autoprune.cost)

    a_dram   = #W + #I + #O                      every weight, input and output crosses DRAM once
    a_buffer = #W + M_g · #I + #O                each weight passes the buffer once on its way to the
                                                 PE that keeps it (filters stay in the RF: row
                                                 stationary); the input map streams from the buffer
                                                 once per filter that reads it; each output is
                                                 written back once
    a_pe     = (R − 1) · (M_g · #I + #O)         in the array, an input row goes on from the PE it
                                                 reached to the R − 1 others holding the filter's
                                                 other rows (diagonal reuse), and each output's
                                                 partial sum climbs the R PEs of its column
                                                 (R − 1 passes, vertical accumulation)
    a_rf     = 4 · MACs                          every MAC reads its weight and its input and reads
                                                 and writes its partial sum in the RF

A depthwise convolution is ``G = C = M`` (``C_g = M_g = 1``). The model is a simplification of the
paper's mapping, chosen to be stated in one place: it assumes a layer's working set fits the global
buffer (DRAM is crossed once), it ignores the stride when counting an input row's reuse, and it does
not skip zeros (pruned channels are gone; masked weights of the unstructured and N:M granularities
still move, so energy is not modelled for them). What it keeps from the paper is what makes pruning
energy-aware: a MAC's operands cost far more to fetch than to multiply, weights and feature maps that
cross DRAM dominate, and layers with little reuse (1×1 convolutions, linear layers) cost more per MAC
than 3×3 convolutions.

Both figures come from these formulas: :func:`measure_energy` reads the shapes off a forward pass of a
(pruned) model with hooks, and :class:`EnergyModel` predicts them from a policy's ratios through the
search space's cost model (:meth:`autoprune.space.Space.layers`), without pruning; the tests check that
the two agree. Layers inside attention modules, batch norm, activations and pooling are not counted
(their FLOPs are not either, except attention's, whose energy is not modelled).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autoprune.cost import attention_modules, forward_once
from autoprune.errors import ParameterError

if TYPE_CHECKING:
    from autoprune.space import Space

LEVELS = ("rf", "pe", "buffer", "dram")  # the memory levels, nearest the MAC first
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"


@dataclass(frozen=True)
class EnergyCosts:
    """The energy of one MAC and of one access at each memory level, relative to each other.

    Defaults: Eyeriss's normalised costs as Yang et al. (CVPR 2017, Fig. 1) use them: a MAC 1, register
    file 1, inter-PE 2, global buffer 6, DRAM 200.
    """

    mac: float = 1.0
    rf: float = 1.0
    pe: float = 2.0
    buffer: float = 6.0
    dram: float = 200.0

    @classmethod
    def parse(cls, value: str | Mapping[str, Any] | EnergyCosts | None) -> EnergyCosts:
        """``"rf=1,pe=2,buffer=6,dram=200"`` (any of ``mac``, ``rf``, ``pe``, ``buffer``, ``dram``; the
        others keep their defaults), a mapping of the same, or None for the defaults. Raises
        :class:`ParameterError` naming the bad key or value and the allowed ones."""
        if value is None:
            return cls()
        if isinstance(value, EnergyCosts):
            return value
        keys = ", ".join(f.name for f in fields(cls))

        def bad(why: str) -> ParameterError:
            return ParameterError("energy_costs", value, why)

        if isinstance(value, str):
            items = {}
            for part in (p.strip() for p in value.split(",")):
                if not part:
                    continue
                key, sep, number = part.partition("=")
                if not sep:
                    raise bad(f"{part!r} is not key=value; write e.g. rf=1,pe=2,buffer=6,dram=200 with keys {keys}")
                items[key.strip()] = number.strip()
        elif isinstance(value, Mapping):
            items = dict(value)
        else:
            raise bad(f"give costs as text such as rf=1,pe=2,buffer=6,dram=200 or a mapping with keys {keys}")
        if not items:
            raise bad(f"no cost given; write e.g. rf=1,pe=2,buffer=6,dram=200 with keys {keys}")
        costs = {}
        for key, raw in items.items():
            if key not in {f.name for f in fields(cls)}:
                raise bad(f"unknown cost {key!r}; choose from {keys}")
            if isinstance(raw, bool):
                raise bad(f"{key}={raw!r} must be a number >= 0")
            if isinstance(raw, str) and not re.fullmatch(_NUMBER, raw):
                raise bad(f"{key}={raw!r} must be a number >= 0")
            try:
                number = float(raw)
            except (TypeError, ValueError):
                raise bad(f"{key}={raw!r} must be a number >= 0") from None
            if not math.isfinite(number) or number < 0:
                raise bad(f"{key}={raw!r} must be a number >= 0")
            costs[key] = number
        return cls(**costs)

    def text(self) -> str:
        """The canonical spelling, ``mac=1,rf=1,pe=2,buffer=6,dram=200``."""
        return ",".join(f"{f.name}={getattr(self, f.name):g}" for f in fields(self))


DEFAULT_COSTS = EnergyCosts().text()


@dataclass(frozen=True)
class LayerShape:
    """What a layer's access counts depend on (see the module docstring for the names)."""

    in_channels: float  # C
    out_channels: float  # M
    groups: float  # G
    kernel: int  # K: weights per (filter, input channel)
    rows: int  # R: kernel rows
    in_positions: int  # Q
    out_positions: int  # P
    transposed: bool = False  # each weight runs once per input position (N = Q) rather than output position

    @property
    def weights(self) -> float:
        return self.out_channels * (self.in_channels / self.groups if self.groups else 0.0) * self.kernel

    @property
    def inputs(self) -> float:
        return self.in_channels * self.in_positions

    @property
    def outputs(self) -> float:
        return self.out_channels * self.out_positions

    @property
    def macs(self) -> float:
        return self.weights * (self.in_positions if self.transposed else self.out_positions)

    def accesses(self) -> dict[str, float]:
        """Accesses per memory level, by the fixed row-stationary mapping of the module docstring."""
        filters = self.out_channels / self.groups if self.groups else 0.0  # M_g
        streamed = filters * self.inputs  # M_g · #I: the input map, once per filter
        return {
            "rf": 4.0 * self.macs,
            "pe": (self.rows - 1) * (streamed + self.outputs),
            "buffer": self.weights + streamed + self.outputs,
            "dram": self.weights + self.inputs + self.outputs,
        }

    def energy(self, costs: EnergyCosts) -> dict[str, float]:
        """Energy by part: ``mac`` (computation), one entry per memory level, and ``total``."""
        parts = {"mac": costs.mac * self.macs}
        parts.update({level: getattr(costs, level) * n for level, n in self.accesses().items()})
        parts["total"] = sum(parts.values())
        return parts


def _kernel(m: nn.modules.conv._ConvNd) -> tuple[int, int]:
    """(K, R): weights per filter and input channel, and kernel rows (every dimension but the last)."""
    size = tuple(int(k) for k in m.kernel_size)
    return math.prod(size), math.prod(size[:-1])


def shape_of(m: nn.Module, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> LayerShape:
    """The :class:`LayerShape` of one call of a ``Conv*d`` or ``Linear`` module, from the shapes of one
    sample's input and output (batch dimension first)."""
    if isinstance(m, nn.modules.conv._ConvNd):
        k, r = _kernel(m)
        return LayerShape(m.in_channels, m.out_channels, m.groups, k, r, math.prod(input_shape[2:]),
                          math.prod(output_shape[2:]), bool(m.transposed))
    if isinstance(m, nn.Linear):
        return LayerShape(m.in_features, m.out_features, 1, 1, 1, math.prod(input_shape[1:]) // m.in_features,
                          math.prod(output_shape[1:]) // m.out_features)
    raise TypeError(f"{type(m).__name__} is not a convolution or linear layer")


@torch.no_grad()
def measure_energy(model: nn.Module, example_inputs: Any, costs: EnergyCosts | None = None, *,
                   breakdown: bool = False) -> dict[str, Any]:
    """Energy of every ``Conv*d`` and ``Linear`` call for one sample of ``example_inputs``, by layer
    name (a layer called twice counts twice): the total in MAC-equivalents, or with ``breakdown`` each
    layer's parts (``mac``, ``rf``, ``pe``, ``buffer``, ``dram``, ``total``)."""
    costs = costs or EnergyCosts()
    names = {m: n for n, m in model.named_modules()}
    inside = attention_modules(model)
    out: dict[str, Any] = {}

    def hook(m: nn.Module, inp: tuple, output: torch.Tensor) -> None:
        parts = shape_of(m, (1, *inp[0].shape[1:]), (1, *output.shape[1:])).energy(costs)
        before = out.get(names[m])
        out[names[m]] = parts if before is None else {k: v + before[k] for k, v in parts.items()}

    hooks = {m: hook for m in model.modules()
             if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and m not in inside}
    forward_once(model, example_inputs, hooks)
    return out if breakdown else {name: parts["total"] for name, parts in out.items()}


def total(layers: Mapping[str, Any]) -> float:
    """The sum of per-layer energies (totals, or breakdowns' ``total``)."""
    return float(sum(v["total"] if isinstance(v, Mapping) else v for v in layers.values()))


class EnergyModel:
    """Predicts the energy of a policy of ``space`` from its ratios, without pruning: the same
    formulas as :func:`measure_energy`, on the channel counts the space's cost model gives each conv and
    linear layer (:meth:`Space.layers`). A layer that runs more than once (the prediction sees its
    first call) is accounted for by a constant offset, as the space does for FLOPs.
    """

    def __init__(self, space: Space, costs: EnergyCosts | None = None) -> None:
        self.space = space
        self.costs = costs or EnergyCosts()
        self._layers = [(layer, space.modules[layer.name]) for layer in space.layers()]
        self._channels = {g.name: g.channels for g in space.groups}
        self.base_layers = measure_energy(space.model, space.example_inputs, self.costs)
        self.base = total(self.base_layers)
        predicted = total(self._layer_energies(dict(self._channels)))
        self._offset = self.base - predicted if abs(self.base - predicted) > 1e-6 * max(self.base, 1.0) else 0.0

    def _shape(self, layer, module: nn.Module, kept: Mapping[str, float]) -> LayerShape:
        full = shape_of(module, layer.input_shape, layer.output_shape)
        out = layer.out_channels - sum((self._channels[g] - kept[g]) * per for g, per in layer.out_groups)
        inp = layer.in_channels - sum((self._channels[g] - kept[g]) * per for g, per in layer.in_groups)
        if layer.kind == "depthwise":  # one input channel per filter: inputs and groups follow the outputs
            return LayerShape(out, out, out, full.kernel, full.rows, full.in_positions, full.out_positions,
                              full.transposed)
        if layer.kind == "grouped":  # whole convolution groups go, each keeps its width
            groups = full.groups * out / layer.out_channels
            return LayerShape(full.in_channels / full.groups * groups, out, groups, full.kernel, full.rows,
                              full.in_positions, full.out_positions, full.transposed)
        return LayerShape(inp, out, full.groups, full.kernel, full.rows, full.in_positions, full.out_positions,
                          full.transposed)

    def _layer_energies(self, kept: Mapping[str, float], breakdown: bool = False) -> dict[str, Any]:
        out = {}
        for layer, module in self._layers:
            parts = self._shape(layer, module, kept).energy(self.costs)
            out[layer.name] = parts if breakdown else parts["total"]
        return out

    def layers(self, ratios: Mapping[str, float], breakdown: bool = False) -> dict[str, Any]:
        """Predicted energy of every conv and linear layer of the model pruned by ``ratios``."""
        return self._layer_energies(self.space.keep_counts(ratios), breakdown)

    def of_kept(self, kept: Mapping[str, float]) -> float:
        """Predicted energy when each group keeps ``kept[name]`` units (missing groups keep all; zero is
        allowed, for a group's energy share)."""
        return total(self._layer_energies({**self._channels, **kept})) + self._offset

    def predict(self, ratios: Mapping[str, float]) -> float:
        """Predicted energy (MAC-equivalents) of the model pruned by ``ratios``."""
        return total(self.layers(ratios)) + self._offset

    def shares(self, ratios: Mapping[str, float] | None = None) -> dict[str, float]:
        """Energy each prunable group accounts for at ``ratios`` (none: the unpruned model): what the
        model would save if the group lost every unit it keeps (the energy of the layers it feeds and is
        fed by, in proportion to its channels)."""
        kept = self.space.keep_counts(ratios or {})
        now = total(self._layer_energies(kept))
        return {name: now - total(self._layer_energies({**kept, name: 0})) for name in self.space.names}
