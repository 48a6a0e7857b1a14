"""autoprune.data: datasets read from their real on-disk formats (written here, tiny) and device loaders."""

from __future__ import annotations

import gzip
import pickle
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autoprune.data import DATASET_NAMES, DATASETS, DeviceLoader, TensorSplit, load_dataset, stratified_split
from autoprune.errors import InputError

# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _rows(split: TensorSplit) -> Counter:
    """Multiset of (image bytes, label): two splits share a sample exactly when they share a row."""
    return Counter((x.numpy().tobytes(), int(y)) for x, y in zip(split.x, split.y, strict=True))


def _write_cifar(root: Path, hundred: bool, per_class: int, test_per_class: int, bytes_keys: bool) -> dict:
    """A tiny CIFAR in the published python-pickle layout; returns what was written."""
    rng = np.random.default_rng(1)
    classes = 100 if hundred else 10
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    label_key = "fine_labels" if hundred else "labels"

    def batch(n_per_class: int, label: str) -> tuple[dict, np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(classes), n_per_class)
        rng.shuffle(labels)
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        content = {
            key("batch_label"): label,
            key(label_key): labels.tolist(),
            key("data"): data,
            key("filenames"): [f"img_{i}.png" for i in range(len(labels))],
        }
        if hundred:
            content[key("coarse_labels")] = (labels // 5).tolist()
        return content, data, labels

    def dump(path: Path, obj: dict) -> None:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    names = [f"class_{i}" for i in range(classes)]
    if hundred:
        train, x_train, y_train = batch(per_class, "training batch 1 of 1")
        dump(folder / "train", train)
        test, x_test, y_test = batch(test_per_class, "testing batch 1 of 1")
        dump(folder / "test", test)
        dump(folder / "meta", {key("fine_label_names"): names, key("coarse_label_names"): names[:20]})
    else:
        xs, ys = [], []
        for i in range(1, 6):
            content, x, y = batch(per_class, f"training batch {i} of 5")
            dump(folder / f"data_batch_{i}", content)
            xs.append(x)
            ys.append(y)
        x_train, y_train = np.concatenate(xs), np.concatenate(ys)
        test, x_test, y_test = batch(test_per_class, "testing batch 1 of 1")
        dump(folder / "test_batch", test)
        meta = {key("num_cases_per_batch"): 10 * per_class, key("label_names"): names, key("num_vis"): 3072}
        dump(folder / "batches.meta", meta)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test, "classes": names}


def _idx_bytes(array: np.ndarray) -> bytes:
    # Big-endian idx: 0, 0, type 0x08 (unsigned byte), number of dims, then each dim as uint32.
    return (
        struct.pack(">HBB", 0, 0x08, array.ndim)
        + struct.pack(f">{array.ndim}I", *array.shape)
        + array.tobytes()
    )


def _write_mnist(root: Path, folder: str, gzipped: bool) -> dict:
    rng = np.random.default_rng(2)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    y_train = np.repeat(np.arange(10, dtype=np.uint8), 6)
    y_test = np.repeat(np.arange(10, dtype=np.uint8), 2)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (len(y_train), 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": y_train,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (len(y_test), 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": y_test,
    }
    for name, array in arrays.items():
        if gzipped:
            with gzip.open(raw / f"{name}.gz", "wb") as f:
                f.write(_idx_bytes(array))
        else:
            (raw / name).write_bytes(_idx_bytes(array))
    return arrays


_COLOURS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "fish": (0, 0, 255)}


def _write_imagefolder(root: Path, per_class: int = 4, classes=("cat", "dog", "fish")) -> None:
    """Solid-colour PNGs of assorted sizes and modes, so resizing and RGB conversion are checkable."""
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            size = [(40, 20), (17, 33), (16, 16), (64, 48)][i % 4]
            img = Image.new("RGB", size, _COLOURS[cls])
            if i == 1:
                img = img.convert("RGBA")
            img.save(root / cls / f"{i}.png")


