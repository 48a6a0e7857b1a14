"""Pretraining reports its progress: the running loss, and the validation objective along the way."""

import torch

from autoprune.models import build_model
from autoprune.pretrain import train_model


def test_training_reports_loss_and_validation_objective_along_the_way(digits, digits_task):
    model = build_model("resnet20", digits.in_channels, digits.num_classes, digits.image_size)
    calls = []
    final = train_model(model, digits_task, 40, device=torch.device("cpu"), checkpoints=4,
                        progress=lambda done, total, status: calls.append((done, total, status)))
    assert calls[0] == (0, 40, "")
    assert all(total == 40 for _, total, _ in calls)
    done = [d for d, _, _ in calls]
    assert done == sorted(done) and done[-1] == 40
    assert any("loss " in s for _, _, s in calls[1:-1])
    # the validation objective at the checkpoints (steps 10, 20, 30) and at the end
    assert {d for d, _, s in calls if "validation accuracy" in s} >= {10, 20, 30, 40}
    assert calls[-1][2] == f"validation accuracy {final:.2%}"


def test_train_command_shows_a_progress_bar(tmp_path, monkeypatch, capsys):
    from autoprune.cli import main

    monkeypatch.setenv("AUTOPRUNE_CACHE", str(tmp_path))
    assert main(["train", "--steps", "30"]) == 0
    out = capsys.readouterr().out
    assert "training" in out and "30/30" in out and "validation accuracy" in out
