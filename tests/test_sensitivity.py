"""The sensitivity agent: one probe per (group, ratio) kept in a scan study that searches at other
budgets, resumed searches and workers reuse; one threshold bisected to the budget; the report's plot."""

import json
import socket
import subprocess

import optuna
import pytest

from autoprune.agents import SearchContext, get_agent
from autoprune.agents.sensitivity import (
    PLATEAU_SLOPE,
    _Claims,
    bisect_threshold,
    monotone,
    ratio_at,
    ratios_at,
    scan_drops,
    scan_identity,
    scan_name,
)
from autoprune.budget import parse_budget
from autoprune.errors import InputError
from autoprune.evaluator import Evaluator
from autoprune.study import completed, load_study, open_study, record

# four groups (layer3's) and two ratios: eight probes per scan
IGNORE = ("layer1.*", "layer2.*")
RATIOS = "0.3,0.6"
INFO = {"name": "resnet20", "dataset": "digits", "in_channels": 1, "num_classes": 10, "image_size": 8}


@pytest.fixture
def fresh_evaluator(trained_resnet20, digits):
    # a new evaluator per search: a new process starts with an empty cache and counts from zero
    return lambda: Evaluator(trained_resnet20, digits, device="cpu", bn_batches=2, seed=0, ignore=IGNORE,
                             model_info=INFO)


def search(evaluator, storage, budget="85%", study=None):
    b = parse_budget("flops", budget)
    st = open_study(study or f"resnet20-digits-sensitivity-flops{budget.rstrip('%')}", storage)
    ctx = SearchContext(evaluator, [b], st, "sensitivity", n_trials=1)
    return ctx, get_agent("sensitivity")(ratios=RATIOS).search(ctx)


def probes(storage, evaluator):
    scan = load_study(scan_name(scan_identity(evaluator, 0)), storage)
    return scan, scan.get_trials(deepcopy=False)


@pytest.fixture(scope="module")
def scanned(trained_resnet20, digits, tmp_path_factory):
    """One search at 85 % FLOPs: its storage, context and result."""
    storage = f"sqlite:///{tmp_path_factory.mktemp('sens')}/s.db"
    ev = Evaluator(trained_resnet20, digits, device="cpu", bn_batches=2, seed=0, ignore=IGNORE, model_info=INFO)
    ctx, result = search(ev, storage)
    return storage, ctx, result


def test_curves_are_monotone_and_read_linearly_between_scanned_ratios():
    curve = monotone({0.3: 0.02, 0.1: -0.01, 0.2: 0.05})
    assert curve == [(0.0, 0.0), (0.1, 0.0), (0.2, 0.05), (0.3, 0.05)]
    assert ratio_at(curve, 0.0) == 0.1  # the largest ratio with no drop
    assert ratio_at(curve, 0.025) == pytest.approx(0.15)
    assert ratio_at(curve, 0.05) == 0.3  # a flat envelope: the largest ratio at that drop
    curves = {"a": curve, "b": monotone({0.1: 0.1, 0.2: 0.2})}
    # "fits" when the ratios add up to 0.2 or more: the smallest threshold that gets there
    t = bisect_threshold(curves, lambda r: sum(r.values()) >= 0.2)
    assert t == pytest.approx(1 / 30, abs=1e-5)  # a: 0.1 + 2t, b: t
    assert sum(ratios_at(curves, t).values()) == pytest.approx(0.2, abs=1e-4)
    assert bisect_threshold(curves, lambda r: False) is None


def test_groups_level_at_the_threshold_go_along_their_plateaus_together():
    flat = {0.1: 0.01, 0.5: 0.01}  # no more loss from 0.1 to 0.5 removed
    need = lambda r: sum(r.values()) >= 0.5  # noqa: E731
    level = {g: monotone(flat) for g in "ab"}
    assert ratios_at(level, bisect_threshold(level, need)) == {"a": 0.5, "b": 0.5}  # both jump to the end
    tilted = {g: monotone(flat, PLATEAU_SLOPE) for g in "ab"}
    t = bisect_threshold(tilted, need)
    assert t == pytest.approx(0.01, abs=1e-6)
    assert ratios_at(tilted, t) == pytest.approx({"a": 0.25, "b": 0.25}, abs=1e-3)  # just what the budget needs


