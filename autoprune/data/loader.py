"""Batches drawn from tensors that live on the device: no worker processes, no host work per step.

A candidate's fine-tune is a few hundred steps, so a `torch.utils.data.DataLoader` (per-sample
Python transforms, collation, a host-to-device copy per batch) would cost more than the steps.
Here the whole split sits on the device as uint8; a step is one gather, one batched crop/flip
and one fused normalisation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from autoprune.data.splits import TensorSplit, canonical_device

Batch = tuple[torch.Tensor, torch.Tensor]


class DeviceLoader:
    """Iterate over a `TensorSplit` in batches of float images and int64 labels, on `device`.

    Parameters
    ----------
    split: the images (uint8) and labels; moved to `device` once (cached per device by the split).
    batch_size: samples per batch.
    device: where the tensors live and the batches are made ("cpu", "cuda", ...).
    mean, std: per-channel statistics on the 0..1 scale; batches are `(x / 255 - mean) / std`.
        `None` leaves the 0..1 scale.
    shuffle: draw a fresh permutation each epoch (`torch.randperm` on the device).
    augment: random crop with zero padding (`crop_padding` pixels each side, default
        `max(1, image_size // 8)`, i.e. 4 for CIFAR's 32 x 32, as torchvision's
        `RandomCrop(32, padding=4)`), plus a random horizontal flip when `hflip` is true.
        Done for the whole batch in one gather.
    hflip: whether flips are part of the augmentation; take it from `DatasetSplits.hflip`.
    generator: source of randomness for shuffling and augmentation; the same seed gives the same
        batches. A generator on another device seeds a private one on `device` from it, so a CPU
        generator also works for a CUDA loader. `None` seeds from torch's global RNG.
    drop_last: drop the last, smaller batch of each epoch (keeps batch-norm statistics sane in training).
    channels_last: lay batches out as NHWC (``None``: on the CPU). oneDNN's convolutions then run, and
        pass on, the channels-last layout, which trains ResNet-20 on the 8x8 default about 20 % faster
        per step on a CPU than NCHW batches (measured by ``benchmarks/evaluator.py``); the values are
        the same. With one channel, ``contiguous(memory_format=...)`` cannot tell the two layouts
        apart, so the strides are set explicitly.

    Iterating gives one epoch; `batches(n)` gives exactly `n` batches over as many epochs as needed,
    and `infinite()` never stops.
    """

    def __init__(
        self,
        split: TensorSplit,
        batch_size: int,
        device: torch.device | str = "cpu",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        *,
        shuffle: bool = False,
        augment: bool = False,
        hflip: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        crop_padding: int | None = None,
        channels_last: bool | None = None,
    ) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.device = canonical_device(device)
        self.split = split.to(self.device)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.augment = augment
        self.hflip = hflip
        self.drop_last = drop_last
        self.channels_last = (self.device.type == "cpu") if channels_last is None else bool(channels_last)
        channels, height, width = self.split.x.shape[1:]
        if crop_padding is None:
            crop_padding = max(1, min(height, width) // 8)
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        self.crop_padding = int(crop_padding)

        mean_t = torch.zeros(channels) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        std_t = torch.ones(channels) if std is None else torch.as_tensor(std, dtype=torch.float32)
        if mean_t.shape != (channels,) or std_t.shape != (channels,):
            raise ValueError(f"mean and std need {channels} values (one per channel)")
        if not bool((std_t > 0).all()):
            raise ValueError(f"std must be positive, got {std_t.tolist()}")
        # (x / 255 - mean) / std == x * scale - shift: one multiply and one subtract per batch.
        self._scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1).to(self.device)
        self._shift = (mean_t / std_t).view(1, -1, 1, 1).to(self.device)
        self._rows = torch.arange(height, device=self.device)
        self._cols = torch.arange(width, device=self.device)
        self.generator = _generator_on(self.device, generator)

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        """One epoch."""
        return self._epoch()

    def batches(self, n_steps: int) -> Iterator[Batch]:
        """Exactly `n_steps` batches, starting a new (reshuffled) epoch whenever one runs out."""
        if n_steps > 0:
            self._check_not_empty()
        return self._steps(n_steps)

    def infinite(self) -> Iterator[Batch]:
        """Batches forever, reshuffling each epoch."""
        self._check_not_empty()
        return self._steps(None)

    def _check_not_empty(self) -> None:
        # Raised here, not on first next(), so the caller sees it where the loop is set up.
        if len(self) == 0:
            raise ValueError(
                f"no batches: {len(self.split)} samples, batch_size {self.batch_size}, "
                f"drop_last={self.drop_last}"
            )

    def _steps(self, n_steps: int | None) -> Iterator[Batch]:
        produced = 0
        while n_steps is None or produced < n_steps:
            for batch in self._epoch():
                yield batch
                produced += 1
                if produced == n_steps:
                    return  # before the next batch is gathered and augmented for nothing

    def _epoch(self) -> Iterator[Batch]:
        n = len(self.split)
        stop = n - n % self.batch_size if self.drop_last else n
        order = torch.randperm(n, device=self.device, generator=self.generator) if self.shuffle else None
        for start in range(0, stop, self.batch_size):
            if order is None:
                x = self.split.x[start : start + self.batch_size]
                y = self.split.y[start : start + self.batch_size]
            else:
                index = order[start : start + self.batch_size]
                x, y = self.split.x[index], self.split.y[index]
            if self.augment:
                x = self._crop_and_flip(x)
            yield self._float(x).mul_(self._scale).sub_(self._shift), y

    def _float(self, x: torch.Tensor) -> torch.Tensor:
        if not self.channels_last:
            return x.to(torch.float32)
        n, c, h, w = x.shape
        out = torch.empty((n, h, w, c), dtype=torch.float32, device=x.device).permute(0, 3, 1, 2)
        return out.copy_(x)

    def _crop_and_flip(self, x: torch.Tensor) -> torch.Tensor:
        """Random crop of the zero-padded batch and (if `hflip`) a random mirror, as one gather.

        Rather than padding, each output pixel reads its source pixel at the shifted position and
        pixels that fall in the padding are zeroed: one flat `gather` is several times faster on CPU
        than padding plus multi-tensor advanced indexing, and the same on GPU.
        """
        n, channels, height, width = x.shape
        pad = self.crop_padding
        if not pad and not self.hflip:
            return x
        rows = self._rows.expand(n, -1)
        cols = self._cols.expand(n, -1)
        if pad:
            shift = torch.randint(-pad, pad + 1, (2, n, 1), device=self.device, generator=self.generator)
            rows = rows + shift[0]
            cols = cols + shift[1]
        if self.hflip:
            # Reading a crop's columns backwards is the crop mirrored.
            flip = torch.rand(n, 1, device=self.device, generator=self.generator) < 0.5
            cols = torch.where(flip, cols.flip(1), cols)
        index = rows.clamp(0, height - 1)[:, :, None] * width + cols.clamp(0, width - 1)[:, None, :]
        index = index.view(n, 1, height * width).expand(n, channels, height * width)
        out = x.reshape(n, channels, height * width).gather(2, index).view(n, channels, height, width)
        if pad:
            outside = ((rows < 0) | (rows >= height))[:, :, None] | ((cols < 0) | (cols >= width))[:, None, :]
            out.masked_fill_(outside[:, None], 0)
        return out


def _generator_on(device: torch.device, generator: torch.Generator | None) -> torch.Generator:
    """`generator` itself when it lives on `device`, else a generator there seeded from it."""
    if generator is not None and canonical_device(generator.device) == device:
        return generator
    source_device = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=source_device).item())
    own = torch.Generator(device=device)
    own.manual_seed(seed)
    return own
