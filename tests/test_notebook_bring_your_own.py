"""notebooks/bring_your_own.ipynb prunes a user model fed by DataLoaders and scored by a custom metric, top
to bottom, in a real Jupyter kernel."""

from pathlib import Path

import nbclient
import nbformat

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "bring_your_own.ipynb"


def test_the_bring_your_own_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPRUNE_NB_TRAIN_STEPS", "60")
    monkeypatch.setenv("AUTOPRUNE_NB_TRIALS", "3")
    monkeypatch.setenv("AUTOPRUNE_NB_FINETUNE_STEPS", "3")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                            ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(str(o.get("text", "")) for o in outputs)
    assert "| uniform |" in text and "| random |" in text  # both searches, in one table
    assert "recorded f1" in text and "re-applied f1" in text  # apply reproduced the recorded objective
    assert (tmp_path / "best.json").is_file()