def test_options_are_checked():
    assert get_agent("sensitivity")(ratios="0.5, 0.1,0.5").ratios == (0.1, 0.5)
    assert get_agent("sensitivity")(ratios=[0.2, 0.4]).ratios == (0.2, 0.4)  # as a worker reads them back
    with pytest.raises(InputError, match="--sensitivity-ratios '0.5,1.2'"):
        get_agent("sensitivity")(ratios="0.5,1.2")
    with pytest.raises(InputError, match="--sensitivity-probe-steps must be >= 0"):
        get_agent("sensitivity")(probe_steps=-1)


def test_bad_ratios_on_the_command_line_give_one_line_and_exit_code_2(capsys, monkeypatch):
    from autoprune.cli import main

    def no_training(*a, **k):
        raise AssertionError("the options are checked before the model is prepared")

    monkeypatch.setattr("autoprune.runner.prepare", no_training)
    assert main(["search", "--agent", "sensitivity", "--sensitivity-ratios", "0.5,2", "--budget-flops", "50%"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("autoprune: error: --sensitivity-ratios '0.5,2'")


def test_the_scan_records_one_trial_per_group_and_ratio(scanned):
    storage, ctx, _ = scanned
    names = ctx.evaluator.space.names
    assert len(names) == 4
    scan, trials = probes(storage, ctx.evaluator)
    assert scan.study_name.startswith("resnet20-digits-sensitivity-scan-")
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted((t.params["group"], t.params["ratio"]) for t in trials) == sorted(
        (g, r) for g in names for r in (0.3, 0.6))
    for t in trials:
        ratios = json.loads(t.user_attrs["policy"])["ratios"]
        assert ratios == {g: (t.params["ratio"] if g == t.params["group"] else 0.0) for g in names}
        assert t.user_attrs["agent"] == "sensitivity" and t.user_attrs["finetune_steps"] == 0
        assert t.user_attrs["accuracy"] == t.value
    assert ctx.study.user_attrs["sensitivity_scan"] == scan.study_name


def test_one_threshold_gives_a_policy_that_meets_the_budget_tightly(scanned):
    storage, ctx, result = scanned
    limit = parse_budget("flops", "85%").limit(ctx.evaluator.space.base_flops)
    assert result.policy is not None and result.evaluation.flops <= limit
    assert [t.user_attrs["feasible"] for t in completed(ctx.study)] == [True]  # the final policy only
    info = ctx.study.user_attrs["sensitivity"]
    threshold = info["threshold"]
    assert result.policy.ratios == pytest.approx(info["ratios"])
    # the ratios are those of one threshold on the recorded curves, and a lower threshold breaks the budget
    scan, _ = probes(storage, ctx.evaluator)
    drops = scan_drops(scan)
    curves = {g: monotone(d, PLATEAU_SLOPE) for g, d in drops.items()}
    assert ratios_at(curves, threshold) == pytest.approx(info["ratios"])
    # the smallest threshold that fits (0 when groups lose nothing up to ratios that meet the budget)
    assert threshold == 0 or not ctx.fits(ratios_at(curves, max(0.0, threshold - 1e-4)))
    assert all(0 <= r <= 0.6 for r in result.policy.ratios.values())


def test_a_search_at_another_budget_runs_no_new_probe(scanned, fresh_evaluator):
    storage, first, _ = scanned
    ev = fresh_evaluator()
    ctx, result = search(ev, storage, budget="80%")
    assert ctx.study.study_name != first.study.study_name
    assert ev.evaluations == 1  # the final policy; every probe came from the scan study
    _, trials = probes(storage, ev)
    assert len(trials) == 8
    assert result.evaluation.flops <= 0.8 * ev.space.base_flops
    assert ctx.study.user_attrs["sensitivity"]["threshold"] >= first.study.user_attrs["sensitivity"]["threshold"]


def test_scan_identity_changes_with_what_a_probe_depends_on_only(trained_resnet20, digits, fresh_evaluator):
    ev = fresh_evaluator()
    name = scan_name(scan_identity(ev, 0))
    # the budget-free settings may change: another --ignore, another evaluator object
    other_ignore = Evaluator(trained_resnet20, digits, device="cpu", bn_batches=2, seed=0, model_info=INFO)
    assert scan_name(scan_identity(other_ignore, 0)) == name
    assert scan_name(scan_identity(ev, 5)) != name  # fine-tuned probes
    for changed in ({"bn_batches": 3}, {"seed": 1}, {"criterion": "l2"}):
        kw = dict(device="cpu", bn_batches=2, seed=0, ignore=IGNORE, model_info=INFO) | changed
        assert scan_name(scan_identity(Evaluator(trained_resnet20, digits, **kw), 0)) != name, changed


def test_an_interrupted_scan_resumes_with_the_missing_probes_only(fresh_evaluator, tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db"
    ev = fresh_evaluator()
    real = ev.evaluate

    def interrupted_at_the_fourth(policy, finetune_steps=0, split="val"):
        if ev.evaluations == 3:
            raise KeyboardInterrupt
        return real(policy, finetune_steps, split)

    ev.evaluate = interrupted_at_the_fourth
    with pytest.raises(KeyboardInterrupt):
        search(ev, storage)
    _, trials = probes(storage, ev)
    states = [t.state for t in trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3
    assert [t.user_attrs["fail_reason"] for t in trials if t.state == optuna.trial.TrialState.FAIL] == [
        "interrupted by the user"]

    again = fresh_evaluator()
    ctx, result = search(again, storage)
    assert again.evaluations == 5 + 1  # the five missing probes, then the final policy
    _, trials = probes(storage, again)
    done = [(t.params["group"], t.params["ratio"]) for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == len(set(done)) == 8
    assert result.policy is not None


def test_a_worker_leaves_alone_the_probes_another_worker_holds(fresh_evaluator, tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db"
    ev, other = fresh_evaluator(), fresh_evaluator()
    scan = open_study(scan_name(scan_identity(ev, 0)), storage)
    group = ev.space.names[0]
    dists = {"group": optuna.distributions.CategoricalDistribution([g.name for g in ev.space.groups]),
             "ratio": optuna.distributions.FloatDistribution(0.0, 1.0)}
    elsewhere = _Claims(scan, "sensitivity", 3600.0, "elsewhere:1:x")
    elsewhere.host = "another-machine"
    held = elsewhere.take(f"{group}@0.3", {"group": group, "ratio": 0.3}, dists)
    assert held is not None
    # a second claim on the same probe loses to the earlier one
    assert _Claims(scan, "sensitivity", 3600.0, "t").take(f"{group}@0.3", {"group": group, "ratio": 0.3},
                                                           dists) is None
    real = ev.evaluate

    def the_other_worker_finishes_meanwhile(policy, finetune_steps=0, split="val"):
        if ev.evaluations == 0:
            probe = other.policy({group: 0.3})
            record(scan, probe, other.evaluate(probe), agent="sensitivity", feasible=True, constraints=[],
                   base=other.base, claim=held)
        return real(policy, finetune_steps, split)

    ev.evaluate = the_other_worker_finishes_meanwhile
    search(ev, storage)
    assert ev.evaluations == 7 + 1  # every probe but the one held elsewhere, then the final policy
    trials = scan.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == len({(t.params["group"], t.params["ratio"]) for t in done}) == 8
    assert [t.user_attrs["fail_reason"] for t in trials if t.state == optuna.trial.TrialState.FAIL] == [
        f"claimed twice: trial {held} measures it"]


def test_a_claim_of_an_ended_process_on_this_machine_is_taken_over(tmp_path, monkeypatch):
    scan = open_study("claims", f"sqlite:///{tmp_path}/s.db")
    dists = {"ratio": optuna.distributions.FloatDistribution(0.0, 1.0)}
    ended = subprocess.Popen(["true"])
    ended.wait()
    with monkeypatch.context() as m:  # the claim is made by the process that has ended since
        m.setattr("autoprune.agents.sensitivity.os.getpid", lambda: ended.pid)
        number = _Claims(scan, "sensitivity", 3600.0, "ended").take("a@0.5", {"ratio": 0.5}, dists)
    done, running = _Claims(scan, "sensitivity", 3600.0, "alive").state()
    assert not done and not running  # free to claim again
    failed = scan.get_trials(deepcopy=False)[number]
    assert failed.state == optuna.trial.TrialState.FAIL
    reason = f"claim abandoned: process {ended.pid} on {socket.gethostname()} has ended"
    assert failed.user_attrs["fail_reason"] == reason


def test_export_gives_the_final_policy_never_a_probe(tmp_path):
    from autoprune.cli import main

    storage = f"sqlite:///{tmp_path}/s.db"
    args = ["search", "--agent", "sensitivity", "--sensitivity-ratios", "0.5", "--budget-flops", "85%",
            "--pretrain-steps", "40", "--device", "cpu", "--storage", storage, "-o", str(tmp_path / "best.json")]
    for pattern in IGNORE:
        args += ["--ignore", pattern]
    assert main(args) == 0
    st = load_study("resnet20-digits-sensitivity-flops85", storage)
    final = completed(st)
    assert len(final) == 1 and final[0].user_attrs["sensitivity_scan"] == st.user_attrs["sensitivity_scan"]
    assert len(completed(load_study(st.user_attrs["sensitivity_scan"], storage))) == 4
    assert main(["export", "--study", st.study_name, "--storage", storage, "-o", str(tmp_path / "e.json")]) == 0
    exported = json.loads((tmp_path / "e.json").read_text())
    assert exported["search"]["trial"] == final[0].number
    assert exported["search"]["agent"] == "sensitivity"
    assert exported["search"]["sensitivity"]["scan"] == st.user_attrs["sensitivity_scan"]
    assert exported["search"]["agent_options"]["ratios"] == [0.5]
    assert exported["ratios"] == pytest.approx(st.user_attrs["sensitivity"]["ratios"])
    assert sum(r > 0 for r in exported["ratios"].values()) > 1  # not a one-group probe


def test_a_worker_rebuilds_the_search_and_finishes_its_scan(tmp_path):
    from autoprune.runner import export, prepare, run_search, run_worker

    storage = f"sqlite:///{tmp_path}/s.db"
    setup = prepare("resnet20", "digits", pretrain_steps=40, device="cpu")
    outcome = run_search(setup, [parse_budget("flops", "85%")], agent="sensitivity", storage=storage,
                         agent_options={"ratios": RATIOS}, ignore=IGNORE, timeout=1e-9, device="cpu",
                         evaluator_settings={"bn_batches": 2}, final=False)
    assert outcome.policy is None and outcome.info["probes_measured"] == 0  # time was up at once
    st = outcome.study
    run_worker(st.study_name, storage, device="cpu")
    # the worker found the scan the search opened (same model, data and settings): it holds every probe
    scan = load_study(st.user_attrs["sensitivity_scan"], storage)
    assert len(completed(scan)) == 8
    policy, _ = export(st.study_name, storage, tmp_path / "best.json")
    assert policy.search["trial"] == completed(st)[0].number and len(completed(st)) == 1


def test_the_report_plots_the_curves_and_the_threshold(scanned, tmp_path):
    from autoprune.report import write_report

    storage, ctx, _ = scanned
    files = write_report(ctx.study, storage, tmp_path / "report")
    plot = tmp_path / "report" / "sensitivity.png"
    assert plot in files and plot.read_bytes()[:4] == b"\x89PNG" and plot.stat().st_size > 5000
    assert "sensitivity.png" in (tmp_path / "report" / "index.html").read_text()
