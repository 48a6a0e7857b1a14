"""notebooks/inspect_study.ipynb runs top to bottom on the embedded default, in a real Jupyter kernel."""

import re
from pathlib import Path

import nbclient
import nbformat

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "inspect_study.ipynb"


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPRUNE_NB_STORAGE", f"sqlite:///{tmp_path}/nb.db")
    monkeypatch.setenv("AUTOPRUNE_NB_TRIALS", "3")
    monkeypatch.setenv("AUTOPRUNE_NB_FINETUNE_STEPS", "0")
    monkeypatch.setenv("AUTOPRUNE_NB_FINAL_STEPS", "3")
    monkeypatch.setenv("AUTOPRUNE_NB_PRETRAIN_STEPS", "40")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                            ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/markdown", "")) for o in outputs)
    assert "| uniform |" in text and "| random |" in text  # the comparison table
    # the best trial of each agent, its objective read under the task's metric name
    assert re.search(r"uniform: trial \d+, accuracy \d+\.\d+%", text)
    assert re.search(r"random: trial \d+, accuracy \d+\.\d+%", text)
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # accuracy vs FLOPs, per-group ratios
