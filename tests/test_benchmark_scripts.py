"""The benchmark scripts treat bad input as the command line does: one line on stderr, exit code 2."""

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
