import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoprune.budget import all_hold, parse_budget
from autoprune.errors import InputError, ParameterError


@pytest.mark.parametrize(
    "text, fraction",
    [("50%", 0.5), ("0.5", 0.5), ("2x", 0.5), ("100%", 1.0), ("1", 1.0), ("12.5%", 0.125), ("4X", 0.25)],
)
def test_relative_budgets_parse_to_the_fraction_kept(text, fraction):
    b = parse_budget("flops", text)
    assert b.fraction == pytest.approx(fraction)
    assert b.limit(1000) == pytest.approx(1000 * fraction)


@pytest.mark.parametrize("text, amount", [("120M", 120e6), ("3.5G", 3.5e9), ("250K", 250e3), ("800k", 800e3)])
def test_absolute_counts_parse_with_suffixes(text, amount):
    b = parse_budget("params", text)
    assert b.absolute == pytest.approx(amount)
    assert b.limit(1e12) == pytest.approx(amount)


@pytest.mark.parametrize("text, seconds", [("3.2ms", 3.2e-3), ("800us", 8e-4), ("0.01s", 0.01)])
def test_latency_accepts_times(text, seconds):
    assert parse_budget("latency", text).absolute == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["150%", "0", "-5%", "abc", "", "0%", "1.5", "0.5x", "12Q", "nan", "inf%"])
def test_bad_budgets_are_refused_with_one_line(text):
    with pytest.raises(ParameterError) as e:
        parse_budget("flops", text)
    # the API's words name the setting and the value; the command line's name its flag
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"budgets['flops']={text!r}: ")
    assert "\n" not in e.value.for_cli()
    assert e.value.for_cli().startswith(f"--budget-flops {text}: ")


def test_latency_amount_needs_a_time_unit():
    with pytest.raises(InputError, match="unit"):
        parse_budget("latency", "3M")


def test_absolute_budget_above_the_unpruned_model_is_refused():
    with pytest.raises(InputError, match="above 100 %"):
        parse_budget("flops", "5M").check_reachable(1e6)


def test_all_budgets_must_hold():
    budgets = [parse_budget("flops", "50%"), parse_budget("params", "0.6")]
    base = {"flops": 100.0, "params": 100.0}
    assert all_hold(budgets, {"flops": 50.0, "params": 60.0}, base)
    assert not all_hold(budgets, {"flops": 50.0, "params": 61.0}, base)
    assert not all_hold(budgets, {"flops": 50.1, "params": 10.0}, base)


def test_study_slug_names_the_budget():
    assert parse_budget("flops", "50%").slug == "flops50"
    assert parse_budget("latency", "3.2ms").slug == "latency3.2ms"


@given(st.text(max_size=12))
def test_any_text_either_parses_or_gives_the_clean_error(text):
    try:
        b = parse_budget("flops", text)
    except InputError as e:
        assert "\n" not in str(e)
    else:
        assert (b.fraction is not None and 0 < b.fraction <= 1) or b.absolute > 0


def test_property_tests_run_without_a_deadline():
    """The profile of tests/conftest.py: a loaded machine must not fail a property test by its speed."""
    assert settings().deadline is None
