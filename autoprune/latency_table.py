"""Latency lookup tables: per-layer latency measured on the device, summed to estimate a pruned model.

NetAdapt (Yang et al., ECCV 2018, Sec. 3.3 "Fast resource consumption estimation") estimates a
network's latency without running it: each layer's latency is measured once for a grid of
(input channels, output channels) pairs on the target device, and a candidate's latency is the sum of
its layers' entries. Here every conv and linear layer of the model's :class:`~autoprune.space.Space`
is measured standalone (a fresh layer of the same kind, kernel, stride, padding and dilation, with
the given channel counts, timed by :func:`autoprune.cost.measure_latency` on an input of the spatial
shape it sees inside the model; the least of ``rounds`` medians taken in sweeps over the whole grid,
since a busy machine only ever adds time), on a grid of channel counts ``step`` apart, and read back by
bilinear interpolation between measured points. What the layers do not account for (normalisation,
activations, additions, pooling, Python overhead) is the *rest*: a fixed part (per-call overhead) plus
a part proportional to the activations the conv/linear layers produce (element-wise work), fitted on
two whole-model timings, the unpruned model and the model with half of every prunable group removed
(each minus the sum of its layers' entries). At batch 1 on a CPU the fixed part dominates; at a large
``batch`` the proportional one does.

A table is cached on disk (JSON) keyed by model, device, input shape and table settings, so a
second search on the same model and device measures nothing. :func:`estimate_error` compares the
table against the measured latency of whole pruned models.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoprune.cost import measure_latency
from autoprune.inputs import signature
from autoprune.policy import Policy
from autoprune.pruning import ChannelPruner
from autoprune.space import Layer, Space

SCHEMA = "autoprune.latency-table/2"


def default_directory() -> Path:
    """``<autoprune cache>/latency`` (see :func:`autoprune.pretrain.cache_dir`)."""
    from autoprune.pretrain import cache_dir

    return cache_dir() / "latency"


def device_description(device: torch.device) -> str:
    """What the table's timings depend on: the processor (or GPU) and, on the CPU, the thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu:{cpu}:{torch.get_num_threads()}threads"


def channel_points(full: int, step: int, unit: int = 1) -> list[int]:
    """Measured channel counts of one dimension, ascending: ``full``, ``full - step*unit``, ... and 1."""
    stride = max(1, step * unit)
    points = set(range(full, 0, -stride)) | {1, full}
    return sorted(points)


def _module_of(space: Space, layer: Layer) -> nn.Module:
    return space.modules[layer.name]


def _signature(space: Space, layer: Layer) -> str:
    """Everything a standalone layer's latency depends on, apart from its channel counts."""
    m = _module_of(space, layer)
    spatial = tuple(layer.input_shape[2:]) if layer.kind != "linear" else tuple(layer.input_shape[1:-1])
    if isinstance(m, nn.modules.conv._ConvNd):
        conv = (type(m).__name__, tuple(m.kernel_size), tuple(m.stride), m.padding if isinstance(m.padding, str)
                else tuple(m.padding), tuple(m.dilation), m.groups > 1, m.bias is not None, m.padding_mode)
        return json.dumps([layer.kind, spatial, conv, layer.in_channels, layer.out_channels])
    return json.dumps([layer.kind, spatial, m.bias is not None, layer.in_channels, layer.out_channels])


