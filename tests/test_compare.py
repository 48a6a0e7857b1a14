"""`autoprune compare`: several agents, one budget, one table (Markdown and CSV)."""

import csv

import optuna
import pytest
import torch

from autoprune.cli import main
from autoprune.compare import COLUMNS, Row, headers, markdown, parse_agents, run_compare, write_tables
from autoprune.config import SearchConfig
from autoprune.errors import InputError, ParameterError
from autoprune.policy import Policy
from autoprune.runner import Setup


def config_for(storage, **changes):
    return SearchConfig(budgets={"flops": "50%"}, trials=3, finetune_steps=0, storage=storage, device="cpu",
                        bn_batches=2).replace(**changes)


SEARCH_STEPS, FINAL_STEPS = 1, 20


@pytest.fixture(scope="module")
def compared(trained_resnet20, digits_task, tmp_path_factory):
    d = tmp_path_factory.mktemp("compare")
    storage = f"sqlite:///{d}/c.db"
    setup = Setup(trained_resnet20, digits_task, {"name": "resnet20", "dataset": "digits"})
    rows = run_compare(setup, config_for(storage, finetune_steps=SEARCH_STEPS), ["uniform", "random"],
                       final_steps=FINAL_STEPS, log=lambda m: None)
    return d, storage, setup, rows


def test_each_agent_gets_a_row_with_its_searchs_figures(compared):
    d, storage, setup, rows = compared
    assert [r.agent for r in rows] == ["uniform", "random"]
    for r in rows:
        st = optuna.load_study(study_name=r.study, storage=storage)
        assert r.evaluations == len(st.trials)  # every evaluation is one trial of the agent's study
        assert r.feasible and r.flops_ratio <= 0.5
        assert r.metric == "accuracy" and 0 <= r.test_score <= 1 and 0 <= r.val_score <= 1
        assert r.latency_ms > 0 and r.search_seconds > 0
        assert r.search_seconds == pytest.approx(st.user_attrs["search_seconds"])
    assert rows[0].evaluations == 1 and rows[1].evaluations == 3  # uniform needs one, random uses them all


def hand_accuracy(model, task, split):
    """Top-1 accuracy on a whole split, counted here."""
    images, labels = next(iter(task.data.loader(split, 100_000, "cpu")))
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).sum()) / len(labels)


def test_the_final_figures_are_a_fresh_fine_tune_of_the_best_policy_not_the_searchs(compared, digits_task):
    """Every agent's best policy gets the same final fine-tune (FINAL_STEPS steps), whatever its search
    fine-tuned (SEARCH_STEPS): the row equals that policy pruned, recalibrated and fine-tuned by hand and
    scored by hand, and differs from what the search recorded."""
    from autoprune.pruning import ChannelPruner
    from autoprune.space import Space
    from autoprune.training import recalibrate_bn, train_steps

    d, storage, setup, rows = compared
    task = digits_task
    for row in rows:
        policy = row.policy
        assert policy.search["finetune_steps"] == SEARCH_STEPS
        assert policy.metrics["final"]["finetune_steps"] == FINAL_STEPS
        model = ChannelPruner(Space.from_model(setup.model, task.example_inputs)).prune(policy)
        recalibrate_bn(model, task, task.train_batches(0, augment=False), 2)
        train_steps(model, task, task.train_batches(0, augment=True), FINAL_STEPS, 0.01)
        model.eval()
        assert row.test_score == hand_accuracy(model, task, "test")
        assert row.val_score == hand_accuracy(model, task, "val")
        assert policy.metrics["final"]["val_accuracy"] == row.val_score
        assert row.val_score != policy.metrics["accuracy"]  # the search's figure, after SEARCH_STEPS steps


def test_a_second_comparison_resumes_the_studies(compared):
    d, storage, setup, rows = compared
    again = run_compare(setup, config_for(storage, finetune_steps=SEARCH_STEPS), ["uniform", "random"],
                        final_steps=FINAL_STEPS, log=lambda m: None)
    assert [r.evaluations for r in again] == [r.evaluations for r in rows]
    assert [r.test_score for r in again] == [r.test_score for r in rows]


def test_tables_are_written_as_markdown_and_csv(compared, tmp_path):
    rows = compared[3] + [Row("amc", "s", 4, 1.0, False)]
    md, path = write_tables(rows, tmp_path, "title")
    text = md.read_text()
    assert text.startswith("title") and text.count("\n| ") == 4 and "| amc |" in text and "—" in text
    with path.open() as f:
        table = list(csv.DictReader(f))
    # the score columns are headed by the task's metric
    assert list(table[0]) == headers("accuracy") == [c.replace("score", "accuracy") for c in COLUMNS]
    assert "| test_accuracy | val_accuracy |" in text
    assert float(table[0]["test_accuracy"]) == rows[0].test_score
    assert float(table[0]["val_accuracy"]) == rows[0].val_score
    assert table[2]["test_accuracy"] == "" and table[2]["feasible"] == "False"
    assert markdown(rows).count("\n") == len(rows) + 2
    from autoprune.policy import Policy

    saved = Policy.load(tmp_path / "uniform.json")
    assert saved.ratios == rows[0].policy.ratios
    assert saved.metrics["final"]["test_accuracy"] == saved.metrics["final"]["test_score"] == rows[0].test_score
    assert not (tmp_path / "amc.json").exists()  # no feasible policy, nothing to re-apply


def test_agent_lists_are_checked():
    assert parse_agents(" uniform, random ") == ["uniform", "random"]
    for bad, message in [("", "at least one"), ("uniform,nope", "unknown agent"), ("random,random", "twice")]:
        with pytest.raises(InputError, match=message):
            parse_agents(bad)


