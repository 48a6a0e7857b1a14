"""The command line end to end: search, export, apply, listings, and one-line errors for bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autoprune.cli import main
from autoprune.policy import Policy


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One real search on the embedded default (a briefly pretrained ResNet-20 on digits)."""
    d = tmp_path_factory.mktemp("search")
    storage = f"sqlite:///{d}/autoprune.db"
    code = main(["search", "--agent", "random", "--trials", "3", "--finetune-steps", "10", "--budget-flops",
                 "50%", "--pretrain-steps", "40", "--storage", storage, "-o", str(d / "best.json")])
    assert code == 0
    return d, storage


def test_search_exports_a_feasible_policy(searched):
    d, _ = searched
    policy = Policy.load(d / "best.json")
    assert policy.metrics["flops_ratio"] <= 0.5
    assert policy.metrics["flops"] <= 0.5 * policy.metrics["base"]["flops"]
    assert policy.model["name"] == "resnet20" and policy.model["dataset"] == "digits"
    assert policy.search["agent"] == "random" and policy.search["finetune_steps"] == 10
    assert policy.model["source"]["model"] == "resnet20"  # what worker and apply rebuild the model from
    assert policy.metrics["metric"] == "accuracy" and policy.metrics["score"] == policy.metrics["accuracy"]
    assert 0 <= policy.metrics["test_accuracy"] == policy.metrics["test_score"] <= 1


def test_export_writes_the_best_trial(searched, capsys, tmp_path):
    d, storage = searched
    code, out, _ = run(capsys, "export", "--study", "resnet20-digits-random-flops50", "--storage", storage,
                       "-o", str(tmp_path / "again.json"))
    assert code == 0 and "exported trial" in out
    again = Policy.load(tmp_path / "again.json")
    assert again.ratios == Policy.load(d / "best.json").ratios


def test_apply_reproduces_the_recorded_flops_and_accuracy(searched, capsys, tmp_path):
    d, _ = searched
    policy = Policy.load(d / "best.json")
    code, out, _ = run(capsys, "apply", str(d / "best.json"), "-o", str(tmp_path / "pruned.pt"))
    assert code == 0
    assert f"validation accuracy {policy.metrics['accuracy']:.2%}" in out
    model = torch.load(tmp_path / "pruned.pt", weights_only=False)
    from autoprune.cost import count_flops

    x = torch.zeros(1, 1, 8, 8)
    assert model(x).shape == (1, 10)
    assert count_flops(model, x) == policy.metrics["flops"]


def test_second_search_with_the_same_name_resumes(searched, capsys):
    d, storage = searched
    code, out, _ = run(capsys, "search", "--agent", "random", "--trials", "3", "--finetune-steps", "10",
                       "--budget-flops", "50%", "--pretrain-steps", "40", "--storage", storage,
                       "-o", str(d / "best2.json"))
    assert code == 0
    assert "0 new trial(s)" in out


def test_report_command_writes_the_plots_and_the_page(searched, capsys, tmp_path):
    _, storage = searched
    code, out, err = run(capsys, "report", "--study", "resnet20-digits-random-flops50", "--storage", storage,
                         "-o", str(tmp_path / "report"))
    assert code == 0, err
    written = [line[len("wrote "):] for line in out.splitlines() if line.startswith("wrote ")]
    assert {"accuracy_vs_flops.png", "ratios.png", "index.html"} <= {Path(w).name for w in written}
    assert all(Path(w).parent == tmp_path / "report" and Path(w).stat().st_size > 1000 for w in written)
    assert "resnet20-digits-random-flops50" in (tmp_path / "report" / "index.html").read_text()


