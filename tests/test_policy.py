import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autoprune.errors import InputError
from autoprune.policy import SCHEMA, Policy


def test_policy_round_trips_through_json(tmp_path):
    p = Policy({"a": 0.5, "b": 0.0}, criterion="l2", model={"name": "resnet20"}, metrics={"accuracy": 0.9})
    path = p.save(tmp_path / "p.json")
    data = json.loads(path.read_text())
    assert data["schema"] == SCHEMA
    q = Policy.load(path)
    assert q.ratios == p.ratios and q.criterion == "l2" and q.model == {"name": "resnet20"}
    assert q.key() == p.key()


@pytest.mark.parametrize(
    "text, message",
    [
        ("{", "not valid JSON"),
        ("[]", "must be a JSON object"),
        ('{"schema": "other/1", "ratios": {"a": 0.1}}', "unsupported schema"),
        (f'{{"schema": "{SCHEMA}", "ratios": {{}}}}', "non-empty"),
        (f'{{"schema": "{SCHEMA}", "ratios": {{"a": "x"}}}}', "not a number"),
        (f'{{"schema": "{SCHEMA}", "ratios": {{"a": 1.0}}}}', "in \\[0, 1\\)"),
        (f'{{"schema": "{SCHEMA}", "ratios": {{"a": 0.1}}, "granularity": "blocks"}}', "granularity"),
    ],
)
def test_malformed_policies_are_refused(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        Policy.load(path)


def test_missing_policy_file_is_refused(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        Policy.load(tmp_path / "nope.json")


def test_names_are_checked_against_the_model():
    p = Policy({"layer1.0.conv1": 0.5, "features.3": 0.2}, model={"name": "vgg16_bn"})
    with pytest.raises(InputError, match="unknown group.*features.3.*missing group.*layer2.*vgg16_bn"):
        p.check_names(["layer1.0.conv1", "layer2.0.conv1"])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@given(json_values)
def test_any_json_either_loads_or_gives_the_clean_error(value):
    try:
        policy = Policy.from_json(json.dumps(value))
    except InputError as e:
        assert "\n" not in str(e)
    else:
        assert all(0 <= r < 1 for r in policy.ratios.values())


@given(st.dictionaries(st.text(min_size=1, max_size=10), st.floats(allow_nan=True, allow_infinity=True),
                       min_size=1, max_size=5))
def test_any_ratio_table_either_loads_or_gives_the_clean_error(ratios):
    text = json.dumps({"schema": SCHEMA, "ratios": ratios})
    try:
        policy = Policy.from_json(text)
    except InputError as e:
        assert "\n" not in str(e)
    else:
        assert policy.ratios == ratios


@given(st.binary(max_size=64))
def test_any_bytes_on_disk_either_load_or_give_the_clean_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("p") / "policy.json"
    path.write_bytes(data)
    try:
        Policy.load(path)
    except InputError as e:
        assert "\n" not in str(e)