def _index_split(n: int = 50, channels: int = 3, size: int = 8, seed: int = 0) -> TensorSplit:
    """Random images whose label is their index, so every output can be traced to its source."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    return TensorSplit(x, torch.arange(n))


def _as_uint8(x: torch.Tensor) -> torch.Tensor:
    # Loaders built with mean 0 and std 1 give x / 255.
    return (x * 255).round().to(torch.uint8)


# -------------------------------------------------------------------------------------------- digits


def test_digits_splits_partition_all_1797_images(digits):
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    from sklearn.datasets import load_digits

    bunch = load_digits()
    full = np.rint(bunch.images * 255 / 16).astype(np.uint8)[:, None]
    everything = Counter((x.tobytes(), int(y)) for x, y in zip(full, bunch.target, strict=True))
    assert _rows(digits.train) + _rows(digits.val) + _rows(digits.test) == everything


def test_digits_splits_are_about_70_15_15_and_stratified(digits):
    sizes = np.array([len(digits.train), len(digits.val), len(digits.test)]) / 1797
    assert np.allclose(sizes, [0.70, 0.15, 0.15], atol=0.01)
    overall = (
        np.bincount(np.concatenate([s.y.numpy() for s in (digits.train, digits.val, digits.test)])) / 1797
    )
    for split in (digits.train, digits.val, digits.test):
        share = np.bincount(split.y.numpy(), minlength=10) / len(split)
        assert np.abs(share - overall).max() < 0.01


def test_digits_loading_is_deterministic(digits):
    again = load_dataset("digits")
    for which in ("train", "val", "test"):
        assert torch.equal(digits[which].x, again[which].x)
        assert torch.equal(digits[which].y, again[which].y)


def test_digits_describes_itself_as_1x8x8_uint8_with_train_statistics(digits):
    assert (digits.name, digits.in_channels, digits.num_classes, digits.image_size) == ("digits", 1, 10, 8)
    assert digits.train.x.dtype == torch.uint8 and digits.train.y.dtype == torch.int64
    assert digits.train.x.shape[1:] == (1, 8, 8)
    assert int(digits.train.x.max()) == 255 and int(digits.train.x.min()) == 0
    pixels = digits.train.x.double() / 255
    assert digits.mean[0] == pytest.approx(pixels.mean().item(), abs=1e-9)
    assert digits.std[0] == pytest.approx(pixels.std(unbiased=False).item(), abs=1e-9)
    assert digits.hflip is False


def test_stratified_split_keeps_a_member_of_each_class_in_every_part_when_it_can():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 2])
    train, val, test = stratified_split(labels, (0.7, 0.15, 0.15), seed=0)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(8))
    assert set(labels[val]) == {0, 1} and set(labels[test]) == {0, 1}
    assert 7 in train  # a lone sample stays in training


# ---------------------------------------------------------------------------------- file formats


def test_cifar10_loads_from_the_python_pickle_batches(tmp_path):
    written = _write_cifar(tmp_path, hundred=False, per_class=2, test_per_class=2, bytes_keys=False)
    splits = load_dataset("cifar10", root=str(tmp_path))
    assert (splits.in_channels, splits.num_classes, splits.image_size, splits.hflip) == (3, 10, 32, True)
    assert splits.classes == tuple(written["classes"])
    expected_test = torch.from_numpy(written["x_test"].reshape(-1, 3, 32, 32))
    assert torch.equal(splits.test.x, expected_test)
    assert splits.test.y.tolist() == written["y_test"].tolist()
    assert len(splits.train) + len(splits.val) == 100 and len(splits.val) == 10
    train_all = TensorSplit(
        torch.from_numpy(written["x_train"].reshape(-1, 3, 32, 32)), torch.from_numpy(written["y_train"])
    )
    assert _rows(splits.train) + _rows(splits.val) == _rows(train_all)
    assert sorted(splits.val.y.tolist()) == list(range(10))  # stratified: one per class


def test_cifar10_also_loads_when_data_root_is_the_batches_folder(tmp_path):
    _write_cifar(tmp_path, hundred=False, per_class=1, test_per_class=1, bytes_keys=False)
    splits = load_dataset("cifar10", root=tmp_path / "cifar-10-batches-py")
    assert len(splits.test) == 10


def test_cifar100_loads_fine_labels_from_pickles_with_bytes_keys(tmp_path):
    written = _write_cifar(tmp_path, hundred=True, per_class=3, test_per_class=1, bytes_keys=True)
    splits = load_dataset("cifar100", root=tmp_path)
    assert (splits.num_classes, splits.in_channels, splits.hflip) == (100, 3, True)
    assert splits.test.y.tolist() == written["y_test"].tolist()
    assert len(splits.train) + len(splits.val) == 300
    assert sorted(splits.val.y.tolist()) == list(range(100))


@pytest.mark.parametrize(
    ("name", "folder", "gzipped"), [("mnist", "MNIST", False), ("fashionmnist", "FashionMNIST", True)]
)
def test_mnist_and_fashionmnist_load_from_idx_files(tmp_path, name, folder, gzipped):
    written = _write_mnist(tmp_path, folder, gzipped)
    splits = load_dataset(name, root=tmp_path)
    assert (splits.in_channels, splits.num_classes, splits.image_size, splits.hflip) == (1, 10, 28, False)
    assert torch.equal(splits.test.x[:, 0], torch.from_numpy(written["t10k-images-idx3-ubyte"]))
    assert splits.test.y.tolist() == written["t10k-labels-idx1-ubyte"].tolist()
    assert len(splits.train) == 50 and len(splits.val) == 10
    assert splits.mean[0] == pytest.approx(splits.train.x.double().mean().item() / 255)


def test_mnist_files_written_here_are_the_format_torchvision_reads(tmp_path):
    import torchvision

    written = _write_mnist(tmp_path, "MNIST", gzipped=False)
    reference = torchvision.datasets.MNIST(str(tmp_path), train=False, download=False)
    assert torch.equal(reference.data, torch.from_numpy(written["t10k-images-idx3-ubyte"]))
    assert torch.equal(load_dataset("mnist", root=tmp_path).test.x[:, 0], reference.data)


def test_imagefolder_loads_rgb_images_resized_with_sorted_classes(tmp_path):
    _write_imagefolder(tmp_path)
    splits = load_dataset("imagefolder", root=tmp_path, image_size=16)
    assert splits.classes == ("cat", "dog", "fish") and splits.num_classes == 3
    assert (splits.in_channels, splits.image_size, splits.hflip) == (3, 16, True)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 12
    assert len(splits.val) == 3 and len(splits.test) == 3  # one per class each
    for split in (splits.train, splits.val, splits.test):
        assert split.x.shape[1:] == (3, 16, 16)
        for x, y in zip(split.x, split.y, strict=True):
            colour = _COLOURS[splits.classes[int(y)]]
            assert torch.equal(x[:, 8, 8], torch.tensor(colour, dtype=torch.uint8))


def test_imagefolder_uses_train_and_test_folders_when_present(tmp_path):
    _write_imagefolder(tmp_path / "train", per_class=4)
    _write_imagefolder(tmp_path / "test", per_class=1, classes=("cat", "fish"))
    splits = load_dataset("imagefolder", root=tmp_path)
    assert splits.image_size == 32
    assert len(splits.test) == 2 and sorted(splits.test.y.tolist()) == [0, 2]
    assert len(splits.train) + len(splits.val) == 12


# ---------------------------------------------------------------------------------------- loaders


def test_loader_yields_float_batches_and_int64_labels_of_the_right_shapes(digits):
    loader = DeviceLoader(digits.train, 64, "cpu", digits.mean, digits.std)
    batches = list(loader)
    assert len(batches) == len(loader) == 20
    x, y = batches[0]
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert y.shape == (64,) and y.dtype == torch.int64
    assert batches[-1][0].shape[0] == len(digits.train) - 19 * 64


def test_loader_normalises_to_zero_mean_unit_std_over_an_epoch(digits):
    x = torch.cat([x for x, _ in digits.loader("train", 100)])
    assert x.mean().item() == pytest.approx(0, abs=1e-4)
    assert x.std(unbiased=False).item() == pytest.approx(1, abs=1e-4)


def test_loader_is_deterministic_for_a_seed(digits):
    def first_batches(seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        loader = digits.loader("train", 32, shuffle=True, augment=True, generator=g)
        return [torch.cat([x.flatten(), y.float()]) for x, y in loader.batches(5)]

    assert all(torch.equal(a, b) for a, b in zip(first_batches(7), first_batches(7), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first_batches(7), first_batches(8), strict=True))


def test_shuffled_epoch_without_drop_last_covers_every_sample_once():
    split = _index_split(n=53)
    loader = DeviceLoader(split, 10, shuffle=True, generator=torch.Generator().manual_seed(0))
    seen = torch.cat([y for _, y in loader])
    assert sorted(seen.tolist()) == list(range(53))
    assert seen.tolist() != list(range(53))


def test_batches_yields_exactly_n_steps_across_epochs_with_drop_last():
    loader = DeviceLoader(_index_split(n=25), 10, shuffle=True, drop_last=True, generator=torch.Generator())
    assert len(loader) == 2
    sizes = [len(y) for _, y in loader.batches(7)]
    assert sizes == [10] * 7


def test_asking_for_steps_from_a_loader_with_no_full_batch_fails_at_once():
    loader = DeviceLoader(_index_split(n=5), 10, drop_last=True)
    with pytest.raises(ValueError, match="no batches"):
        loader.batches(3)
    with pytest.raises(ValueError, match="no batches"):
        loader.infinite()


def test_infinite_keeps_going_past_an_epoch():
    stream = DeviceLoader(_index_split(n=5), 2, shuffle=True, generator=torch.Generator()).infinite()
    assert [len(next(stream)[1]) for _ in range(7)] == [2, 2, 1, 2, 2, 1, 2]


@pytest.mark.parametrize("hflip", [False, True])
def test_crop_keeps_the_shape_and_shows_a_window_of_the_zero_padded_image(hflip):
    split = _index_split(n=40)
    pad = 2
    loader = DeviceLoader(split, 16, augment=True, hflip=hflip, crop_padding=pad, generator=torch.Generator())
    padded = torch.nn.functional.pad(split.x, (pad, pad, pad, pad))
    sources = (padded, padded.flip(-1)) if hflip else (padded,)
    offsets, flipped = set(), set()
    for x, y in loader:
        assert x.shape[1:] == split.x.shape[1:]
        for image, index in zip(_as_uint8(x), y.tolist(), strict=True):
            matches = [
                (mirrored, dy, dx)
                for mirrored, source in enumerate(sources)
                for dy in range(2 * pad + 1)
                for dx in range(2 * pad + 1)
                if torch.equal(image, source[index, :, dy : dy + 8, dx : dx + 8])
            ]
            assert matches, "an augmented image is not a (mirrored) crop of its padded source"
            offsets.update(m[1:] for m in matches)
            flipped.update(m[0] for m in matches)
    assert len(offsets) > 5  # the offsets do vary
    assert flipped == ({0, 1} if hflip else {0})


def test_flip_mirrors_some_images_only_where_the_dataset_allows_it(digits):
    split = _index_split(n=64)
    for hflip in (True, False):
        loader = DeviceLoader(
            split, 64, augment=True, hflip=hflip, crop_padding=0, generator=torch.Generator()
        )
        x, y = next(iter(loader))
        images = _as_uint8(x)
        mirrored = [torch.equal(img, split.x[i].flip(-1)) for img, i in zip(images, y.tolist(), strict=True)]
        unchanged = [torch.equal(img, split.x[i]) for img, i in zip(images, y.tolist(), strict=True)]
        assert all(m or u for m, u in zip(mirrored, unchanged, strict=True))
        assert any(mirrored) is hflip
    assert digits.hflip is False
    assert digits.loader("train", 8, augment=True).hflip is False


def test_default_crop_padding_is_an_eighth_of_the_image_and_at_least_one(digits):
    assert digits.loader("train", 8).crop_padding == 1
    assert DeviceLoader(_index_split(n=4, size=32), 2).crop_padding == 4


def test_split_is_moved_to_a_device_once_and_reused():
    split = _index_split(n=4)
    assert split.to("cpu") is split
    if torch.cuda.is_available():
        assert split.to("cuda") is split.to("cuda:0")
        loader = DeviceLoader(split, 2, "cuda", shuffle=True, augment=True, generator=torch.Generator())
        x, y = next(iter(loader))
        assert x.is_cuda and y.is_cuda and loader.split is split.to("cuda")


# ----------------------------------------------------------------------------------------- errors


def _input_error(match: str, *args, **kwargs) -> InputError:
    with pytest.raises(InputError) as info:
        load_dataset(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for part in match.split("|"):
        assert part in message, f"{part!r} not in {message!r}"
    return info.value


def test_unknown_dataset_name_is_refused_with_the_allowed_names():
    _input_error("'imagenet-lite'|digits|cifar10|fashionmnist|imagefolder", "imagenet-lite")


def test_dataset_names_are_listed_with_descriptions():
    assert DATASET_NAMES == ("digits", "cifar10", "cifar100", "mnist", "fashionmnist", "imagefolder")
    assert all(info.description and "\n" not in info.description for info in DATASETS)


@pytest.mark.parametrize("name", ["cifar10", "mnist", "imagefolder"])
def test_missing_data_root_is_refused(name):
    _input_error("--data-root", name)


def test_data_root_that_does_not_exist_is_refused(tmp_path):
    _input_error(f"{tmp_path / 'nope'}|does not exist", "cifar10", root=tmp_path / "nope")


def test_data_root_that_is_a_file_is_refused(tmp_path):
    file = tmp_path / "data.bin"
    file.write_bytes(b"x")
    _input_error(f"{file}|not a directory", "mnist", root=file)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cifar10", "cifar-10-batches-py|data_batch_1|batches.meta"),
        ("cifar100", "cifar-100-python|meta"),
        ("mnist", "MNIST/raw|train-images-idx3-ubyte|t10k-labels-idx1-ubyte"),
        ("fashionmnist", "FashionMNIST/raw|train-images-idx3-ubyte"),
    ],
)
def test_missing_dataset_files_name_the_expected_files_and_download(tmp_path, name, expected):
    _input_error(f"{expected}|--download|{tmp_path}", name, root=tmp_path)


def test_corrupt_cifar_batch_is_refused_naming_the_file(tmp_path):
    _write_cifar(tmp_path, hundred=False, per_class=1, test_per_class=1, bytes_keys=False)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    _input_error("data_batch_3", "cifar10", root=tmp_path)


def test_idx_file_with_a_bad_magic_number_is_refused_naming_the_file(tmp_path):
    _write_mnist(tmp_path, "MNIST", gzipped=False)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x0d\x01" + bytes(8))
    _input_error("t10k-labels-idx1-ubyte|magic", "mnist", root=tmp_path)


def test_imagefolder_without_images_is_refused(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("no images here")
    _input_error(f"no images|{tmp_path}", "imagefolder", root=tmp_path)


def test_imagefolder_with_one_class_is_refused(tmp_path):
    _write_imagefolder(tmp_path, classes=("cat",))
    _input_error("at least 2 classes|'cat'", "imagefolder", root=tmp_path)


def test_image_size_is_refused_for_datasets_of_fixed_size():
    _input_error("--image-size 32|digits|8x8", "digits", image_size=32)


def test_non_positive_image_size_is_refused(tmp_path):
    _input_error("--image-size|0", "imagefolder", root=tmp_path, image_size=0)


def test_cpu_batches_are_channels_last_with_the_same_values():
    """On the CPU batches come as NHWC (faster convolutions), even with one channel; the values do not change."""
    import torch

    from autoprune.data import load_dataset

    data = load_dataset("digits")
    kw = dict(shuffle=True, augment=True, drop_last=True)
    nhwc = data.loader("train", 32, "cpu", generator=torch.Generator().manual_seed(3), **kw)
    x, y = next(iter(nhwc))
    from autoprune.data.loader import DeviceLoader

    plain = DeviceLoader(data.train, 32, "cpu", data.mean, data.std, generator=torch.Generator().manual_seed(3),
                         channels_last=False, **kw)
    x0, y0 = next(iter(plain))
    n, c, h, w = x.shape
    assert x.stride() == (h * w * c, 1, w * c, c) and x0.stride() == (c * h * w, h * w, w, 1)
    assert torch.equal(x, x0) and torch.equal(y, y0)


def test_scoring_on_the_cpu_reads_small_batches_with_the_same_result(digits):
    """Large scoring batches spill a CPU's caches: there the validation split is scored 128 images at a
    time unless eval_batch_size says otherwise; on an accelerator 1000 at a time."""
    from autoprune.task import ImageClassificationTask

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    sizes = []
    model.register_forward_hook(lambda m, i, o: sizes.append(len(i[0])))
    default = ImageClassificationTask(digits).score(model, "val")
    assert len(digits.val) > 128 and max(sizes) == 128 and sum(sizes) == len(digits.val)
    sizes.clear()
    asked = ImageClassificationTask(digits, eval_batch_size=1000).score(model, "val")
    assert sizes == [len(digits.val)]
    assert default["accuracy"] == asked["accuracy"] and default["loss"] == pytest.approx(asked["loss"], rel=1e-5)
    assert ImageClassificationTask(digits, device="meta").scoring_batch_size == 1000
    assert ImageClassificationTask(digits, device="meta").to("cpu").scoring_batch_size == 128
    with pytest.raises(InputError, match="eval_batch_size must be a positive integer"):
        ImageClassificationTask(digits, eval_batch_size=0)
