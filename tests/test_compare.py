"""`autoprune compare`: several agents, one budget, one table (Markdown and CSV)."""

import csv

import optuna
import pytest

from autoprune.cli import main
from autoprune.compare import COLUMNS, Row, headers, markdown, parse_agents, run_compare, write_tables
from autoprune.config import SearchConfig
from autoprune.errors import InputError, ParameterError
from autoprune.runner import Setup


def config_for(storage, **changes):
    return SearchConfig(budgets={"flops": "50%"}, trials=3, finetune_steps=0, storage=storage, device="cpu",
                        bn_batches=2).replace(**changes)


@pytest.fixture(scope="module")
def compared(trained_resnet20, digits_task, tmp_path_factory):
    d = tmp_path_factory.mktemp("compare")
    storage = f"sqlite:///{d}/c.db"
    setup = Setup(trained_resnet20, digits_task, {"name": "resnet20", "dataset": "digits"})
    rows = run_compare(setup, config_for(storage), ["uniform", "random"], final_steps=5, log=lambda m: None)
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


def test_the_final_figures_do_not_depend_on_the_searchs_fine_tune(compared, trained_resnet20, digits_task):
    """Same final fine-tune for every agent: a policy's row equals building it again with the same steps."""
    from autoprune.evaluator import Evaluator
    from autoprune.study import best_policy

    d, storage, setup, rows = compared
    st = optuna.load_study(study_name=rows[0].study, storage=storage)
    ev = Evaluator(trained_resnet20, digits_task, device="cpu", bn_batches=2, seed=0)
    model = ev.build(best_policy(st), 5)
    assert ev.measure(model, "test", 5).score == rows[0].test_score
    assert ev.measure(model, "val", 5).score == rows[0].val_score


def test_a_second_comparison_resumes_the_studies(compared):
    d, storage, setup, rows = compared
    again = run_compare(setup, config_for(storage), ["uniform", "random"], final_steps=5, log=lambda m: None)
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
