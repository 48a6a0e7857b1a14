"""Load a dataset by name into memory as uint8 `DatasetSplits`.

The torchvision datasets are read straight from their published on-disk formats (CIFAR python
pickles, MNIST idx files) rather than through the `torchvision.datasets` classes: those check the
MD5 of every file on each load and hand out one PIL image per sample, whereas autoprune wants the
whole array at once. torchvision is still what downloads them (`download=True`), so the files
land in the layout torchvision users already have on disk.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from autoprune.data.splits import DatasetSplits, TensorSplit, make_splits, stratified_split, subset
from autoprune.errors import InputError

# Searches score candidates on a validation split carved from the training set, never on the test set.
VAL_FRACTION = 0.10
# Datasets that ship without a test split (digits, a flat imagefolder) are cut train / val / test.
THREE_WAY = (0.70, 0.15, 0.15)
SPLIT_SEED = 0


class DatasetInfo(NamedTuple):
    name: str
    description: str


DATASETS: tuple[DatasetInfo, ...] = (
    DatasetInfo(
        "digits", "scikit-learn's bundled 8x8 grey digits, 1797 images, 10 classes (embedded default)"
    ),
    DatasetInfo(
        "cifar10", "CIFAR-10, 32x32 colour, 50k train / 10k test, 10 classes (--data-root, --download)"
    ),
    DatasetInfo(
        "cifar100", "CIFAR-100, 32x32 colour, 50k train / 10k test, 100 classes (--data-root, --download)"
    ),
    DatasetInfo(
        "mnist", "MNIST, 28x28 grey digits, 60k train / 10k test, 10 classes (--data-root, --download)"
    ),
    DatasetInfo(
        "fashionmnist",
        "Fashion-MNIST, 28x28 grey clothing, 60k train / 10k test, 10 classes (--data-root, --download)",
    ),
    DatasetInfo(
        "imagefolder", "your images as --data-root/<class>/<image>, resized to --image-size (default 32)"
    ),
)
DATASET_NAMES: tuple[str, ...] = tuple(info.name for info in DATASETS)

DEFAULT_IMAGE_SIZE = 32
Root = str | os.PathLike[str] | None


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    image_size: int | None = None,
) -> DatasetSplits:
    """Load dataset `name` (one of `DATASET_NAMES`) as train / val / test splits in host memory.

    `root` is the directory holding the files (ignored by the embedded `digits`); `download` lets
    torchvision fetch cifar10/cifar100/mnist/fashionmnist into it when they are missing.
    `image_size` is the side that `imagefolder` images are resized and centre-cropped to (default 32);
    the other datasets keep their native size. Bad names, paths or files raise `InputError`.
    """
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    if key not in _LOADERS:
        raise InputError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise InputError(f"--image-size must be a positive integer, got {image_size!r}")
    native = _NATIVE_SIZE.get(key)
    if native is not None and image_size is not None and image_size != native:
        raise InputError(
            f"--image-size {image_size} does not apply to {key}: its images are {native}x{native} "
            "(only imagefolder resizes)"
        )
    return _LOADERS[key](root, download, image_size)


# ----------------------------------------------------------------------------------------------- digits


def _load_digits() -> DatasetSplits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are counts 0..16 of an 4x4 block; stretch to 0..255 so every dataset shares one scale.
    x = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    y = bunch.target.astype(np.int64)
    train, val, test = stratified_split(y, THREE_WAY, seed=SPLIT_SEED)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    return make_splits(
        "digits",
        subset(xt, yt, train),
        subset(xt, yt, val),
        subset(xt, yt, test),
        num_classes=10,
        hflip=False,  # a mirrored 2 or 7 is not a 2 or 7
        classes=[str(c) for c in range(10)],
    )


# ------------------------------------------------------------------------------------------------ CIFAR


class _CifarSpec(NamedTuple):
    name: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    expected: str  # the file list as the error message shows it
    torchvision_class: str


_CIFAR10 = _CifarSpec(
    "cifar10",
    "cifar-10-batches-py",
    tuple(f"data_batch_{i}" for i in range(1, 6)),
    ("test_batch",),
    "batches.meta",
    "labels",
    "label_names",
    "cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}",
    "CIFAR10",
)
_CIFAR100 = _CifarSpec(
    "cifar100",
    "cifar-100-python",
    ("train",),
    ("test",),
    "meta",
    "fine_labels",
    "fine_label_names",
    "cifar-100-python/{train, test, meta}",
    "CIFAR100",
)


def _load_cifar(spec: _CifarSpec, root: Root, download: bool) -> DatasetSplits:
    base = _check_root(spec.name, root, download)
    files = (*spec.train_files, *spec.test_files, spec.meta_file)
    # Also accept --data-root pointing at the extracted folder itself.
    found = _find_dir([base / spec.folder, base], files)
    if found is None and download:
        _download(spec.name, spec.torchvision_class, base)
        found = _find_dir([base / spec.folder], files)
    if found is None:
        raise InputError(
            f"{spec.name} files not found under --data-root {str(base)!r}: expected {spec.expected}; "
            "--download fetches them"
        )
    meta = _read_pickle(found / spec.meta_file)
    try:
        classes = [str(c) for c in meta[spec.names_key]]
    except (KeyError, TypeError) as exc:
        raise InputError(
            f"{found / spec.meta_file} is not a {spec.name} meta file: no {spec.names_key!r}"
        ) from exc
    x_train, y_train = _read_cifar_batches(found, spec.train_files, spec.label_key, len(classes))
    x_test, y_test = _read_cifar_batches(found, spec.test_files, spec.label_key, len(classes))
    train, val = stratified_split(y_train.numpy(), (1 - VAL_FRACTION, VAL_FRACTION), seed=SPLIT_SEED)
    return make_splits(
        spec.name,
        subset(x_train, y_train, train),
        subset(x_train, y_train, val),
        TensorSplit(x_test, y_test),
        num_classes=len(classes),
        hflip=True,
        classes=classes,
    )


def _read_cifar_batches(
    folder: Path, names: Sequence[str], label_key: str, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for name in names:
        path = folder / name
        batch = _read_pickle(path)
        try:
            data = np.asarray(batch["data"], dtype=np.uint8)
            labels = np.asarray(batch[label_key], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path} is not a CIFAR batch: {_one_line(exc)}") from exc
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise InputError(
                f"{path} is not a CIFAR batch: data {data.shape}, {len(labels)} labels "
                "(want N x 3072 and N labels)"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise InputError(f"{path} has labels outside 0..{num_classes - 1}")
        # Rows are stored channel-major (1024 red, 1024 green, 1024 blue), i.e. already C x H x W.
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _read_pickle(path: Path) -> dict[str, object]:
    # CIFAR's python format is a pickle by definition (torchvision reads it the same way); only
    # load files you trust. latin1 decodes the Python 2 strings of the published files.
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, AttributeError, ImportError) as exc:
        raise InputError(f"cannot read {path}: {_one_line(exc)}") from exc
    if not isinstance(obj, dict):
        raise InputError(f"{path} is not a CIFAR file: it holds a {type(obj).__name__}, not a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


# ------------------------------------------------------------------------------------------------ MNIST


class _MnistSpec(NamedTuple):
    name: str
    folder: str  # torchvision's folder under root, and its dataset class name
    classes: tuple[str, ...]


_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_MNIST = _MnistSpec("mnist", "MNIST", tuple(str(c) for c in range(10)))
_FASHION_MNIST = _MnistSpec("fashionmnist", "FashionMNIST", _FASHION_CLASSES)


def _load_mnist_like(spec: _MnistSpec, root: Root, download: bool) -> DatasetSplits:
    name, folder, classes = spec
    base = _check_root(name, root, download)
    # torchvision keeps the idx files in <root>/<MNIST|FashionMNIST>/raw; accept the raw folder itself too.
    candidates = [base / folder / "raw", base / "raw", base]
    found = _find_idx_dir(candidates)
    if found is None and download:
        _download(name, folder, base)
        found = _find_idx_dir(candidates[:1])
    if found is None:
        raise InputError(
            f"{name} files not found under --data-root {str(base)!r}: expected {folder}/raw/"
            f"{{{', '.join(_IDX_FILES)}}} (raw or .gz); --download fetches them"
        )
    x_train = _read_idx(found, _IDX_FILES[0], ndim=3)
    y_train = _read_idx(found, _IDX_FILES[1], ndim=1).astype(np.int64)
    x_test = _read_idx(found, _IDX_FILES[2], ndim=3)
    y_test = _read_idx(found, _IDX_FILES[3], ndim=1).astype(np.int64)
    for x, y, stem in ((x_train, y_train, "train"), (x_test, y_test, "t10k")):
        if len(x) != len(y):
            raise InputError(f"{found}: {stem} has {len(x)} images but {len(y)} labels")
        if len(y) and y.max() >= len(classes):
            raise InputError(f"{found}: {stem} labels go up to {y.max()}, {name} has {len(classes)} classes")
    xt, yt = torch.from_numpy(x_train[:, None].copy()), torch.from_numpy(y_train)
    train, val = stratified_split(y_train, (1 - VAL_FRACTION, VAL_FRACTION), seed=SPLIT_SEED)
    return make_splits(
        name,
        subset(xt, yt, train),
        subset(xt, yt, val),
        TensorSplit(torch.from_numpy(x_test[:, None].copy()), torch.from_numpy(y_test)),
        num_classes=len(classes),
        hflip=False,  # handwriting and clothing photographed one way round; mirrors are other things
        classes=classes,
    )


def _find_idx_dir(candidates: Sequence[Path]) -> Path | None:
    for folder in candidates:
        if all((folder / f).is_file() or (folder / f"{f}.gz").is_file() for f in _IDX_FILES):
            return folder
    return None


def _read_idx(folder: Path, stem: str, ndim: int) -> np.ndarray:
    """An unsigned-byte idx array (the MNIST format: big-endian header, then the raw bytes)."""
    path = folder / stem
    if not path.is_file():
        path = folder / f"{stem}.gz"
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise InputError(f"cannot read {path}: {_one_line(exc)}") from exc
    # Magic: two zero bytes, a type code (0x08 = unsigned byte) and the number of dimensions.
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise InputError(f"{path} is not an idx{ndim} unsigned-byte file (bad magic number {raw[:4].hex()})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise InputError(f"{path} is truncated (header)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != int(np.prod(dims)):
        raise InputError(f"{path} holds {len(raw) - header} bytes of data, its header promises {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


# ------------------------------------------------------------------------------------------ imagefolder

try:
    from torchvision.datasets.folder import IMG_EXTENSIONS as _IMG_EXTENSIONS
except ImportError:  # pragma: no cover - torchvision is a dependency; keep the list if it moves
    _IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _load_imagefolder(root: Root, image_size: int | None) -> DatasetSplits:
    base = _check_root("imagefolder", root, download=False)
    size = image_size or DEFAULT_IMAGE_SIZE
    train_dir = base / "train"
    val_dir = base / "val" if (base / "val").is_dir() else None
    test_dir = base / "test" if (base / "test").is_dir() else None
    if train_dir.is_dir() and (val_dir or test_dir):
        # root/train + root/val|test: both present -> used as given; one -> it is the test split.
        train_files = _scan_classes(train_dir)
        classes = _check_classes(train_files, train_dir)
        index = {c: i for i, c in enumerate(classes)}
        held_out = {}
        for part_dir in (val_dir, test_dir):
            if part_dir is not None:
                files = _scan_classes(part_dir)
                unknown = sorted(set(files) - set(index))
                if unknown:
                    raise InputError(
                        f"imagefolder: class {unknown[0]!r} in {part_dir} has no images in {train_dir}"
                    )
                held_out[part_dir.name] = _read_images(files, index, size)
        x, y = _read_images(train_files, index, size)
        if len(held_out) == 2:
            train, val, test = (x, y), held_out["val"], held_out["test"]
        else:
            (test,) = held_out.values()
            tr, va = stratified_split(y.numpy(), (1 - VAL_FRACTION, VAL_FRACTION), seed=SPLIT_SEED)
            train, val = (x[tr], y[tr]), (x[va], y[va])
    else:
        pool = train_dir if train_dir.is_dir() else base
        files = _scan_classes(pool)
        classes = _check_classes(files, pool)
        x, y = _read_images(files, {c: i for i, c in enumerate(classes)}, size)
        tr, va, te = stratified_split(y.numpy(), THREE_WAY, seed=SPLIT_SEED)
        train, val, test = (x[tr], y[tr]), (x[va], y[va]), (x[te], y[te])
    parts = [TensorSplit(px.contiguous(), py.contiguous()) for px, py in (train, val, test)]
    for part, label in zip(parts[1:], ("validation", "test"), strict=True):
        if len(part) == 0:
            raise InputError(
                f"imagefolder under {str(base)!r} has too few images for a {label} split "
                "(give each class 3 or more)"
            )
    return make_splits("imagefolder", *parts, num_classes=len(classes), hflip=True, classes=classes)


def _scan_classes(folder: Path) -> dict[str, list[Path]]:
    """Image files per class folder (sorted, nested folders included, as torchvision's ImageFolder)."""
    files: dict[str, list[Path]] = {}
    for entry in sorted(folder.iterdir()):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        images = [
            Path(dirpath) / f
            for dirpath, _, names in sorted(os.walk(entry, followlinks=True))
            for f in sorted(names)
            if f.lower().endswith(_IMG_EXTENSIONS) and not f.startswith(".")
        ]
        # A class folder without images is skipped, as are stray folders (__MACOSX and the like).
        if images:
            files[entry.name] = images
    return files


def _check_classes(files: dict[str, list[Path]], folder: Path) -> list[str]:
    if not files:
        raise InputError(
            f"no images under --data-root {str(folder)!r}: expected <class>/<image> with one of "
            f"{', '.join(_IMG_EXTENSIONS)}"
        )
    if len(files) < 2:
        (only,) = files
        raise InputError(f"imagefolder needs at least 2 classes, found 1 ({only!r}) under {str(folder)!r}")
    return sorted(files)


def _read_images(
    files: dict[str, list[Path]], index: dict[str, int], size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    paths = [p for c in sorted(files) for p in files[c]]
    labels = [index[c] for c in sorted(files) for _ in files[c]]
    # PIL decodes and resizes with the GIL released, so threads do help here.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        arrays = list(pool.map(_image_reader(size), paths))
    x = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, 3, size, size, dtype=torch.uint8)
    return x, torch.tensor(labels, dtype=torch.int64)


def _image_reader(size: int) -> Callable[[Path], np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    def read(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                # Shorter side to `size`, then the centre square: keeps the aspect ratio.
                w, h = img.size
                scale = size / min(w, h)
                w2, h2 = max(size, round(w * scale)), max(size, round(h * scale))
                img = img.resize((w2, h2), Image.Resampling.BILINEAR)
                left, top = (w2 - size) // 2, (h2 - size) // 2
                img = img.crop((left, top, left + size, top + size))
                return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise InputError(f"cannot read image {path}: {_one_line(exc)}") from exc

    return read


# ------------------------------------------------------------------------------------------------ shared


def _check_root(name: str, root: Root, download: bool) -> Path:
    if root is None:
        fetch = " (with --download to fetch it there)" if name != "imagefolder" else ""
        raise InputError(f"dataset {name!r} needs --data-root DIR{fetch}")
    path = Path(root).expanduser()
    if not path.exists():
        if download:
            try:
                path.mkdir(parents=True)
            except OSError as exc:
                raise InputError(f"cannot create --data-root {str(root)!r}: {_one_line(exc)}") from exc
            return path
        raise InputError(f"--data-root {str(root)!r} does not exist")
    if not path.is_dir():
        raise InputError(f"--data-root {str(root)!r} is not a directory")
    return path


def _find_dir(candidates: Sequence[Path], files: Sequence[str]) -> Path | None:
    for folder in candidates:
        if all((folder / f).is_file() for f in files):
            return folder
    return None


def _download(name: str, torchvision_class: str, root: Path) -> None:
    import torchvision.datasets

    cls = getattr(torchvision.datasets, torchvision_class)
    try:
        # Constructing with download=True fetches and MD5-checks the archive, then extracts it under root.
        cls(str(root), train=True, download=True)
    except Exception as exc:  # network, disk or checksum: any of them is one line for the user
        raise InputError(
            f"downloading {name} into {str(root)!r} failed: {_one_line(exc)}; "
            "put the files there by hand or check the network"
        ) from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


_LOADERS: dict[str, Callable[[Root, bool, int | None], DatasetSplits]] = {
    "digits": lambda root, download, size: _load_digits(),
    "cifar10": lambda root, download, size: _load_cifar(_CIFAR10, root, download),
    "cifar100": lambda root, download, size: _load_cifar(_CIFAR100, root, download),
    "mnist": lambda root, download, size: _load_mnist_like(_MNIST, root, download),
    "fashionmnist": lambda root, download, size: _load_mnist_like(_FASHION_MNIST, root, download),
    "imagefolder": lambda root, download, size: _load_imagefolder(root, size),
}
_NATIVE_SIZE = {"digits": 8, "cifar10": 32, "cifar100": 32, "mnist": 28, "fashionmnist": 28}
