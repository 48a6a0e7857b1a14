"""The README's table of refused input, row by row, through ``autoprune`` itself: exit code 2 and the
documented line on stderr (one line, no traceback). Rows that test_cli.py, test_granularity.py,
test_compare.py and test_tasks.py already hold are not repeated here."""

import optuna
import pytest
import torch

from autoprune.cli import main
from autoprune.models import build_model

# the embedded default as the other command-line tests prepare it (its 40-step weights cached per session)
MODEL = ["--pretrain-steps", "40", "--device", "cpu", "--bn-batches", "2"]


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path, monkeypatch):
    """Whatever a command writes by default (autoprune.db, best.json) lands in the test's folder."""
    monkeypatch.chdir(tmp_path)


def refused(capsys, *argv):
    """Run ``autoprune argv`` and return its one line of stderr, having checked exit code 2."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2, (code, out[-500:], err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autoprune: error: "), err
    return lines[0][len("autoprune: error: "):]


@pytest.mark.parametrize(
    "argv, line",
    [
        (["--budget-flops", "0%"], "--budget-flops 0%: outside (0, 100%]: a budget keeps part of the original model"),
        (["--budget-flops", "50"], "--budget-flops 50: ambiguous: write 50% for a percentage or add a unit (K, M, G)"),
        (["--budget-latency", "3M"], "--budget-latency 3M: a latency needs a unit (s, ms or us) or %; "),
        ([], "give at least one budget: budgets={'flops': '50%'} (--budget-flops 50%), params, latency or energy"),
        (["--budget-flops", "50%", "--max-ratio", "1"], "--max-ratio 1: must be a number > 0 and < 1"),
        (["--budget-flops", "50%", "--criterion", "magic"],
         "--criterion magic: unknown criterion; choose from l1, l2, bn-scale, taylor, hessian, apoz, entropy, "
         "lamp, fpgm, regression, random, lda, correlation"),
        (["--budget-flops", "50%", "--model", "resnet21"], "unknown model 'resnet21'"),
        (["--budget-flops", "50%", "--dataset", "imagenet22k"],
         "unknown dataset 'imagenet22k'; choose one of: digits, cifar10, cifar100, mnist, fashionmnist, imagefolder"),
        (["--budget-flops", "50%", "--model", "torchvision:nope"],
         "unknown torchvision model 'nope'; torchvision classification models are: alexnet, "),
    ],
    ids=["0%", "ambiguous", "latency-unit", "no-budget", "max-ratio", "criterion", "zoo", "dataset", "torchvision"],
)
def test_search_refuses_with_the_documented_line(capsys, argv, line):
    assert refused(capsys, "search", *argv).startswith(line)


def test_an_unknown_zoo_model_is_named_with_the_zoo(capsys):
    line = refused(capsys, "search", "--budget-flops", "50%", "--model", "resnet21")
    assert "resnet20" in line and "mobilenet_v2" in line and "torchvision:NAME" in line


def test_a_missing_model_file_or_factory_is_named(capsys, tmp_path):
    line = refused(capsys, "search", "--budget-flops", "50%", "--model", f"{tmp_path}/nets.py:net")
    assert line == f"model file '{tmp_path}/nets.py' does not exist (from '{tmp_path}/nets.py:net')"
    (tmp_path / "nets.py").write_text("def tiny():\n    return None\n")
    line = refused(capsys, "search", "--budget-flops", "50%", "--model", f"{tmp_path}/nets.py:net")
    assert line == f"no function 'net' in model file '{tmp_path}/nets.py'; functions defined there: tiny"


def test_missing_dataset_files_say_what_was_expected_and_that_download_fetches_them(capsys, tmp_path):
    line = refused(capsys, "search", "--budget-flops", "50%", "--dataset", "cifar10", "--data-root", str(tmp_path))
    assert line.startswith(f"cifar10 files not found under --data-root '{tmp_path}': expected cifar-10-batches-py/")
    assert line.endswith("--download fetches them")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available here")
def test_cuda_without_a_gpu_is_refused(capsys):
    assert refused(capsys, "search", "--budget-flops", "50%", "--device", "cuda") == (
        "--device cuda: no CUDA device is available here; use auto or cpu")


def test_checkpoints_of_another_architecture_or_not_a_state_dict_are_refused(capsys, tmp_path):
    torch.save(build_model("vgg16_bn", 1, 10, 8).state_dict(), tmp_path / "vgg.pt")
    line = refused(capsys, "search", "--budget-flops", "50%", "--checkpoint", str(tmp_path / "vgg.pt"))
    # how many keys are missing or unexpected, and the first of each
    assert line == (f"checkpoint '{tmp_path}/vgg.pt' does not fit the model: 128 keys missing (first "
                    "'conv1.weight'); 82 keys unexpected (first 'features.0.weight')")
    torch.save(build_model("resnet20", 1, 10, 8), tmp_path / "whole.pt")
    line = refused(capsys, "search", "--budget-flops", "50%", "--checkpoint", str(tmp_path / "whole.pt"))
    assert "cannot be loaded with weights_only=True" in line and "it must be a state dict" in line


def test_refusals_that_need_the_model(capsys, tmp_path):
    """Rows judged once the model is built: an absolute budget above it, a budget nothing meets, an
    --ignore pattern matching none of its modules."""
    storage = ["--storage", f"sqlite:///{tmp_path}/a.db", "-o", str(tmp_path / "best.json")]
    assert refused(capsys, "search", "--budget-flops", "10G", *MODEL, *storage) == (
        "--budget-flops 10G: the unpruned model needs only 2.533M, so the budget is above 100 %")
    assert refused(capsys, "search", "--budget-flops", "1%", *MODEL, *storage).startswith(
        "budget cannot be met: removing 90% of every prunable group still leaves flops ")
    assert refused(capsys, "search", "--budget-flops", "50%", "--ignore", "layer9.*", *MODEL, *storage) == (
        "--ignore 'layer9.*' matches no module of the model")


def test_a_study_is_resumed_only_with_its_own_options_objectives_and_latency_batch(capsys, tmp_path,
                                                                                 deterministic_latency):
    storage = ["--storage", f"sqlite:///{tmp_path}/a.db", "-o", str(tmp_path / "best.json")]
    search = ["search", "--agent", "random", "--trials", "1", "--budget-flops", "50%", *MODEL, *storage]
    assert main([*search, "--study", "r", "--random-spread", "0.5"]) == 0
    capsys.readouterr()
    assert refused(capsys, *search, "--study", "r", "--random-spread", "0.7") == (
        "--random-spread 0.7: study 'r' was searched with 0.5; give the same options to resume it, or another "
        "study name")
    optuna.create_study(study_name="two", storage=storage[1], directions=["maximize", "minimize"])
    assert refused(capsys, *search, "--study", "two") == (
        "study 'two' has 2 objective(s) but agent 'random' records 1; choose another --study name")
    latency = ["search", "--budget-latency", "90%", "--study", "lat", *MODEL, *storage]
    assert main([*latency, "--latency-batch", "8"]) == 0
    capsys.readouterr()
    assert refused(capsys, *latency) == (
        "--latency-batch 1: study 'lat' timed latency at batch 8; use that, or another study name")


def test_export_report_and_worker_of_a_study_that_is_not_there_list_the_studies(capsys, tmp_path):
    storage = f"sqlite:///{tmp_path}/a.db"
    for name in ("first", "second"):
        optuna.create_study(study_name=name, storage=storage)
    there = f"no study named 'nope' in {storage}; studies there: first, second"
    assert refused(capsys, "export", "--study", "nope", "--storage", storage, "-o", str(tmp_path / "p.json")) == there
    assert refused(capsys, "report", "--study", "nope", "--storage", storage, "-o", str(tmp_path / "r")) == there
    assert refused(capsys, "worker", "--study", "nope", "--storage", storage) == there


def test_a_worker_for_an_agent_that_cannot_share_its_study_is_refused(capsys, tmp_path):
    storage = f"sqlite:///{tmp_path}/a.db"
    assert main(["search", "--agent", "uniform", "--budget-flops", "50%", *MODEL, "--storage", storage,
                 "-o", str(tmp_path / "best.json")]) == 0
    capsys.readouterr()
    assert refused(capsys, "worker", "--study", "resnet20-digits-uniform-flops50", "--storage", storage) == (
        "agent 'uniform' runs in one process and cannot share its study with workers; agents that can: icepick, "
        "random, sensitivity")


@pytest.mark.parametrize(
    "policy, line",
    [
        ("{", "{path}: not valid JSON ("),
        ('{"schema": "other/1", "ratios": {"a": 0.5}}', "{path}: unsupported schema 'other/1'"),
        ('{"schema": "autoprune.policy/1", "ratios": {"a": 0.5}, "model": {"name": "Net", "source": "python"}}',
         "the policy was searched from Python (model 'Net'); apply it with autoprune.apply(model, policy, task), "
         "or give --model"),
    ],
    ids=["malformed", "schema", "python"],
)
def test_apply_refuses_policies_it_cannot_rebuild(capsys, tmp_path, policy, line):
    path = tmp_path / "policy.json"
    path.write_text(policy)
    assert refused(capsys, "apply", str(path), "-o", str(tmp_path / "p.pt")).startswith(line.format(path=path))


TASK_FILE = '''
import torch
from torch.utils.data import DataLoader, TensorDataset

import autoprune

data = TensorDataset(torch.randn(32, 3, 8, 8), torch.arange(32) % 4)


def score_fails():
    def score(model, loader):
        raise ValueError("no labels here")

    return autoprune.LoaderTask(DataLoader(data, batch_size=8), DataLoader(data, batch_size=8),
                                loss_fn=lambda out, batch: torch.nn.functional.cross_entropy(out, batch[1]),
                                score_fn=score, example_inputs=torch.zeros(1, 3, 8, 8))


def loss_fails():
    return autoprune.LoaderTask(DataLoader(data, batch_size=8), DataLoader(data, batch_size=8),
                                loss_fn=lambda out, batch: out.sum(1), score_fn=lambda model, loader: 0.5,
                                example_inputs=torch.zeros(1, 3, 8, 8))


def fails():
    raise RuntimeError("the data server is down")
'''

MODEL_FILE = '''
from torch import nn


def net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
'''


@pytest.mark.parametrize(
    "factory, line",
    [
        ("score_fails", "the task's score fails on the unpruned model (val split): score_fn raised ValueError: "
                        "no labels here"),
        ("loss_fails", "the task fails on the unpruned model's first training batch: loss_fn returned a tensor of "
                       "shape"),
        ("fails", "--task {tmp}/task.py:fails failed: RuntimeError: the data server is down"),
    ],
)
def test_a_task_that_fails_is_refused_before_the_search(capsys, tmp_path, factory, line):
    (tmp_path / "task.py").write_text(TASK_FILE)
    (tmp_path / "model.py").write_text(MODEL_FILE)
    got = refused(capsys, "search", "--task", f"{tmp_path}/task.py:{factory}", "--model", f"{tmp_path}/model.py:net",
                  "--budget-flops", "50%", "--device", "cpu", "--storage", f"sqlite:///{tmp_path}/a.db")
    assert got.startswith(line.format(tmp=tmp_path))
