"""The benchmark scripts treat bad input as the command line does: one line on stderr, exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
WITH_DATA_ROOT = ("criteria", "gates_vs_uniform", "icepick_vs_iterative", "latency", "proxy", "quality")


@pytest.mark.parametrize("script", WITH_DATA_ROOT)
def test_a_missing_data_folder_is_one_line_and_exit_2(script, tmp_path):
    missing = tmp_path / "no-such-folder"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / f"{script}.py"), "--dataset", "fashionmnist",
                           "--data-root", str(missing)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(missing) in lines[0]


def test_quality_refuses_a_results_file_of_another_final_fine_tune(tmp_path):
    """Rows already in results.json are not measured again, so a run with another --final-steps into the same
    folder would report them as its own: it is refused in one line, before any data is read."""
    out = tmp_path / "q"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({
        "base": {"resnet20": {"test": 0.94, "val": 0.94, "pretrain_steps": 8000}},
        "resnet20|30|0|uniform": {"model": "resnet20", "budget": 30.0, "seed": 0, "method": "uniform",
                                  "feasible": True, "test": 0.92, "final_steps": 300}}))
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "quality.py"), "--final-steps", "1500", "-o", str(out),
                           "--data-root", str(tmp_path / "no-such-folder")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "final fine-tunes of 300 steps" in lines[0] and "--final-steps 1500" in lines[0]