def test_listings(capsys):
    code, out, _ = run(capsys, "agents")
    assert code == 0 and "uniform" in out and "random" in out
    code, out, _ = run(capsys, "models")
    assert code == 0 and "resnet20" in out and "digits" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["search", "--budget-flops", "150%"], "--budget-flops 150%: outside (0, 100%]"),
        (["search", "--budget-flops", "0"], "--budget-flops 0: outside (0, 100%]"),
        (["search", "--budget-flops", "-5%"], "--budget-flops -5%: outside (0, 100%]"),
        (["search", "--budget-flops", "abc"], "--budget-flops abc: not a budget"),
        (["search"], "at least one budget"),
        (["search", "--budget-flops", "50%", "--agent", "nope"], "--agent nope: unknown agent; choose from"),
        (["search", "--budget-flops", "50%", "--model", "resnet21"], "resnet21"),
        (["search", "--budget-flops", "50%", "--dataset", "imagenet22k"], "imagenet22k"),
        (["search", "--budget-flops", "50%", "--dataset", "cifar10", "--data-root", "/no/such/dir"],
         "does not exist"),
        (["search", "--budget-flops", "50%", "--criterion", "magic"], "--criterion magic: unknown criterion"),
        (["search", "--budget-flops", "50%", "--random-spread", "0.5", "--agent", "uniform"],
         "--random-spread applies to --agent random"),
        (["search", "--budget-flops", "50%", "--trials", "0"], "--trials 0: must be an integer >= 1"),
        (["search", "--budget-flops", "50%", "--finetune-steps", "-1"], "--finetune-steps -1: must be an integer >= 0"),
        (["search", "--budget-flops", "50%", "--agent", "amc", "--amc-warmup", "-3"],
         "--amc-warmup -3: must be an integer >= 0"),
        (["search", "--budget-flops", "50%", "--granularity", "foo"], "--granularity foo: choose channel"),
        (["search", "--no-such-flag"], "unrecognized arguments"),
        (["export", "--study", "nope", "--storage", "sqlite:///{tmp}/x.db", "-o", "{tmp}/p.json"], "no study"),
        (["apply", "{tmp}/missing.json", "-o", "{tmp}/p.pt"], "does not exist"),
    ],
)
def test_bad_input_gives_one_line_and_exit_code_2(capsys, tmp_path, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autoprune: error:")
    assert message in lines[0]
    assert "Traceback" not in err


def test_checkpoint_that_does_not_fit_the_model_is_refused(capsys, tmp_path):
    from autoprune.models import build_model

    torch.save(build_model("resnet32", 1, 10, 8).state_dict(), tmp_path / "r32.pt")
    code, _, err = run(capsys, "search", "--budget-flops", "50%", "--checkpoint", str(tmp_path / "r32.pt"))
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_policy_for_another_model_is_refused(searched, capsys, tmp_path):
    d, _ = searched
    code, _, err = run(capsys, "apply", str(d / "best.json"), "--model", "mobilenet_v2", "--checkpoint",
                       str(_mobilenet_checkpoint(tmp_path)), "-o", str(tmp_path / "p.pt"))
    assert code == 2
    assert "policy does not fit mobilenet_v2" in err and "resnet20" in err


def _mobilenet_checkpoint(tmp_path):
    from autoprune.models import build_model

    path = tmp_path / "mbv2.pt"
    torch.save(build_model("mobilenet_v2", 1, 10, 8).state_dict(), path)
    return path


def test_malformed_policy_is_refused(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "autoprune.policy/1", "ratios": {"x": 2}}))
    code, _, err = run(capsys, "apply", str(bad), "-o", str(tmp_path / "p.pt"))
    assert code == 2 and "in [0, 1)" in err


def test_console_script_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "autoprune.cli", "search", "--budget-flops", "150%"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("autoprune: error:") and "Traceback" not in proc.stderr


def test_an_unexpected_error_is_one_line_exit_1_and_a_log_with_the_traceback(capsys, tmp_path, monkeypatch):
    import autoprune.runner

    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke\nsecond line")

    monkeypatch.setenv("AUTOPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("AUTOPRUNE_DEBUG", raising=False)
    monkeypatch.setattr(autoprune.runner, "prepare", broken)
    code, _, err = run(capsys, "search", "--budget-flops", "50%", "--storage", f"sqlite:///{tmp_path}/a.db")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "search failed: RuntimeError: something inside broke (traceback in " in lines[0]
    logs = list((tmp_path / "cache" / "logs").glob("autoprune-search-*.log"))
    assert len(logs) == 1 and "Traceback" in logs[0].read_text() and "second line" in logs[0].read_text()
    monkeypatch.setenv("AUTOPRUNE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="something inside broke"):
        main(["search", "--budget-flops", "50%", "--storage", f"sqlite:///{tmp_path}/a.db"])


def test_the_flags_come_from_the_typed_configuration_with_readable_metavars(capsys):
    from dataclasses import fields

    from autoprune.config import SearchConfig, SourceConfig

    with pytest.raises(SystemExit):
        main(["search", "--help"])
    text = capsys.readouterr().out
    for f in fields(SearchConfig) + fields(SourceConfig):
        if f.metadata.get("flag", True):
            assert "--" + f.name.replace("_", "-") in text, f.name
    assert "--amc-warmup N" in text and "--sensitivity-ratios R[,R...]" in text and "AGENTOPT" not in text
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    compare = capsys.readouterr().out
    assert "--finetune-lr LR" in compare and "--bn-batches N" in compare and "--distill X" in compare
