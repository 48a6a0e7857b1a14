"""Bring your own model, data pipeline and metric: every agent searches, through autoprune.search, (i) a
classifier fed by a DataLoader over an ImageFolder of 64x64 PNGs, (ii) an encoder-decoder segmenter scored
by mIoU, (iii) a model with two inputs and dict outputs; each exported policy meets its budget and
autoprune.apply reproduces the recorded objective."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import autoprune
from autoprune.cost import count_flops
from autoprune.errors import CandidateError, InputError
from autoprune.inputs import to_device
from autoprune.study import completed
from autoprune.task import LoaderTask, Task

PIL = pytest.importorskip("PIL.Image")
torchvision = pytest.importorskip("torchvision")
from torchvision import transforms  # noqa: E402

BUDGET = 0.6
AGENT_OPTIONS = {
    "uniform": {},
    "random": {"trials": 3},
    "amc": {"trials": 3, "warmup": 1},
    "netadapt": {"trials": 40, "initial": 0.15, "long_steps": 0},
    "icepick": {"trials": 2, "max_steps": 2, "probe_steps": 1},
    "gates": {"steps": 6, "snapshot_every": 3},
    "sensitivity": {"ratios": "0.3,0.6,0.9"},
}


# -- the user's data: an ImageFolder of PNGs the test writes ------------------------------------------


def write_pngs(root, classes=3, per_class=8, size=64, seed=0):
    """Class c's images are noise whose mean brightness grows with c, so the classes can be told apart."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            level = 60 + 70 * c
            pixels = np.clip(rng.normal(level, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            PIL.fromarray(pixels).save(folder / f"{i}.png")
    return root


class CountingFolder(torchvision.datasets.ImageFolder):
    """An ImageFolder that counts the images it reads from disk (streamed: a few per batch, on demand)."""

    reads = 0

    def __getitem__(self, index):
        CountingFolder.reads += 1
        return super().__getitem__(index)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_pngs(tmp_path_factory.mktemp("images"))


def classification_task(folder, num_workers=0):
    train = CountingFolder(folder, transform=transforms.Compose([transforms.RandomHorizontalFlip(),
                                                                 transforms.ToTensor()]))
    val = CountingFolder(folder, transform=transforms.ToTensor())
    return LoaderTask.classification(DataLoader(train, batch_size=8, shuffle=True, num_workers=num_workers),
                                     DataLoader(val, batch_size=8))


class SmallNet(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        )
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


# -- a dense-prediction model: masks derived from the images, scored by mIoU ---------------------------


class OnImages(Dataset):
    """Samples made from the PNGs of an ImageFolder, read one by one."""

    def __init__(self, folder):
        self.images = torchvision.datasets.ImageFolder(folder, transform=transforms.ToTensor())

    def __len__(self):
        return len(self.images)


class MaskedImages(OnImages):
    """The PNGs with a mask per image: foreground where a pixel is brighter than the image's median."""

    def __getitem__(self, i):
        x, _ = self.images[i]
        gray = x.mean(0)
        return x, (gray > gray.median()).long()


class Segmenter(nn.Module):
    """A small encoder-decoder: two strided convs down, two transposed convs up, two classes per pixel."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.decoder = nn.Sequential(nn.ConvTranspose2d(16, 16, 2, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
                                     nn.ConvTranspose2d(16, 8, 2, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.Conv2d(8, 2, 1))

    def forward(self, x):
        return self.decoder(self.encoder(x))


def mean_iou(model, loader, classes=2):
    device = next(model.parameters()).device
    inter = torch.zeros(classes)
    union = torch.zeros(classes)
    for batch in loader:
        x, mask = to_device(batch, device)
        pred = model(x).argmax(1)
        for c in range(classes):
            inter[c] += ((pred == c) & (mask == c)).sum().cpu()
            union[c] += ((pred == c) | (mask == c)).sum().cpu()
    return {"miou": float((inter / union.clamp_min(1)).mean()), "pixel_accuracy": float(inter.sum() / union.numel())}


def segmentation_task(folder):
    data = MaskedImages(folder)
    return LoaderTask(DataLoader(data, batch_size=8, shuffle=True), DataLoader(data, batch_size=8),
                      loss_fn=lambda out, batch: F.cross_entropy(out, batch[1]), score_fn=mean_iou,
                      example_inputs=torch.zeros(1, 3, 64, 64), metric="miou", direction="maximize",
                      name="masks")


# -- two inputs, dict outputs ---------------------------------------------------------------------------


class TwoInputs(nn.Module):
    """An image and a vector of side information, fused; the output is a dict of logits and an embedding."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.side = nn.Sequential(nn.Linear(4, 16), nn.ReLU())
        self.fuse = nn.Sequential(nn.Linear(32, 24), nn.ReLU())
        self.head = nn.Linear(24, 3)

    def forward(self, image, side):
        z = self.fuse(torch.cat([self.conv(image).mean((2, 3)), self.side(side)], 1))
        return {"logits": self.head(z), "embedding": z}


class WithSide(OnImages):
    """The PNGs with a vector of side information and the label, as a dict."""

    def __getitem__(self, i):
        x, y = self.images[i]
        return {"image": x, "side": torch.tensor([float(y), 1.0, 0.0, float(i % 2)]), "label": y}


def loss_of(out, batch):
    return F.cross_entropy(out["logits"], batch["label"])


def negative_loss(model, loader):
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for batch in loader:
        batch = to_device(batch, device)
        total += float(F.cross_entropy(model(batch["image"], batch["side"])["logits"], batch["label"],
                                       reduction="sum"))
        n += len(batch["label"])
    return {"loss": total / n}


def two_input_task(folder):
    data = WithSide(folder)
    return LoaderTask(DataLoader(data, batch_size=8, shuffle=True), DataLoader(data, batch_size=8),
                      loss_fn=loss_of, score_fn=negative_loss,
                      forward_fn=lambda model, batch: model(batch["image"], batch["side"]),
                      example_inputs=(torch.zeros(1, 3, 64, 64), torch.zeros(1, 4)),
                      metric="loss", direction="minimize", name="sided")


CASES = {
    "imagefolder": (SmallNet, classification_task),
    "segmentation": (Segmenter, segmentation_task),
    "two-inputs": (TwoInputs, two_input_task),
}


@pytest.mark.parametrize("agent", list(AGENT_OPTIONS))
@pytest.mark.parametrize("case", list(CASES))
def test_every_agent_searches_a_user_model_and_apply_reproduces_the_objective(folder, case, agent):
    make_model, make_task = CASES[case]
    torch.manual_seed(0)
    model = make_model().eval()
    task = make_task(folder)
    result = autoprune.search(model, task, {"flops": f"{BUDGET:.0%}"}, agent=agent, finetune_steps=2, seed=0,
                              device="cpu", **AGENT_OPTIONS[agent])
    policy = result.policy
    assert policy is not None, f"{agent} found no feasible policy on {case}"
    assert policy.metrics["metric"] == task.metric
    assert policy.metrics[task.metric] == policy.metrics["score"] == result.best.score
    assert result.study.metric_names[0] == task.metric  # the dashboard names the objective

    pruned = autoprune.apply(model, policy, task, device="cpu")
    example = task.example_inputs
    assert count_flops(pruned, example) <= BUDGET * count_flops(model, example) * (1 + 1e-9)
    assert count_flops(pruned, example) == policy.metrics["flops"]
    assert task.score(pruned, "val")[task.metric] == pytest.approx(policy.metrics["score"], abs=1e-9)


def test_a_minimised_objective_picks_the_lowest(folder):
    model = TwoInputs().eval()
    task = two_input_task(folder)
    result = autoprune.search(model, task, {"flops": "60%"}, agent="random", trials=3, finetune_steps=1,
                              device="cpu")
    scores = [t.user_attrs["score"] for t in completed(result.study)]
    assert result.best.score == min(scores)
    assert result.study.directions[0].name == "MINIMIZE"


def test_the_classification_one_liner_reads_shapes_and_classes_from_the_loaders(folder):
    task = classification_task(folder)
    assert task.metric == "accuracy" and task.direction == "maximize"
    assert tuple(task.example_inputs.shape) == (1, 3, 64, 64)
    assert task.model_kwargs() == {"in_channels": 3, "image_size": 64, "num_classes": 3}


def test_training_batches_are_the_same_for_the_same_seed_and_streamed(folder):
    task = classification_task(folder)
    CountingFolder.reads = 0
    first = [b[0] for _, b in zip(range(3), task.train_batches(5))]
    assert CountingFolder.reads == 3 * 8  # read batch by batch as they are asked for, not loaded whole
    again = [b[0] for _, b in zip(range(3), task.train_batches(5))]
    other = [b[0] for _, b in zip(range(3), task.train_batches(6))]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # shuffling and random flips alike
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    torch.manual_seed(123)
    outside = torch.rand(1)
    torch.manual_seed(123)
    next(iter(task.train_batches(5)))
    assert torch.equal(torch.rand(1), outside)  # the seeded state is the task's own, not the caller's


def test_worker_processes_give_the_same_batches_for_the_same_seed(folder):
    task = classification_task(folder, num_workers=2)
    first = [b[1] for _, b in zip(range(4), task.train_batches(1))]
    again = [b[1] for _, b in zip(range(4), task.train_batches(1))]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_score_functions_that_fail_or_return_nan_fail_their_candidate_and_the_search_goes_on(folder):
    calls = {"n": 0}

    def flaky(model, loader):
        calls["n"] += 1
        if calls["n"] == 1:  # the unpruned model
            return 0.5
        if calls["n"] % 3 == 0:
            raise ValueError("metric exploded")
        if calls["n"] % 3 == 1:
            return float("nan")
        return 0.25

    data = MaskedImages(folder)
    task = LoaderTask(DataLoader(data, batch_size=8, shuffle=True), DataLoader(data, batch_size=8),
                      loss_fn=lambda out, batch: F.cross_entropy(out, batch[1]), score_fn=flaky,
                      example_inputs=torch.zeros(1, 3, 64, 64), metric="miou")
    result = autoprune.search(Segmenter().eval(), task, {"flops": "60%"}, agent="random", trials=6, device="cpu")
    failed = [t for t in result.study.trials if t.state.name == "FAIL"]
    reasons = {t.user_attrs["fail_reason"] for t in failed}
    assert "score_fn raised ValueError: metric exploded" in reasons
    assert "score_fn returned miou = nan" in reasons
    assert len(completed(result.study)) >= 1 and result.policy is not None
    assert len(result.study.trials) == 6


def test_a_task_that_fails_on_the_unpruned_model_is_refused_before_the_search(folder):
    def broken(out, batch):
        return out.sum(1)  # not a scalar

    data = MaskedImages(folder)
    task = LoaderTask(DataLoader(data, batch_size=8), DataLoader(data, batch_size=8), loss_fn=broken,
                      score_fn=mean_iou, example_inputs=torch.zeros(1, 3, 64, 64), metric="miou")
    with pytest.raises(InputError, match="first training batch: loss_fn returned a tensor of shape"):
        autoprune.search(Segmenter().eval(), task, {"flops": "60%"}, device="cpu")


def test_no_search_reads_the_test_split_and_the_final_report_does(folder):
    seen = []
    data = MaskedImages(folder)
    val, test = DataLoader(data, batch_size=8), DataLoader(data, batch_size=16)

    def score(model, loader):
        seen.append("test" if loader is test else "val")
        return mean_iou(model, loader)

    task = LoaderTask(DataLoader(data, batch_size=8, shuffle=True), val, test=test,
                      loss_fn=lambda out, batch: F.cross_entropy(out, batch[1]), score_fn=score,
                      example_inputs=torch.zeros(1, 3, 64, 64), metric="miou")
    for agent in ("random", "icepick", "gates", "sensitivity"):
        seen.clear()
        result = autoprune.search(Segmenter().eval(), task, {"flops": "60%"}, agent=agent, finetune_steps=1,
                                  device="cpu", **AGENT_OPTIONS[agent])
        assert seen.count("test") == 2, agent  # the unpruned and the best model, once each, after the search
        assert "test" not in seen[:-2], agent
        assert result.policy.metrics["test_miou"] == result.best_test.score


def test_library_errors_name_the_setting_in_the_apis_words(folder):
    model, task = SmallNet().eval(), classification_task(folder)
    with pytest.raises(autoprune.ParameterError, match=r"^finetune_steps=-1: must be an integer >= 0$"):
        autoprune.search(model, task, {"flops": "50%"}, finetune_steps=-1)
    with pytest.raises(autoprune.ParameterError, match=r"^amc option warmup=-2: must be an integer >= 0$"):
        autoprune.search(model, task, {"flops": "50%"}, agent="amc", warmup=-2)
    with pytest.raises(autoprune.ParameterError, match=r"^budgets\['flops'\]='150%': outside \(0, 100%\]"):
        autoprune.search(model, task, {"flops": "150%"})
    with pytest.raises(autoprune.ParameterError, match=r"^trails=5: not a setting of the search .* nor an option "
                                                       r"of agent 'random' \(spread\)$"):
        autoprune.search(model, task, {"flops": "50%"}, agent="random", trails=5)
    with pytest.raises(InputError, match="task must be an autoprune.Task"):
        autoprune.search(model, object(), {"flops": "50%"})


def test_apply_without_a_task_prunes_only(folder):
    model, task = SmallNet().eval(), classification_task(folder)
    result = autoprune.search(model, task, {"flops": "50%"}, finetune_steps=1, device="cpu")
    pruned = autoprune.apply(model, result.policy, example_inputs=torch.zeros(1, 3, 64, 64))
    assert count_flops(pruned, task.example_inputs) == result.policy.metrics["flops"]
    first = pruned.features[0].weight  # the first conv is pinned: all its filters stay, untrained
    assert torch.equal(first, model.features[0].weight)
    tuned = autoprune.apply(model, result.policy, task, device="cpu")
    assert not torch.equal(tuned.features[0].weight, model.features[0].weight)  # fine-tuned as recorded


def test_loader_task_refuses_what_it_cannot_use(folder):
    loader = DataLoader(MaskedImages(folder), batch_size=8)
    with pytest.raises(InputError, match="train must be a torch.utils.data.DataLoader, not list"):
        LoaderTask([], loader, loss_fn=loss_of, score_fn=mean_iou, example_inputs=torch.zeros(1, 3))
    with pytest.raises(InputError, match="direction 'up': choose from maximize, minimize"):
        LoaderTask(loader, loader, loss_fn=loss_of, score_fn=mean_iou, example_inputs=torch.zeros(1, 3),
                   direction="up")
    with pytest.raises(InputError, match="example_inputs must hold at least one tensor"):
        LoaderTask(loader, loader, loss_fn=loss_of, score_fn=mean_iou, example_inputs=None)
    task = LoaderTask(loader, loader, loss_fn=loss_of, score_fn=lambda model, loader: {"other": 1.0},
                      example_inputs=torch.zeros(1, 3, 64, 64), metric="miou")
    with pytest.raises(CandidateError, match="score_fn returned no 'miou' among other"):
        task.score(Segmenter().eval())
    with pytest.raises(InputError, match="no 'test' loader"):
        task.score(Segmenter().eval(), "test")


def test_reading_the_objective_follows_the_direction():
    class Up(Task):
        metric, direction = "accuracy", "maximize"
        example_inputs = torch.zeros(1)

        def train_batches(self, seed, *, augment=True):
            return iter(())

        def loss(self, output, batch):
            return output

        def score(self, model, split="val"):
            return {"accuracy": 1.0}

    class Down(Up):
        metric, direction = "loss", "minimize"

    up, down = Up(), Down()
    assert up.shortfall(0.9, 0.8) == pytest.approx(0.1) and down.shortfall(0.2, 0.3) == pytest.approx(0.1)
    assert up.error(0.75) == 0.25 and down.error(0.4) == 0.4
    assert up.format(0.5) == "50.00%" and down.format(0.5) == "0.5"
    assert math.isnan(float("nan")) and up.format(float("nan")) == "-"


# -- the same from the shell: --task path/to/file.py:factory ---------------------------------------------

TASK_FILE = '''
import torchvision
from torch.utils.data import DataLoader
from torchvision import transforms

import autoprune


def make():
    images = torchvision.datasets.ImageFolder({root!r}, transform=transforms.ToTensor())
    return autoprune.LoaderTask.classification(DataLoader(images, batch_size=8, shuffle=True),
                                               DataLoader(images, batch_size=8), name="pngs")


def number():
    return 3
'''

MODEL_FILE = '''
from torch import nn


def net(num_classes):
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
'''


def cli(capsys, *argv):
    from autoprune.cli import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_task_factory_searches_from_the_shell_and_apply_and_workers_rebuild_it(folder, tmp_path, capsys):
    (tmp_path / "task.py").write_text(TASK_FILE.format(root=str(folder)))
    (tmp_path / "model.py").write_text(MODEL_FILE)
    storage = f"sqlite:///{tmp_path}/a.db"
    code, out, err = cli(capsys, "search", "--task", f"{tmp_path}/task.py:make", "--model", f"{tmp_path}/model.py:net",
                         "--budget-flops", "60%", "--agent", "random", "--trials", "2", "--finetune-steps", "1",
                         "--device", "cpu", "--storage", storage, "-o", str(tmp_path / "best.json"))
    assert code == 0, err
    policy = autoprune.Policy.load(tmp_path / "best.json")
    assert policy.model["source"]["task"] == f"{tmp_path}/task.py:make"
    assert policy.metrics["flops_ratio"] <= 0.6
    study = policy.search["study"]
    assert study == "model_net-pngs-random-flops60"

    code, out, err = cli(capsys, "apply", str(tmp_path / "best.json"), "--device", "cpu", "-o", str(tmp_path / "p.pt"))
    assert code == 0, err
    assert f"validation accuracy {policy.metrics['score']:.2%} after 1 fine-tune steps" in out

    code, out, err = cli(capsys, "worker", "--study", study, "--storage", storage, "--trials", "4", "--device", "cpu")
    assert code == 0, err
    assert "worker added 2 trial(s)" in out


@pytest.mark.parametrize("factory, message", [
    ("nope", "no function 'nope' in task file"),
    ("number", "returned int, not an autoprune.Task"),
])
def test_a_task_factory_that_is_missing_or_gives_no_task_is_refused_in_one_line(folder, tmp_path, capsys, factory,
                                                                                message):
    (tmp_path / "task.py").write_text(TASK_FILE.format(root=str(folder)))
    code, out, err = cli(capsys, "search", "--task", f"{tmp_path}/task.py:{factory}", "--budget-flops", "50%",
                         "--storage", f"sqlite:///{tmp_path}/a.db")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err
    code, out, err = cli(capsys, "search", "--task", f"{tmp_path}/missing.py:make", "--budget-flops", "50%")
    assert code == 2 and "task file" in err and "does not exist" in err
