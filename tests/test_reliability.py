"""Interrupted searches resume, several workers share one study (SQLite and a real PostgreSQL)."""

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from autoprune.config import SearchConfig, SourceConfig
from autoprune.errors import InputError
from autoprune.runner import prepare, run_search, run_worker
from autoprune.study import completed, load_study

STUDY = "workers"
SEARCH = ["--agent", "random", "--budget-flops", "50%", "--pretrain-steps", "40", "--study", STUDY]


def cli(*argv, **kw):
    return subprocess.Popen([sys.executable, "-m", "autoprune.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


def wait_for_trials(storage, n, proc, limit=240):
    t0 = time.time()
    while time.time() - t0 < limit:
        try:
            if len(completed(load_study(STUDY, storage))) >= n:
                return
        except InputError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"search ended early: {proc.stderr.read()}")
        time.sleep(0.5)
    raise AssertionError("no trials appeared in time")


def states(storage):
    trials = load_study(STUDY, storage).get_trials(deepcopy=False)
    return [t.state for t in trials], trials


# `autoprune search`, whose third candidate signals (by creating a file) that it is being evaluated and then
# takes long: a Ctrl-C sent once the file exists arrives in the middle of that candidate, never between two
HELD_SEARCH = """
import pathlib, sys, time
import autoprune.evaluator
from autoprune.cli import main

flag, real = pathlib.Path(sys.argv[1]), autoprune.evaluator.Evaluator.evaluate

def evaluate(self, policy, finetune_steps=0, split="val"):
    if self.evaluations == 2:
        flag.touch()
        time.sleep(120)
    return real(self, policy, finetune_steps, split)

autoprune.evaluator.Evaluator.evaluate = evaluate
sys.argv = ["autoprune", *sys.argv[2:]]
sys.exit(main())
"""


def test_ctrl_c_marks_the_running_trial_failed_and_the_same_command_resumes(tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db"
    script, flag = tmp_path / "held_search.py", tmp_path / "third-candidate"
    script.write_text(HELD_SEARCH)
    proc = subprocess.Popen([sys.executable, str(script), str(flag), "search", *SEARCH, "--trials", "40",
                             "--storage", storage, "-o", str(tmp_path / "b.json")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    t0 = time.time()
    while not flag.exists():
        assert proc.poll() is None, f"search ended early: {proc.stderr.read()}"
        assert time.time() - t0 < 240, "the third candidate never started"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "run autoprune search" in err and "again to resume" in err
    st, trials = states(storage)
    kept = st.count(optuna.trial.TrialState.COMPLETE)
    # the two candidates before are kept; the one interrupted is a failed trial that says so
    assert kept == 2
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert [t.user_attrs["fail_reason"] for t in failed] == ["interrupted by the user"]
    assert len(trials) == 3 and trials[-1].state == optuna.trial.TrialState.FAIL

    # killed outright in the middle of a candidate: nothing completed is lost
    proc = cli("search", *SEARCH, "--trials", "40", "--storage", storage, "-o", str(tmp_path / "b.json"))
    wait_for_trials(storage, kept + 1, proc)
    proc.kill()
    proc.wait(timeout=60)
    st, _ = states(storage)
    after_kill = st.count(optuna.trial.TrialState.COMPLETE)
    assert after_kill >= kept + 1

    # the same command, with a trial count already nearly reached, resumes and finishes
    total = len(st) + 1
    proc = cli("search", *SEARCH, "--trials", str(total), "--storage", storage, "-o", str(tmp_path / "b.json"))
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    st, trials = states(storage)
    assert len(st) == total
    assert st.count(optuna.trial.TrialState.COMPLETE) == after_kill + 1
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len({t.user_attrs["policy"] for t in done}) == after_kill + 1


def _search(storage, agent, **settings):
    """A search as `autoprune search` runs it (its source recorded, so that workers can rebuild it)."""
    setup = prepare(SourceConfig(pretrain_steps=40), device="cpu")
    config = SearchConfig(agent=agent, budgets={"flops": "50%"}, storage=storage, study=STUDY, device="cpu",
                          bn_batches=3, **settings)
    return run_search(setup.model, setup.task, config, info=setup.info, final=False)


def _seed_study(storage):
    _search(storage, "random", trials=1)


def _three_workers(storage, total):
    procs = [cli("worker", "--study", STUDY, "--storage", storage, "--trials", str(total), "--device", "cpu")
             for _ in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=400)
        assert p.returncode == 0, err
    trials = load_study(STUDY, storage).get_trials(deepcopy=False)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == len(trials), "a trial was lost or left unfinished"
    # every worker checks the shared count before each candidate: at most one extra per other worker
    assert total <= len(done) <= total + 2
    assert len({t.user_attrs["policy"] for t in done}) == len(done), "a candidate was evaluated twice"
    assert all(t.user_attrs["feasible"] for t in done)


def test_three_workers_share_one_sqlite_study(tmp_path):
    storage = f"sqlite:///{tmp_path}/w.db"
    _seed_study(storage)
    _three_workers(storage, 7)


def test_icepick_workers_share_one_study_across_processes(tmp_path):
    """Two `autoprune worker` processes join an ICE-Pick search: their TPE samplers read the runs recorded
    in the shared study (the paper's values, run by the search, are not run again by either), and the
    study's trial count is shared between them."""
    from autoprune.agents.icepick import PAPER_DEFAULTS

    storage = f"sqlite:///{tmp_path}/w.db"
    options = {"max_steps": 2, "probe_steps": 0, "startup": 1}
    _search(storage, "icepick", trials=1, agent_options=options)
    procs = [cli("worker", "--study", STUDY, "--storage", storage, "--trials", "3", "--device", "cpu")
             for _ in range(2)]
    added = 0
    for p in procs:
        out, err = p.communicate(timeout=400)
        assert p.returncode == 0, err
        added += int(re.search(r"worker added (\d+) trial", out).group(1))
    trials = load_study(STUDY, storage).get_trials(deepcopy=False)
    assert len(trials) == 1 + added and 3 <= len(trials) <= 4  # one extra at most: the other worker's
    assert all(t.state == optuna.trial.TrialState.COMPLETE and len(t.values) == 2 for t in trials)
    paper = dict(PAPER_DEFAULTS, finetune_steps=2)
    assert [t.params == pytest.approx(paper) for t in trials].count(True) == 1 and trials[0].params == pytest.approx(
        paper)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == len(trials)  # no run twice


def _pg_binary(name):
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    return found


def _unavailable(reason):
    """Skip, saying why; but in CI (``CI=true``, as .ci/run sets it) a PostgreSQL test that cannot run fails
    the run, so that a green CI always includes it."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and the PostgreSQL test cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def postgres(tmp_path):
    """A real PostgreSQL server on 127.0.0.1, started for the test and stopped after it."""
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        _unavailable("psycopg2 is not installed (it is in the dev extras)")
    initdb, pg_ctl = _pg_binary("initdb"), _pg_binary("pg_ctl")
    if not initdb or not pg_ctl:
        _unavailable("PostgreSQL server binaries are not installed (.ci/run installs the postgresql package)")
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="autoprune-pg-"))  # pytest's folders are private to root
    run_as = []
    if os.geteuid() == 0:  # the server refuses to run as root
        run_as = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    init = subprocess.run([*run_as, initdb, "-D", str(data), "-U", "autoprune", "--auth=trust"],
                          capture_output=True, text=True)
    if init.returncode != 0:
        _unavailable(f"PostgreSQL initdb failed: {init.stderr.strip()[:200]}")
    start = subprocess.run([*run_as, pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                            f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"], capture_output=True,
                           text=True)
    if start.returncode != 0:
        _unavailable(f"PostgreSQL could not be started: {start.stderr.strip()[:200]}")
    yield f"postgresql+psycopg2://autoprune@127.0.0.1:{port}/postgres"
    subprocess.run([*run_as, pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


def test_in_ci_a_postgresql_test_that_cannot_run_fails_rather_than_skips(monkeypatch):
    def outcome(reason):
        try:
            _unavailable(reason)
        except BaseException as e:  # pytest's skip and fail are exceptions; catch both to tell them apart
            return e
        raise AssertionError("neither skipped nor failed")

    monkeypatch.setenv("CI", "true")
    failed = outcome("no server")
    assert isinstance(failed, pytest.fail.Exception), repr(failed)
    assert str(failed) == "CI=true and the PostgreSQL test cannot run: no server"
    monkeypatch.delenv("CI")
    skipped = outcome("no server")
    assert isinstance(skipped, pytest.skip.Exception) and str(skipped) == "no server", repr(skipped)


def test_three_workers_share_one_postgresql_study(postgres):
    _seed_study(postgres)
    _three_workers(postgres, 7)


def test_agents_that_cannot_share_a_study_refuse_workers(tmp_path):
    storage = f"sqlite:///{tmp_path}/u.db"
    _search(storage, "uniform")
    with pytest.raises(InputError, match="cannot share its study.*random"):
        run_worker(STUDY, storage, device="cpu")