def test_cli_writes_the_table(tmp_path, capsys):
    code = main(["compare", "--agents", "uniform", "--budget-flops", "60%", "--pretrain-steps", "0", "--trials", "2",
                 "--final-steps", "2", "--storage", f"sqlite:///{tmp_path}/c.db", "-o", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0 and "| uniform |" in out
    assert (tmp_path / "out" / "compare.csv").is_file() and (tmp_path / "out" / "compare.md").is_file()


@pytest.mark.parametrize("argv, message", [
    (["compare", "--agents", "uniform,nope", "--budget-flops", "50%"], "unknown agent"),
    (["compare", "--agents", "uniform"], "at least one budget"),
    (["compare", "--agents", "uniform,gates", "--budget-flops", "50%", "--granularity", "2:4"], "supports only"),
    (["compare", "--agents", "uniform", "--budget-flops", "50%", "--random-spread", "0.5"], "not in --agents"),
])
def test_bad_compare_input_is_one_line(argv, message, capsys, tmp_path):
    code = main([*argv, "--pretrain-steps", "0", "--storage", f"sqlite:///{tmp_path}/c.db", "-o", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err


def test_another_agent_in_a_configuration_starts_from_its_own_options():
    config = SearchConfig(agent="sensitivity", budgets={"flops": "50%"}, agent_options={"ratios": "0.5"})
    assert config.agent_options["ratios"] == (0.5,) and config.agent_options["allocation"] == "threshold"
    other = config.replace(agent="random")
    assert other.agent_options == {"spread": 1.0}  # random's defaults, not sensitivity's options
    assert config.replace(agent="random", agent_options={"spread": 0.5}).agent_options == {"spread": 0.5}
    assert config.replace(trials=3).agent_options == config.agent_options  # the same agent keeps its options


def test_a_study_resumes_only_with_the_options_it_was_searched_with(compared):
    from autoprune.runner import run_search

    d, storage, setup, rows = compared
    config = config_for(storage, study=rows[1].study)

    def search(**changes):
        return run_search(setup.model, setup.task, config.replace(**changes), info=setup.info, final=False)

    assert search(agent="random").new_trials == 0  # same options: resumes, nothing new
    # the option that differs is named, with the value asked for
    with pytest.raises(ParameterError, match=r"^random option spread=0\.123: study .* was searched with 1\.0") as e:
        search(agent="random", agent_options={"spread": 0.123})
    assert e.value.for_cli().startswith("--random-spread 0.123: study")
    with pytest.raises(InputError, match="searched by agent 'random'"):
        search(agent="uniform")


def test_every_agent_runs_through_compare_with_its_options(tmp_path, capsys):
    """amc, netadapt, icepick (two objectives), gates and sensitivity side by side from the command line,
    each with options of its own that reach its search."""
    storage = f"sqlite:///{tmp_path}/c.db"
    code = main([
        "compare", "--agents", "amc,netadapt,icepick,gates,sensitivity", "--budget-flops", "85%", "--trials", "5",
        "--final-steps", "3", "--pretrain-steps", "40", "--device", "cpu", "--bn-batches", "1",
        "--ignore", "layer1.*", "--ignore", "layer2.*", "--storage", storage, "--study-prefix", "c",
        "-o", str(tmp_path / "out"),
        "--amc-warmup", "1", "--netadapt-initial", "0.2", "--netadapt-long-steps", "0", "--icepick-max-steps", "2",
        "--icepick-probe-steps", "0", "--icepick-startup", "1", "--gates-steps", "4", "--gates-snapshot-every", "2",
        "--sensitivity-ratios", "0.5",
    ])
    out = capsys.readouterr().out
    assert code == 0
    with (tmp_path / "out" / "compare.csv").open() as f:
        table = {row["agent"]: row for row in csv.DictReader(f)}
    assert list(table) == ["amc", "netadapt", "icepick", "gates", "sensitivity"]
    for agent, row in table.items():
        assert row["feasible"] == "True" and float(row["flops_ratio"]) <= 0.85, agent
        assert 0 <= float(row["test_accuracy"]) <= 1 and float(row["latency_ms"]) > 0, agent
        assert f"| {agent} |" in out

    def study(agent):
        return optuna.load_study(study_name=f"c-{agent}", storage=storage)

    # the options reached the searches: recorded with each study, and visible in what each did
    assert study("amc").user_attrs["config"]["agent_options"]["warmup"] == 1
    assert study("netadapt").user_attrs["netadapt_iterations"][0]["target"] == pytest.approx(0.15)  # not 0.025
    assert all(t.params["finetune_steps"] <= 2 for t in study("icepick").trials)
    assert [t.user_attrs["gates_steps"] for t in study("gates").trials] == [4]
    scan = optuna.load_study(study_name=study("sensitivity").user_attrs["sensitivity_scan"], storage=storage)
    assert {t.params["ratio"] for t in scan.trials} == {0.5} and len(scan.trials) == 4
    # ICE-Pick's study has two objectives (accuracy up, pruning time down); its row is its best accuracy
    ice = study("icepick")
    assert len(ice.directions) == 2 and int(table["icepick"]["evaluations"]) == len(ice.trials) == 5
    assert int(table["sensitivity"]["evaluations"]) == 4 + 1  # the probes of its scan, then its policy
    best = max(t.values[0] for t in ice.trials if t.values)
    assert Policy.load(tmp_path / "out" / "icepick.json").metrics["accuracy"] == best
