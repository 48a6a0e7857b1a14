"""In-memory dataset splits: uint8 image tensors plus labels, and the per-dataset facts loaders need."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from autoprune.data.loader import DeviceLoader

SPLIT_NAMES = ("train", "val", "test")


def canonical_device(device: torch.device | str) -> torch.device:
    """`torch.device` with an explicit index for CUDA, so "cuda" and "cuda:0" name one cache entry."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass(frozen=True, eq=False)
class TensorSplit:
    """One split: images `x` (uint8, N x C x H x W, values 0..255) and labels `y` (int64, N).

    `to(device)` caches the moved copy per device, so building many loaders over one split
    (one per candidate, say) copies it to the GPU once.
    """

    x: torch.Tensor
    y: torch.Tensor
    _moved: dict[str, TensorSplit] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise ValueError(
                f"x must be a uint8 N x C x H x W tensor, got {self.x.dtype} {tuple(self.x.shape)}"
            )
        if self.y.dtype != torch.int64 or self.y.dim() != 1 or len(self.y) != len(self.x):
            raise ValueError(
                f"y must be an int64 tensor of length {len(self.x)}, got {self.y.dtype} {tuple(self.y.shape)}"
            )
        if self.x.device != self.y.device:
            raise ValueError(f"x is on {self.x.device} but y on {self.y.device}")

    def __len__(self) -> int:
        return len(self.y)

    def __repr__(self) -> str:
        return f"TensorSplit(n={len(self)}, shape={tuple(self.x.shape[1:])}, device={self.device})"

    @property
    def device(self) -> torch.device:
        return self.x.device

    def to(self, device: torch.device | str) -> TensorSplit:
        """This split on `device`; the copy is made once per device and then reused."""
        device = canonical_device(device)
        if self.x.device == device:
            return self
        key = str(device)
        if key not in self._moved:
            self._moved[key] = TensorSplit(self.x.to(device), self.y.to(device))
        return self._moved[key]


@dataclass(frozen=True, eq=False)
class DatasetSplits:
    """A dataset held in memory as train / val / test `TensorSplit`s.

    `val` is carved from the training set (stratified, seed 0) and is what searches score on;
    `test` is the dataset's own test split. `mean` and `std` are per channel on the 0..1 scale,
    computed on `train`. `hflip` says whether horizontal flips are a valid augmentation
    (true for natural images, false for digits and clothing, whose mirror images mean something else).
    """

    name: str
    in_channels: int
    num_classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: TensorSplit
    val: TensorSplit
    test: TensorSplit
    hflip: bool
    classes: tuple[str, ...] = ()

    def __getitem__(self, which: str) -> TensorSplit:
        if which not in SPLIT_NAMES:
            raise KeyError(f"unknown split {which!r}; choose one of: {', '.join(SPLIT_NAMES)}")
        return getattr(self, which)

    def to(self, device: torch.device | str) -> DatasetSplits:
        """The same dataset with every split on `device` (copied once per device, then cached)."""
        return replace(self, train=self.train.to(device), val=self.val.to(device), test=self.test.to(device))

    def loader(
        self,
        which: str,
        batch_size: int,
        device: torch.device | str = "cpu",
        *,
        shuffle: bool = False,
        augment: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> DeviceLoader:
        """A `DeviceLoader` over split `which` ("train", "val" or "test") with this dataset's
        normalisation and flip setting filled in."""
        from autoprune.data.loader import DeviceLoader

        return DeviceLoader(
            self[which],
            batch_size,
            device,
            self.mean,
            self.std,
            shuffle=shuffle,
            augment=augment,
            hflip=self.hflip,
            generator=generator,
            drop_last=drop_last,
        )


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int = 0) -> list[np.ndarray]:
    """Split indices `0..len(labels)-1` into `len(fractions)` disjoint parts, class by class.

    `fractions[0]` is the part that takes the remainder (the training part). Each class gives
    `round(n * f)` of its members to every other part, and at least one when it has a member
    for every part, so tiny datasets still get non-empty validation and test parts. Indices come
    back sorted. The same labels, fractions and seed always give the same parts.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n = len(members)
        counts = [round(n * f) for f in fractions[1:]]
        if n >= len(fractions):
            counts = [max(c, 1) for c in counts]
        # Never take the training part's last member: the other parts shrink first, last part first.
        for k in reversed(range(len(counts))):
            excess = sum(counts) - (n - 1)
            if excess <= 0:
                break
            counts[k] -= min(excess, counts[k])
        start = n - sum(counts)
        parts[0].append(members[:start])
        for k, c in enumerate(counts, start=1):
            parts[k].append(members[start : start + c])
            start += c
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


def channel_stats(x: torch.Tensor, chunk: int = 1024) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images on the 0..1 scale.

    Works in chunks of samples with float64 sums, so CIFAR's 150 MB never becomes a 1.2 GB float copy.
    """
    channels = x.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk].to(torch.float64)
        total += part.sum(dim=(0, 2, 3))
        total_sq += part.square().sum(dim=(0, 2, 3))
    count = max(1, x.shape[0] * x.shape[2] * x.shape[3])
    mean = total / count
    var = (total_sq / count - mean.square()).clamp_min(0)
    # A constant channel would divide by zero when normalising; 1.0 leaves it merely centred.
    std = torch.where(var > 0, var.sqrt(), torch.ones_like(var))
    return tuple((mean / 255).tolist()), tuple((std / 255).tolist())


def make_splits(
    name: str,
    train: TensorSplit,
    val: TensorSplit,
    test: TensorSplit,
    num_classes: int,
    hflip: bool,
    classes: Sequence[str] = (),
) -> DatasetSplits:
    """Assemble a `DatasetSplits`, computing mean and std on `train`."""
    mean, std = channel_stats(train.x)
    return DatasetSplits(
        name=name,
        in_channels=train.x.shape[1],
        num_classes=num_classes,
        image_size=train.x.shape[-1],
        mean=mean,
        std=std,
        train=train,
        val=val,
        test=test,
        hflip=hflip,
        classes=tuple(classes),
    )


def subset(x: torch.Tensor, y: torch.Tensor, index: np.ndarray) -> TensorSplit:
    """The rows `index` of `x` and `y` as a `TensorSplit` (contiguous, so later moves are one copy)."""
    idx = torch.from_numpy(np.asarray(index, dtype=np.int64))
    return TensorSplit(x[idx].contiguous(), y[idx].contiguous())
