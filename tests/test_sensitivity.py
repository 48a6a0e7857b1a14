"""The sensitivity agent: one probe per (group, ratio) kept in a scan study that searches at other
budgets, resumed searches and workers reuse; processes share the probes through the scan study's queue,
with a heartbeat on database storages; one threshold bisected to the budget; the report's plot."""

import copy
import dataclasses
import json
import shutil
import time
import warnings

import optuna
import pytest
import torch
from optuna.trial import TrialState

import autoprune.study
from autoprune.agents import Limits, SearchContext, get_agent
from autoprune.agents.sensitivity import (
    PLATEAU_SLOPE,
    allocate,
    bisect_threshold,
    drop_at,
    monotone,
    probe_key,
    ratio_at,
    ratios_at,
    scan_drops,
    scan_identity,
    scan_name,
)
from autoprune.budget import Budgets, parse_budget
from autoprune.config import SearchConfig, SourceConfig
from autoprune.errors import InputError
from autoprune.evaluator import Evaluator
from autoprune.study import GRACE_BEATS, completed, load_study, open_storage, open_study
from autoprune.task import ImageClassificationTask

# four groups (layer3's) and two ratios: eight probes per scan
IGNORE = ("layer1.*", "layer2.*")
RATIOS = "0.3,0.6"
INFO = {"name": "resnet20", "dataset": "digits", "in_channels": 1, "num_classes": 10, "image_size": 8}


@pytest.fixture
def fresh_evaluator(trained_resnet20, digits_task):
    # a new evaluator per search: a new process starts with an empty cache and counts from zero
    return lambda: Evaluator(trained_resnet20, digits_task, device="cpu", bn_batches=2, seed=0, ignore=IGNORE,
                             model_info=INFO)


def search(evaluator, storage, budget="85%", study=None, timeout=None, ratios=RATIOS):
    budgets = Budgets([parse_budget("flops", budget)], evaluator)
    st = open_study(study or f"resnet20-digits-sensitivity-flops{budget.rstrip('%')}", storage)
    ctx = SearchContext(evaluator, budgets, st, "sensitivity", limits=Limits(1, timeout),
                        storage=open_storage(storage))
    return ctx, get_agent("sensitivity")(ratios=ratios).search(ctx)


def probes(storage, evaluator):
    scan = load_study(scan_name(scan_identity(evaluator, 0)), storage)
    return scan, scan.get_trials(deepcopy=False)


@pytest.fixture(scope="module")
def scanned(trained_resnet20, digits_task, tmp_path_factory):
    """One search at 85 % FLOPs: its storage, context and result."""
    storage = f"sqlite:///{tmp_path_factory.mktemp('sens')}/s.db"
    ev = Evaluator(trained_resnet20, digits_task, device="cpu", bn_batches=2, seed=0, ignore=IGNORE,
                   model_info=INFO)
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


def test_resource_allocation_prunes_first_where_a_drop_saves_most():
    same = {0.5: 0.1, 0.9: 0.5}
    curves = {"a": monotone(same), "b": monotone(same)}
    cost = lambda r: 2 * (1 - r["a"]) + (1 - r["b"])  # noqa: E731  a's channels cost twice b's
    # the same drop saves twice as much in a: a goes first, and only as far as the budget needs
    assert allocate(curves, lambda r: cost(r) <= 2.0, cost) == pytest.approx({"a": 0.5, "b": 0.0}, abs=1e-5)
    # a loses more than b at half its channels, but less per FLOP saved: a still goes first
    steeper = {"a": monotone({0.5: 0.15, 0.9: 0.5}), "b": monotone({0.5: 0.1, 0.9: 0.5})}
    assert allocate(steeper, lambda r: cost(r) <= 2.0, cost) == pytest.approx({"a": 0.5, "b": 0.0}, abs=1e-5)
    # the threshold rule prunes both alike and so loses more for the same budget
    t = bisect_threshold(curves, lambda r: cost(r) <= 2.0)
    even = ratios_at(curves, t)
    assert even["a"] == pytest.approx(even["b"]) and even["a"] > 0
    loss = lambda r: sum(drop_at(curves[g], x) for g, x in r.items())  # noqa: E731
    assert loss(allocate(curves, lambda r: cost(r) <= 2.0, cost)) < loss(even)
    # a cheap group that loses nothing is pruned before an expensive one that loses much
    curves = {"a": monotone({0.5: 0.4}), "b": monotone({0.5: 0.0, 0.9: 0.01})}
    assert allocate(curves, lambda r: cost(r) <= 2.5, cost) == pytest.approx({"a": 0.0, "b": 0.5}, abs=1e-5)
    assert allocate(curves, lambda r: True, cost) == {"a": 0.0, "b": 0.0}
    assert allocate(curves, lambda r: False, cost) is None
    assert drop_at(monotone(same), 0.25) == pytest.approx(0.05) and drop_at(monotone(same), 0.95) == 0.5


