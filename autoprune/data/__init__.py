"""Datasets held in memory as uint8 tensors, and loaders that batch them on the device.

    splits = load_dataset("cifar10", root="data", download=True)
    train = splits.loader("train", 128, "cuda", shuffle=True, augment=True, drop_last=True,
                          generator=torch.Generator().manual_seed(0))
    for x, y in train.batches(500): ...

`digits` (scikit-learn's bundled 8x8 digits) needs no files and no network: it is the default.
"""

from autoprune.data.datasets import DATASET_NAMES, DATASETS, DatasetInfo, load_dataset
from autoprune.data.loader import DeviceLoader
from autoprune.data.splits import DatasetSplits, TensorSplit, stratified_split

__all__ = [
    "DATASETS",
    "DATASET_NAMES",
    "DatasetInfo",
    "DatasetSplits",
    "DeviceLoader",
    "TensorSplit",
    "load_dataset",
    "stratified_split",
]
