"""The commands and defaults the README promises: `autoprune dashboard`, `train` and its cache
(`$AUTOPRUNE_CACHE`), the default storage `sqlite:///autoprune.db`, 20 batch-norm recalibration batches,
a test split no search reads, and the masked granularities' study names and dense layers."""

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest
import torch

import autoprune
import autoprune.evaluator
import autoprune.pretrain
from autoprune.cli import main
from autoprune.models import build_model
from autoprune.models.checkpoint import fingerprint
from autoprune.policy import Policy
from autoprune.task import ImageClassificationTask


def run(*argv):
    """``autoprune argv`` in this process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_serves_the_studies_of_the_storage(tmp_path):
    storage = f"sqlite:///{tmp_path}/a.db"
    optuna.create_study(study_name="resnet20-digits-random-flops50", storage=storage)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "autoprune.cli", "dashboard", "--storage", storage, "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0, body = time.time(), None
        while body is None:
            assert proc.poll() is None, proc.communicate()
            assert time.time() - t0 < 120, "the dashboard never answered"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                    body = json.loads(response.read())
            except OSError:
                time.sleep(0.3)
        assert [s["study_name"] for s in body["study_summaries"]] == ["resnet20-digits-random-flops50"]
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C stops it: the way a dashboard is meant to end
        out, err = proc.communicate(timeout=60)
    assert f"optuna-dashboard on http://127.0.0.1:{port}" in out
    assert proc.returncode == 0 and "Traceback" not in err


def test_train_caches_the_weights_under_autoprune_cache_and_a_second_run_reuses_them(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("AUTOPRUNE_CACHE", str(cache))
    code, out, err = run("train", "--steps", "3", "--device", "cpu", "-o", str(tmp_path / "w.pt"))
    assert code == 0, err
    cached = re.search(r"cached weights: (\S+)", out).group(1)
    assert os.path.dirname(cached) == str(cache) and os.path.isfile(cached)
    weights = torch.load(tmp_path / "w.pt", weights_only=True)
    assert {k: v.tolist() for k, v in torch.load(cached, weights_only=True).items()} == {
        k: v.tolist() for k, v in weights.items()}
    model = build_model("resnet20", 1, 10, 8)
    model.load_state_dict(weights)

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(autoprune.pretrain, "train_model", no_training)
    code, out, err = run("train", "--steps", "3", "--device", "cpu")
    assert code == 0 and f"cached weights: {cached}" in out, err
    # a search asking for the same pretraining loads the same cached weights
    code, _, err = run("search", "--pretrain-steps", "3", "--budget-flops", "50%", "--device", "cpu", "--bn-batches",
                       "1", "--storage", f"sqlite:///{tmp_path}/a.db", "-o", str(tmp_path / "best.json"))
    assert code == 0, err
    policy = Policy.load(tmp_path / "best.json")
    assert policy.model["checkpoint"] == cached and policy.model["weights"] == fingerprint(model)
    # without $AUTOPRUNE_CACHE: ~/.cache/autoprune
    monkeypatch.delenv("AUTOPRUNE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert autoprune.pretrain.cache_dir() == tmp_path / "home" / ".cache" / "autoprune"


def test_defaults_the_sqlite_file_in_the_working_folder_and_20_recalibration_batches(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    drawn = []
    real = autoprune.evaluator.recalibrate_bn

    def counting(model, task, batches, n, amp=False):
        def counted():
            for batch in batches:
                drawn[-1] += 1
                yield batch

        drawn.append(0)
        return real(model, task, counted(), n, amp)

    monkeypatch.setattr(autoprune.evaluator, "recalibrate_bn", counting)
    # the default agent (sensitivity) on layer3's four groups: 4 x 4 probes and the final policy
    code, out, err = run("search", "--budget-flops", "85%", "--pretrain-steps", "40", "--device", "cpu",
                         "--ignore", "layer1.*", "--ignore", "layer2.*")
    assert code == 0, err
    assert "optuna-dashboard sqlite:///autoprune.db" in out
    # every candidate, and the final model, was recalibrated on 20 training batches
    assert drawn and set(drawn) == {20}
    policy = Policy.load(tmp_path / "best.json")  # -o's default
    assert policy.search["bn_batches"] == 20 and policy.search["storage"] == "sqlite:///autoprune.db"
    name = "resnet20-digits-sensitivity-flops85"
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/autoprune.db")
    assert study.user_attrs["config"]["agent"] == "sensitivity" and study.user_attrs["sensitivity_scan"]
    # export and report read the same file when no --storage is given
    code, out, err = run("export", "--study", name, "-o", "again.json")
    assert code == 0 and Policy.load(tmp_path / "again.json").ratios == policy.ratios, err
    code, out, err = run("report", "--study", name, "-o", "report")
    assert code == 0 and (tmp_path / "report" / "index.html").is_file(), err


@pytest.mark.parametrize("agent, options", [
    ("uniform", {}),
    ("amc", {"warmup": 1}),
    ("netadapt", {"initial": 0.2, "long_steps": 1}),
])
def test_no_search_reads_the_test_split_of_a_built_in_dataset(trained_resnet20, digits_task, monkeypatch, agent,
                                                              options):
    """test_tasks.py proves it for the random, icepick, gates and sensitivity agents on a LoaderTask."""
    seen = []
    real = ImageClassificationTask.score

    def score(self, model, split):
        seen.append(split)
        return real(self, model, split)

    monkeypatch.setattr(ImageClassificationTask, "score", score)
    result = autoprune.search(trained_resnet20, digits_task, {"flops": "85%"}, agent=agent, trials=2, device="cpu",
                              bn_batches=1, ignore=["layer1.*", "layer2.*"], **options)
    assert seen.count("val") >= 2 and seen.count("test") == 2  # the unpruned and the best model, once each
    assert seen[-2:] == ["test", "test"]  # after every score of the search
    assert result.policy.metrics["test_accuracy"] == result.best_test.score


def test_an_unstructured_search_is_a_study_of_its_own(tmp_path):
    storage = f"sqlite:///{tmp_path}/a.db"
    args = ["--agent", "uniform", "--budget-flops", "70%", "--pretrain-steps", "40", "--device", "cpu", "--bn-batches",
            "1", "--storage",
            storage, "-o", str(tmp_path / "best.json")]
    assert run("search", *args)[0] == 0
    assert run("search", "--granularity", "unstructured", *args)[0] == 0
    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    assert names == {"resnet20-digits-uniform-flops70", "resnet20-digits-uniform-flops70-unstructured"}
    assert Policy.load(tmp_path / "best.json").search["study"] == "resnet20-digits-uniform-flops70-unstructured"


def test_n_of_m_lists_the_layers_it_leaves_dense_in_the_summary_and_the_policy(tmp_path):
    code, out, err = run("search", "--agent", "uniform", "--model", "mobilenet_v2", "--pretrain-steps", "0",
                         "--granularity", "2:4",
                         "--budget-flops", "80%", "--device", "cpu", "--bn-batches", "1", "--storage",
                         f"sqlite:///{tmp_path}/a.db", "-o", str(tmp_path / "best.json"))
    assert code == 0, err
    model = build_model("mobilenet_v2", 1, 10, 8)
    depthwise = [n for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1]
    # every depthwise conv (one input channel per group: no run of 4) but the first block's, whose channels
    # belong to the stem's pinned group and are not masked at all
    expected = [n for n in depthwise if n != "layers.0.conv2"]
    assert len(expected) == 16
    assert Policy.load(tmp_path / "best.json").search["dense_layers"] == expected
    text = " ".join(out.split())  # the terminal table wraps lines
    assert f"2:4 leaves 16 layer(s) dense (input dimension not a multiple of M, depthwise convs among them): " \
           f"{', '.join(expected[:6])} ..." in text