def test_options_are_checked():
    assert get_agent("sensitivity")(ratios="0.5, 0.1,0.5").ratios == (0.1, 0.5)
    assert get_agent("sensitivity")(ratios=[0.2, 0.4]).ratios == (0.2, 0.4)  # as a worker reads them back
    with pytest.raises(InputError, match=r"sensitivity option ratios='0.5,1.2': give fractions removed in \(0, 1\)"):
        get_agent("sensitivity")(ratios="0.5,1.2")
    with pytest.raises(InputError, match="sensitivity option probe_steps=-1: must be an integer >= 0"):
        get_agent("sensitivity")(probe_steps=-1)
    assert get_agent("sensitivity")().allocation == "threshold"
    with pytest.raises(InputError, match="sensitivity option allocation='knapsack': .*threshold.*resource"):
        get_agent("sensitivity")(allocation="knapsack")
    with pytest.raises(InputError, match="sensitivity option stale_after=60: no such option"):  # heartbeats now
        get_agent("sensitivity")(stale_after=60)


def test_bad_ratios_on_the_command_line_give_one_line_and_exit_code_2(capsys, monkeypatch):
    from autoprune.cli import main

    def no_training(*a, **k):
        raise AssertionError("the options are checked before the model is prepared")

    monkeypatch.setattr("autoprune.runner.prepare", no_training)
    assert main(["search", "--agent", "sensitivity", "--sensitivity-ratios", "0.5,2", "--budget-flops", "50%"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("autoprune: error: --sensitivity-ratios 0.5,2: give fractions removed")


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
        assert t.user_attrs["metric"] == "accuracy"
        assert t.user_attrs["score"] == t.user_attrs["accuracy"] == t.value
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
    assert threshold == 0 or not ctx.budgets.fits(ratios_at(curves, max(0.0, threshold - 1e-4)))
    assert all(0 <= r <= 0.6 for r in result.policy.ratios.values())


def test_the_resource_allocation_reuses_the_scan_and_meets_the_budget(scanned, fresh_evaluator):
    storage, _, _ = scanned
    ev = fresh_evaluator()
    budgets = Budgets([parse_budget("flops", "80%")], ev)
    st = open_study("resnet20-digits-sensitivity-resource", storage)
    ctx = SearchContext(ev, budgets, st, "sensitivity", limits=Limits(1, None), storage=open_storage(storage))
    result = get_agent("sensitivity")(ratios=RATIOS, allocation="resource").search(ctx)
    assert ev.evaluations == 1  # the scan is shared with the threshold searches
    assert result.evaluation.flops <= 0.8 * ev.space.base_flops
    info = st.user_attrs["sensitivity"]
    assert info["allocation"] == "resource" and info["threshold"] is None
    scan, _ = probes(storage, ev)
    curves = {g: monotone(d, PLATEAU_SLOPE) for g, d in scan_drops(scan).items()}
    cost = get_agent("sensitivity").resource(ctx)
    assert result.policy.ratios == pytest.approx(allocate(curves, budgets.fits, cost))
    assert result.policy.search["sensitivity"]["allocation"] == "resource"


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


def test_other_ratios_measure_only_the_pairs_not_yet_recorded(scanned, fresh_evaluator, tmp_path):
    storage, _, _ = scanned
    copied = tmp_path / "s.db"  # the module's scan, copied: the other tests keep theirs as it is
    shutil.copy(storage.removeprefix("sqlite:///"), copied)
    storage = f"sqlite:///{copied}"
    ev = fresh_evaluator()
    mine = counting(ev)
    ctx, result = search(ev, storage, budget="75%", ratios="0.3,0.45,0.6")
    assert ev.evaluations == 4 + 1  # each group at 0.45, then the final policy
    measured = [{g: r for g, r in ratios.items() if r} for ratios in mine[:4]]
    assert sorted(measured, key=str) == sorted(({g: 0.45} for g in ev.space.names), key=str)
    _, trials = probes(storage, ev)
    assert sorted(probe_key(t.params) for t in trials) == sorted(
        (g, r) for g in ev.space.names for r in (0.3, 0.45, 0.6))
    assert result.policy is not None


def test_scan_identity_changes_with_what_a_probe_depends_on_only(trained_resnet20, digits_task, fresh_evaluator):
    ev = fresh_evaluator()
    name = scan_name(scan_identity(ev, 0))
    # the budget-free settings may change: another --ignore, another evaluator object
    other_ignore = Evaluator(trained_resnet20, digits_task, device="cpu", bn_batches=2, seed=0, model_info=INFO)
    assert scan_name(scan_identity(other_ignore, 0)) == name
    assert scan_name(scan_identity(ev, 5)) != name  # fine-tuned probes
    for changed in ({"bn_batches": 3}, {"seed": 1}, {"criterion": "l2"}, {"granularity": "unstructured"}):
        kw = dict(device="cpu", bn_batches=2, seed=0, ignore=IGNORE, model_info=INFO) | changed
        assert scan_name(scan_identity(Evaluator(trained_resnet20, digits_task, **kw), 0)) != name, changed
    kw = dict(device="cpu", bn_batches=2, seed=0, ignore=IGNORE, model_info=INFO)
    # other weights: the same architecture, one weight moved
    other = copy.deepcopy(trained_resnet20)
    with torch.no_grad():
        other.layer3[0].conv1.weight[0, 0, 0, 0] += 1e-3
    assert scan_name(scan_identity(Evaluator(other, digits_task, **kw), 0)) != name
    # another dataset of the same shapes
    renamed = ImageClassificationTask(dataclasses.replace(digits_task.data, name="digits-copy"))
    assert scan_name(scan_identity(Evaluator(trained_resnet20, renamed, **kw), 0)) != name


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


@pytest.fixture
def heartbeat(monkeypatch):
    """``heartbeat(seconds)``: database storages opened from now on beat every ``seconds`` (a fresh storage
    per URL, so that the setting takes)."""

    def set_to(seconds):
        monkeypatch.setattr(autoprune.study, "HEARTBEAT_SECONDS", seconds)
        monkeypatch.setattr(autoprune.study, "_STORAGES", {})
        return seconds

    return set_to


def probe_elsewhere(storage, ev, group, ratio):
    """What another process's scan does with a probe it takes from the queue: the probe is queued, the
    process takes it (a RUNNING trial, its params suggested) and records a heartbeat. Returns the scan
    and the live trial."""
    scan = open_study(scan_name(scan_identity(ev, 0)), storage, sampler=optuna.samplers.RandomSampler())
    scan.enqueue_trial({"group": group, "ratio": ratio}, user_attrs={"sensitivity_probe": True})
    with warnings.catch_warnings():  # a process of the scan takes its probes in study.optimize; here by hand
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
        trial = scan.ask()
    assert trial.suggest_categorical("group", [g.name for g in ev.space.groups]) == group
    assert trial.suggest_float("ratio", 0.0, 1.0) == ratio
    open_storage(storage).record_heartbeat(trial._trial_id)
    assert scan.get_trials(deepcopy=False, states=(TrialState.RUNNING,))[0].number == trial.number
    return scan, trial


def counting(ev):
    """Record the policies ``ev`` evaluates itself (cache hits and study lookups excluded)."""
    seen, real = [], ev.evaluate

    def evaluate(policy, finetune_steps=0, split="val"):
        seen.append(dict(policy.ratios))
        return real(policy, finetune_steps, split)

    ev.evaluate = evaluate
    return seen


def test_a_worker_leaves_alone_the_probes_another_worker_is_measuring(fresh_evaluator, tmp_path, heartbeat):
    heartbeat(600)  # the other worker's heartbeat stays live through the test
    storage = f"sqlite:///{tmp_path}/s.db"
    ev, other = fresh_evaluator(), fresh_evaluator()
    group = ev.space.names[0]
    scan, held = probe_elsewhere(storage, other, group, 0.3)
    mine = counting(ev)
    real = ev.evaluate
    elsewhere = SearchContext(other, Budgets([parse_budget("flops", "85%")], other), scan, "sensitivity",
                              storage=open_storage(storage))

    def the_other_worker_finishes_meanwhile(policy, finetune_steps=0, split="val"):
        if ev.evaluations == 0:  # while this worker measures its first probe, the other records its own
            scan.tell(held, elsewhere.evaluate(other.policy({group: 0.3}), trial=held).score)
        return real(policy, finetune_steps, split)

    ev.evaluate = the_other_worker_finishes_meanwhile
    search(ev, storage)
    assert ev.evaluations == 7 + 1  # every probe but the one measured elsewhere, then the final policy
    assert {group: 0.3} not in [{g: r for g, r in ratios.items() if r} for ratios in mine]
    trials = scan.get_trials(deepcopy=False)
    assert not [t for t in trials if t.state != TrialState.COMPLETE]  # no probe taken twice, none left over
    assert len(trials) == len({probe_key(t.params) for t in trials}) == 8
    assert scan.trials[held.number].user_attrs["score"] == other.evaluate(other.policy({group: 0.3})).score


def test_a_worker_waits_for_a_probe_another_worker_is_measuring(fresh_evaluator, tmp_path, heartbeat,
                                                                monkeypatch):
    """The last probe missing is held elsewhere: the scan waits for it rather than measuring it too."""
    heartbeat(600)
    monkeypatch.setattr("autoprune.agents.sensitivity.POLL_SECONDS", 0.05)
    storage = f"sqlite:///{tmp_path}/s.db"
    ev, other = fresh_evaluator(), fresh_evaluator()
    group = ev.space.names[-1]
    scan, held = probe_elsewhere(storage, other, group, 0.6)
    elsewhere = SearchContext(other, Budgets([parse_budget("flops", "85%")], other), scan, "sensitivity",
                              storage=open_storage(storage))
    waited = []

    class Clock:  # the agent's time module, its sleeps seen (the time module itself is left alone)
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def sleep(seconds):
            waited.append(seconds)
            if len(waited) == 3:  # the other worker records its probe while this one waits
                scan.tell(held, elsewhere.evaluate(other.policy({group: 0.6}), trial=held).score)
            time.sleep(seconds)

    monkeypatch.setattr("autoprune.agents.sensitivity.time", Clock())
    _, result = search(ev, storage, timeout=60)  # a scan that waited for ever would end unfinished
    assert result.info["scan_complete"] and result.policy is not None
    assert len(waited) >= 3
    assert ev.evaluations == 7 + 1
    trials = scan.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 8


def test_a_probe_whose_process_died_is_measured_again(fresh_evaluator, tmp_path, heartbeat):
    beat = heartbeat(1)
    storage = f"sqlite:///{tmp_path}/s.db"
    ev = fresh_evaluator()
    group = ev.space.names[1]
    scan, dead = probe_elsewhere(storage, fresh_evaluator(), group, 0.3)
    time.sleep(GRACE_BEATS * beat + 1.1)  # the process died: no heartbeat since, past the grace period
    mine = counting(ev)
    _, result = search(ev, storage, timeout=60)  # a scan that waited for the dead process would end unfinished
    assert result.info["scan_complete"] and result.policy is not None
    trials = scan.get_trials(deepcopy=False)
    assert trials[dead.number].state == TrialState.FAIL  # failed by Optuna for its stale heartbeat
    assert ev.evaluations == 8 + 1  # the dead process's probe too, then the final policy
    assert {group: 0.3} in [{g: r for g, r in ratios.items() if r} for ratios in mine]
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == len({probe_key(t.params) for t in done}) == 8
    again = next(t for t in done if probe_key(t.params) == (group, 0.3))
    # queued again by the heartbeat's retry callback, not as a new probe
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        assert optuna.storages.RetryFailedTrialCallback.retried_trial_number(again) == dead.number


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
    setup = prepare(SourceConfig(pretrain_steps=40), device="cpu")
    config = SearchConfig(agent="sensitivity", budgets={"flops": "85%"}, storage=storage,
                          agent_options={"ratios": RATIOS}, ignore=IGNORE, timeout=1e-9, device="cpu", bn_batches=2)
    outcome = run_search(setup.model, setup.task, config, info=setup.info, final=False)
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
