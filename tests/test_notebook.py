"""The notebooks run top to bottom in a real Jupyter kernel: inspect_study.ipynb on the embedded default,
bring_your_own.ipynb on a model, DataLoaders and metric of its own."""

import re
from pathlib import Path

import nbclient
import nbformat

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def run_notebook(name: str, folder: Path) -> list:
    """Execute ``notebooks/<name>`` in ``folder`` and return its outputs (refusing one saved with outputs
    or raising in a cell)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(folder)}}
                            ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    return outputs


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPRUNE_NB_STORAGE", f"sqlite:///{tmp_path}/nb.db")
    monkeypatch.setenv("AUTOPRUNE_NB_TRIALS", "3")
    monkeypatch.setenv("AUTOPRUNE_NB_FINETUNE_STEPS", "0")
    monkeypatch.setenv("AUTOPRUNE_NB_FINAL_STEPS", "3")
    monkeypatch.setenv("AUTOPRUNE_NB_PRETRAIN_STEPS", "40")
    outputs = run_notebook("inspect_study.ipynb", tmp_path)
    text = "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/markdown", "")) for o in outputs)
    assert "| uniform |" in text and "| random |" in text  # the comparison table
    # the best trial of each agent, its objective read under the task's metric name
    assert re.search(r"uniform: trial \d+, accuracy \d+\.\d+%", text)
    assert re.search(r"random: trial \d+, accuracy \d+\.\d+%", text)
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # accuracy vs FLOPs, per-group ratios


def test_the_bring_your_own_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPRUNE_NB_TRAIN_STEPS", "60")
    monkeypatch.setenv("AUTOPRUNE_NB_TRIALS", "3")
    monkeypatch.setenv("AUTOPRUNE_NB_FINETUNE_STEPS", "3")
    outputs = run_notebook("bring_your_own.ipynb", tmp_path)
    text = "".join(str(o.get("text", "")) for o in outputs)
    assert "| uniform |" in text and "| random |" in text  # both searches, in one table
    assert "recorded f1" in text and "re-applied f1" in text  # apply reproduced the recorded objective
    assert (tmp_path / "best.json").is_file()