def standalone(space: Space, layer: Layer, in_channels: int, out_channels: int) -> tuple[nn.Module, torch.Tensor]:
    """A fresh copy of ``layer`` with the given channel counts, and an input of the shape it sees."""
    m = _module_of(space, layer)
    device = next(m.parameters()).device
    if isinstance(m, nn.Linear):
        module = nn.Linear(in_channels, out_channels, bias=m.bias is not None)
        shape = (1, *layer.input_shape[1:-1], in_channels)
    else:
        if layer.kind == "depthwise":
            in_channels = out_channels
            groups = out_channels
        elif layer.kind == "grouped":  # whole groups go: each keeps its widths, their number follows the outputs
            groups = max(1, out_channels // (m.out_channels // m.groups))
            in_channels = groups * (m.in_channels // m.groups)
        else:  # grouped convs keep as many groups as both channel counts allow
            groups = math.gcd(m.groups, math.gcd(in_channels, out_channels))
        module = type(m)(in_channels, out_channels, m.kernel_size, m.stride, m.padding, m.dilation, groups,
                         m.bias is not None, m.padding_mode)
        shape = (1, in_channels, *layer.input_shape[2:])
    return module.to(device).eval(), torch.zeros(shape, device=device)


@dataclass
class _Entry:
    """One layer signature's measured grid: ``seconds[i][j]`` at ``in_points[i]``, ``out_points[j]``."""

    in_points: list[int]
    out_points: list[int]
    seconds: list[list[float]]

    def at(self, in_channels: float, out_channels: float) -> float:
        """Bilinear interpolation between the measured points (clamped to the measured range)."""
        i0, i1, ti = _bracket(self.in_points, in_channels)
        j0, j1, tj = _bracket(self.out_points, out_channels)
        s = self.seconds
        low = s[i0][j0] * (1 - tj) + s[i0][j1] * tj
        high = s[i1][j0] * (1 - tj) + s[i1][j1] * tj
        return low * (1 - ti) + high * ti


def _bracket(points: list[int], x: float) -> tuple[int, int, float]:
    if len(points) == 1 or x <= points[0]:
        return 0, 0, 0.0
    if x >= points[-1]:
        return len(points) - 1, len(points) - 1, 0.0
    hi = bisect.bisect_left(points, x)
    lo = hi - 1
    return lo, hi, (x - points[lo]) / (points[hi] - points[lo])


class LatencyTable:
    """Per-layer latency lookup table of one model on one device for one input shape.

    Build it with :meth:`build` (measures, or loads the cached table). ``estimate(ratios)`` is the
    table's latency in seconds for a policy's ratios: the sum over conv/linear layers of their
    interpolated latency at the channel counts the ratios leave, plus ``rest + rest_per_element`` times
    the activation elements the layers produce (the measured latency
    of everything else, a constant). ``measurements`` counts the layer timings this build made
    (0 when the table came from the cache); ``path`` is where it is cached.
    """

    def __init__(self, space: Space, key: dict[str, Any], entries: dict[str, _Entry], rest: float,
                 full: float, measurements: int = 0, path: Path | None = None, seconds: float = 0.0,
                 rest_per_element: float = 0.0) -> None:
        self.space = space
        self.key = key
        self.entries = entries
        self.rest = rest  # fixed part of what the layers do not account for, seconds
        self.rest_per_element = rest_per_element  # seconds per activation element the layers produce
        self.full = full  # measured latency of the unpruned model when the table was built
        self.measurements = measurements
        self.path = path
        self.seconds = seconds  # time spent measuring in this build
        self.layers = space.layers()
        self.signatures = {layer.name: _signature(space, layer) for layer in self.layers}

    # -- building -----------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        space: Space,
        *,
        model: str = "model",
        step: int = 8,
        repeats: int = 5,
        warmup: int = 2,
        rounds: int = 3,
        batch: int = 1,
        directory: str | os.PathLike | None = None,
        cache: bool = True,
    ) -> LatencyTable:
        """Measure the table for ``space.model`` on its device, or load it from the cache.

        Parameters
        ----------
        space: the model's search space (its layers, groups and example input).
        model: the model's name, part of the cache key (with the layers' shapes, so two
            architectures under one name do not collide).
        step: channel step of the measured grid; latencies between grid points are interpolated.
        repeats, warmup: timed and untimed passes per measured point (the median is kept).
        rounds: medians taken per point; the least is kept (a busy machine only ever adds time).
        batch: samples per timed pass (the evaluator's ``latency_batch``), part of the cache key.
        directory: where tables are cached (default :func:`default_directory`).
        cache: read and write the cache (False measures every time and writes nothing).
        """
        device = next(space.model.parameters()).device
        layers = space.layers()
        signatures = {layer.name: _signature(space, layer) for layer in layers}
        key = {
            "model": model,
            "device": device_description(device),
            "input_shape": signature(space.example_inputs),
            "step": int(step),
            "repeats": int(repeats),
            "batch": int(batch),
            "layers": sorted(set(signatures.values())),
            "torch": torch.__version__.split("+")[0],
        }
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model)
        path = Path(directory) if directory is not None else default_directory()
        path = path / f"{safe}-{digest}.json"
        if cache and path.is_file():
            try:
                return cls._load(space, key, path)
            except (OSError, ValueError, KeyError, TypeError):
                pass  # a damaged cache file is measured again and overwritten
        t0 = time.perf_counter()
        grids: dict[str, tuple[list[int], list[int]]] = {}
        for layer in layers:
            # identical layers (same kind, shape and channels) share one grid: the points all of them need
            # (one may have a pinned input where another's input is pruned)
            sig = signatures[layer.name]
            ins = cls._points(space, layer.in_channels, layer.in_groups, step)
            outs = cls._points(space, layer.out_channels, layer.out_groups, step)
            if layer.kind in ("depthwise", "grouped"):
                ins = [layer.in_channels]  # its inputs follow its outputs
            if sig in grids:
                ins = sorted(set(ins) | set(grids[sig][0]))
                outs = sorted(set(outs) | set(grids[sig][1]))
            grids[sig] = (ins, outs)
        by_sig = {signatures[layer.name]: layer for layer in reversed(layers)}
        points = [(sig, i, j, *standalone(space, by_sig[sig], c_in, c_out))
                  for sig, (ins, outs) in grids.items()
                  for i, c_in in enumerate(ins) for j, c_out in enumerate(outs)]
        best = [math.inf] * len(points)
        full = math.inf
        # rounds sweep the whole grid (and the whole model) in turn, so each point's samples are spread
        # over the build and a burst of load elsewhere on the machine spoils one of them, not all
        for _ in range(max(1, rounds)):
            full = min(full, measure_latency(space.model, space.example_inputs, warmup=max(warmup, 3),
                                             repeats=max(repeats, 10), batch_size=batch))
            for k, (_sig, _i, _j, module, x) in enumerate(points):
                best[k] = min(best[k], measure_latency(module, x, warmup=warmup, repeats=repeats, batch_size=batch))
        entries = {sig: _Entry(ins, outs, [[0.0] * len(outs) for _ in ins]) for sig, (ins, outs) in grids.items()}
        for (sig, i, j, _m, _x), seconds in zip(points, best):
            entries[sig].seconds[i][j] = seconds
        count = len(points)
        table = cls(space, key, entries, 0.0, full, count, path, time.perf_counter() - t0)
        # the rest, fitted on the unpruned model and the model with half of every group removed
        half_ratios = dict.fromkeys(space.names, 0.5)
        if not space.names:
            half_ratios = {}
        half_model = ChannelPruner(space).prune(Policy(dict(half_ratios)))
        half = math.inf
        for _ in range(max(1, rounds)):
            half = min(half, measure_latency(half_model, space.example_inputs, warmup=max(warmup, 3),
                                             repeats=max(repeats, 10), batch_size=batch))
        full_sum, full_volume = table._layers_sum(table._full_counts())
        half_sum, half_volume = table._layers_sum(space.keep_counts(half_ratios))
        rest_full, rest_half = full - full_sum, half - half_sum
        if full_volume > half_volume and rest_full > rest_half:
            table.rest_per_element = (rest_full - rest_half) / (full_volume - half_volume)
        table.rest = rest_full - table.rest_per_element * full_volume
        if cache:
            table.save(path)
        return table

    @staticmethod
    def _points(space: Space, full: int, groups: tuple[tuple[str, float], ...], step: int) -> list[int]:
        prunable = [m for g, m in groups if not space.by_name[g].pinned]
        if not prunable:
            return [full]
        return channel_points(full, step, max(1, int(round(min(prunable)))))

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "schema": SCHEMA,
            "key": self.key,
            "rest": self.rest,
            "rest_per_element": self.rest_per_element,
            "full": self.full,
            "entries": {sig: {"in": e.in_points, "out": e.out_points, "seconds": e.seconds}
                        for sig, e in self.entries.items()},
        }
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
        return path

    @classmethod
    def _load(cls, space: Space, key: dict[str, Any], path: Path) -> LatencyTable:
        data = json.loads(path.read_text())
        if data.get("schema") != SCHEMA or data.get("key") != json.loads(json.dumps(key)):
            raise ValueError("stale latency table")
        entries = {sig: _Entry(e["in"], e["out"], e["seconds"]) for sig, e in data["entries"].items()}
        table = cls(space, key, entries, float(data["rest"]), float(data["full"]), 0, path,
                    rest_per_element=float(data["rest_per_element"]))
        missing = set(table.signatures.values()) - set(entries)
        if missing:
            raise ValueError("latency table lacks layers")
        return table

    # -- reading ------------------------------------------------------------------------------
    def layer_latency(self, name: str, in_channels: float, out_channels: float) -> float:
        """Interpolated latency in seconds of layer ``name`` with the given channel counts."""
        return self.entries[self.signatures[name]].at(in_channels, out_channels)

    def _full_counts(self) -> dict[str, int]:
        return {g.name: g.channels for g in self.space.groups}

    def _layers_sum(self, kept: Mapping[str, int]) -> tuple[float, float]:
        """The layers' summed latency at the channel counts ``kept`` leaves, and the activation
        elements they produce per sample."""
        total = volume = 0.0
        for layer in self.layers:
            c_in = layer.in_channels - sum((self.space.by_name[g].channels - kept[g]) * m for g, m in layer.in_groups)
            c_out = layer.out_channels - sum((self.space.by_name[g].channels - kept[g]) * m
                                             for g, m in layer.out_groups)
            total += self.layer_latency(layer.name, c_in, c_out)
            volume += c_out * math.prod(layer.output_shape[1:]) / layer.out_channels
        return total, volume

    def estimate(self, ratios: Mapping[str, float]) -> float:
        """The table's latency in seconds of the model pruned by ``ratios`` (fractions removed)."""
        seconds, volume = self._layers_sum(self.space.keep_counts(ratios))
        return seconds + self.rest + self.rest_per_element * volume

    @property
    def batch(self) -> int:
        """Samples per timed pass the table was measured at."""
        return int(self.key.get("batch", 1))

    @property
    def base(self) -> float:
        """The table's latency of the unpruned model (equal to the measured one by construction)."""
        return self.estimate({})


def estimate_error(table: LatencyTable, candidates: Iterable[Mapping[str, float]], *, pruner: Any = None,
                   repeats: int = 20, rounds: int = 3) -> dict[str, Any]:
    """How far the table's estimates are from the measured latency of whole pruned models.

    Every candidate (a ratios mapping over the space's prunable groups) is pruned by ``pruner``
    (default: a :class:`~autoprune.pruning.ChannelPruner` of the table's space; pass the evaluator's
    to reuse its criterion scores) and timed the way the table's points are: the least of ``rounds``
    medians of ``repeats`` passes, the rounds interleaved across candidates, on the space's example
    input. Returns ``rows`` (estimate, measured, relative error per
    candidate), ``mean_abs_rel_error``, ``max_abs_rel_error`` and ``rank_agreement``: the fraction of
    candidate pairs whose order by estimate matches their order by measurement.
    """
    pruner = pruner if pruner is not None else ChannelPruner(table.space)
    names = table.space.names
    candidates = [dict(c) for c in candidates]
    models = [pruner.prune(Policy({n: float(c.get(n, 0.0)) for n in names})) for c in candidates]
    measured = [math.inf] * len(models)
    for _ in range(max(1, rounds)):  # interleaved, as in the table's build
        for k, model in enumerate(models):
            measured[k] = min(measured[k], measure_latency(model, table.space.example_inputs, warmup=3,
                                                           repeats=repeats, batch_size=table.batch))
    rows = []
    for ratios, seconds in zip(candidates, measured):
        estimate = table.estimate(ratios)
        rows.append({"estimate": estimate, "measured": seconds, "rel_error": estimate / seconds - 1.0})
    pairs = [(a, b) for i, a in enumerate(rows) for b in rows[i + 1:]]
    agree = sum((a["estimate"] - b["estimate"]) * (a["measured"] - b["measured"]) > 0 for a, b in pairs)
    errors = [abs(r["rel_error"]) for r in rows]
    return {
        "rows": rows,
        "mean_abs_rel_error": sum(errors) / len(errors) if errors else float("nan"),
        "max_abs_rel_error": max(errors) if errors else float("nan"),
        "rank_agreement": agree / len(pairs) if pairs else float("nan"),
    }
