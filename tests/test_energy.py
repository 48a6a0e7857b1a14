"""The energy model (autoprune/energy.py) against figures worked out by hand, its prediction from ratios
against its measurement on pruned models, the energy budget end to end, and the energy agent's
restoration step on a case built so that magnitude alone picks the wrong channel."""

import random

import optuna
import pytest
import torch
from torch import nn

from autoprune.cli import main
from autoprune.cost import count_flops
from autoprune.energy import EnergyCosts, EnergyModel, measure_energy
from autoprune.errors import ParameterError
from autoprune.models import build_model
from autoprune.policy import Policy
from autoprune.pruning import ChannelPruner
from autoprune.space import Space

# the accesses of the module docstring's row-stationary mapping, worked out by hand per layer:
# W weights, I inputs, O outputs, M_g filters per group, R kernel rows
#   dram = W + I + O, buffer = W + M_g*I + O, pe = (R-1)*(M_g*I + O), rf = 4*MACs

# 3x3 conv, 2 -> 4 channels, 5x5 input, padding 1 (5x5 output): W = 4*2*9 = 72, I = 2*25 = 50,
# O = 4*25 = 100, MACs = 72*25 = 1800
CONV = {"mac": 1800, "rf": 4 * 1800, "pe": 2 * (4 * 50 + 100), "buffer": 72 + 4 * 50 + 100, "dram": 72 + 50 + 100}
# linear 10 -> 3: W = 30, I = 10, O = 3, MACs = 30, one kernel row (no inter-PE traffic)
LINEAR = {"mac": 30, "rf": 4 * 30, "pe": 0, "buffer": 30 + 3 * 10 + 3, "dram": 30 + 10 + 3}
# depthwise 3x3 on 4 channels, 5x5, padding 1: W = 4*9 = 36, I = O = 100, M_g = 1, MACs = 36*25 = 900
DEPTHWISE = {"mac": 900, "rf": 4 * 900, "pe": 2 * (100 + 100), "buffer": 36 + 100 + 100, "dram": 36 + 100 + 100}
DEFAULT = {"mac": 1, "rf": 1, "pe": 2, "buffer": 6, "dram": 200}  # Eyeriss's costs, relative to a MAC


def by_hand(accesses, costs):
    parts = {level: costs[level] * n for level, n in accesses.items()}
    return {**parts, "total": sum(parts.values())}


@pytest.mark.parametrize("layer, x, accesses, total", [
    (nn.Conv2d(2, 4, 3, padding=1), torch.zeros(1, 2, 5, 5), CONV, 1800 + 7200 + 2 * 600 + 6 * 372 + 200 * 222),
    (nn.Linear(10, 3), torch.zeros(1, 10), LINEAR, 30 + 120 + 0 + 6 * 63 + 200 * 43),
    (nn.Conv2d(4, 4, 3, padding=1, groups=4), torch.zeros(1, 4, 5, 5), DEPTHWISE,
     900 + 3600 + 2 * 400 + 6 * 236 + 200 * 236),
], ids=["conv3x3", "linear", "depthwise"])
def test_energy_of_one_layer_matches_the_hand_computed_accesses_per_level(layer, x, accesses, total):
    measured = measure_energy(nn.Sequential(layer), x, breakdown=True)["0"]
    assert measured == pytest.approx(by_hand(accesses, DEFAULT))
    assert measured["total"] == total  # 56832, 9128 and 53916 MAC-equivalents
    assert measured["mac"] == count_flops(nn.Sequential(layer), x)  # computation is the FLOPs (MACs)


def test_cost_overrides_change_the_figures_as_computed_by_hand():
    costs = EnergyCosts.parse("rf=2,dram=100")  # the others keep Eyeriss's: mac 1, pe 2, buffer 6
    assert costs == EnergyCosts(mac=1, rf=2, pe=2, buffer=6, dram=100)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1))
    measured = measure_energy(net, torch.zeros(1, 2, 5, 5), costs, breakdown=True)["0"]
    # 1800 + 2*7200 + 2*600 + 6*372 + 100*222
    assert measured["total"] == 1800 + 14400 + 1200 + 2232 + 22200 == 41832
    assert measured == pytest.approx(by_hand(CONV, {**DEFAULT, "rf": 2, "dram": 100}))
    assert EnergyCosts.parse({"pe": 0}).text() == "mac=1,rf=1,pe=0,buffer=6,dram=200"


@pytest.mark.parametrize("text, why", [
    ("sram=3", "unknown cost 'sram'; choose from mac, rf, pe, buffer, dram"),
    ("dram=-5", "dram='-5' must be a number >= 0"),
    ("dram=lots", "dram='lots' must be a number >= 0"),
    ("dram", "'dram' is not key=value"),
])
def test_bad_energy_costs_are_refused_naming_the_value_and_the_allowed_ones(text, why):
    with pytest.raises(ParameterError) as e:
        EnergyCosts.parse(text)
    assert why in str(e.value) and e.value.for_cli().startswith(f"--energy-costs {text}: ")


def test_energy_predicted_from_ratios_is_the_energy_measured_on_the_pruned_resnet20():
    model = build_model("resnet20", 3, 10, 32).eval()
    x = torch.zeros(1, 3, 32, 32)
    space = Space.from_model(model, x)
    energy = EnergyModel(space)
    assert energy.base == sum(measure_energy(model, x).values())
    pruner = ChannelPruner(space)
    rng = random.Random(0)
    for _ in range(4):
        ratios = {n: rng.uniform(0.0, 0.9) for n in space.names}
        pruned = pruner.prune(Policy(ratios))
        measured = measure_energy(pruned, x)
        assert energy.layers(ratios) == pytest.approx(measured, rel=1e-12)
        assert energy.predict(ratios) == pytest.approx(sum(measured.values()), rel=1e-12)
        assert energy.predict(ratios) < energy.base


# -- the command line: a budget, a search, apply, report ---------------------------------------

MODEL = ["--pretrain-steps", "40", "--device", "cpu", "--bn-batches", "2"]


def searched_and_applied(tmp_path, capsys, *argv):
    """Search under --budget-energy 50%, apply the exported policy, and return the policy, the pruned
    model and the unpruned model's energy measured here."""
    storage = f"sqlite:///{tmp_path}/autoprune.db"
    code = main(["search", "--budget-energy", "50%", *MODEL, "--storage", storage, "-o", str(tmp_path / "best.json"),
                 *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "energy (MAC-equivalents)" in out  # the summary's row
    code = main(["apply", str(tmp_path / "best.json"), "--device", "cpu", "-o", str(tmp_path / "pruned.pt")])
    out, err = capsys.readouterr()
    assert code == 0, err
    policy = Policy.load(tmp_path / "best.json")
    pruned = torch.load(tmp_path / "pruned.pt", weights_only=False)
    base = sum(measure_energy(build_model("resnet20", 1, 10, 8), torch.zeros(1, 1, 8, 8)).values())
    return policy, pruned, base, storage


def test_search_under_an_energy_budget_exports_a_policy_whose_applied_model_keeps_within_it(tmp_path, capsys):
    # the default agent (sensitivity), scanning one ratio only
    policy, pruned, base, storage = searched_and_applied(tmp_path, capsys, "--sensitivity-ratios", "0.9")
    energy = sum(measure_energy(pruned, torch.zeros(1, 1, 8, 8)).values())
    assert energy <= 0.5 * base
    assert policy.metrics["energy"] == pytest.approx(energy)  # what the study recorded is what apply rebuilds
    assert policy.metrics["energy_ratio"] == pytest.approx(energy / base)
    assert policy.metrics["base"]["energy"] == pytest.approx(base)
    assert policy.search["energy_costs"] == "mac=1,rf=1,pe=2,buffer=6,dram=200"
    study = optuna.load_study(study_name=policy.search["study"], storage=storage)
    assert study.study_name.endswith("-energy50")
    assert study.user_attrs["config"]["budgets"] == {"energy": "50%"}
    trial = study.trials[policy.search["trial"]]
    assert trial.user_attrs["feasible"] and trial.user_attrs["energy_ratio"] <= 0.5
    assert sum(trial.user_attrs["energy_layers"].values()) == pytest.approx(trial.user_attrs["energy"])

    # the report: energy per layer, unpruned and best, and the totals
    code = main(["report", "--study", study.study_name, "--storage", storage,
                 "-o", str(tmp_path / "report")])
    capsys.readouterr()
    assert code == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert "<h2>Energy per layer</h2>" in page and (tmp_path / "report" / "energy.png").is_file()
    from autoprune.budget import format_amount

    layer = "layer3.0.conv2"
    assert f"<td>{layer}</td><td>{format_amount('energy', policy.metrics['base']['energy_layers'][layer])}</td>" \
           f"<td>{format_amount('energy', policy.metrics['energy_layers'][layer])}</td>" in page
    assert f"<tr><th>total</th><th>{format_amount('energy', base)}</th><th>{format_amount('energy', energy)}</th>" \
           in page


def test_energy_agent_exports_a_feasible_policy_that_apply_rebuilds_channel_for_channel(tmp_path, capsys):
    policy, pruned, base, storage = searched_and_applied(
        tmp_path, capsys, "--agent", "energy", "--energy-step", "0.5", "--energy-restore", "1",
        "--energy-restore-batches", "1", "--energy-local-steps", "2", "--energy-global-steps", "2")
    energy = sum(measure_energy(pruned, torch.zeros(1, 1, 8, 8)).values())
    assert energy <= 0.5 * base
    assert policy.metrics["energy"] == pytest.approx(energy)
    # the kept channels are recorded for every pruned group, and apply keeps exactly those
    pruned_groups = {g for g, r in policy.ratios.items() if r > 0}
    assert pruned_groups and policy.keep is not None and set(policy.keep) == pruned_groups
    study = optuna.load_study(study_name="resnet20-digits-energy-energy50", storage=storage)
    trials = [t for t in study.trials if "policy" in t.user_attrs]
    assert all("energy_visits" in t.user_attrs for t in trials)  # every pass is a recorded candidate
    assert trials[-1].user_attrs["energy_reached"] and trials[-1].user_attrs["feasible"]
    visits = [v for t in trials for v in t.user_attrs["energy_visits"]]
    assert all(len(v["restored"]) == 1 for v in visits if v["removed"] >= 1)  # one restored per visit

    # no fine-tune was asked for, so apply's leading convs are the base model's rows and columns it kept
    from autoprune.config import SourceConfig
    from autoprune.runner import prepare

    base_model = prepare(SourceConfig.from_info(policy.model), device="cpu", log=lambda m: None).model
    space = Space.from_model(base_model, torch.zeros(1, 1, 8, 8))
    inputs = {layer.name: layer.in_groups for layer in space.layers()}
    base_modules, pruned_modules = dict(base_model.named_modules()), dict(pruned.named_modules())
    for group, kept in policy.keep.items():
        (source, _), = inputs[group]  # the group that sets the leading conv's input channels
        columns = policy.keep.get(source, list(range(space.by_name[source].channels)))
        assert torch.equal(pruned_modules[group].weight, base_modules[group].weight[kept][:, columns])


# -- refused input --------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, line", [
    (["--budget-energy", "150%"], "--budget-energy 150%: outside (0, 100%]: a budget keeps part of the original model"),
    (["--budget-energy", "50"], "--budget-energy 50: ambiguous: write 50% for a percentage or add a unit (K, M, G)"),
    (["--budget-energy", "50%", "--energy-costs", "sram=3"],
     "--energy-costs sram=3: unknown cost 'sram'; choose from mac, rf, pe, buffer, dram"),
    (["--budget-energy", "50%", "--energy-costs", "dram=-5"],
     "--energy-costs dram=-5: dram='-5' must be a number >= 0"),
    (["--budget-energy", "50%", "--granularity", "2:4"],
     "--granularity 2:4: an energy budget needs channel: masked weights still move"),
    (["--budget-energy", "10G", *MODEL], "--budget-energy 10G: the unpruned model needs only "),
    (["--budget-energy", "50%", "--agent", "energy", "--energy-step", "1"],
     "--energy-step 1: must be a number > 0 and < 1"),
], ids=["150%", "ambiguous", "unknown-cost", "negative-cost", "masked", "above-unpruned", "step"])
def test_bad_energy_input_is_refused_in_one_line(capsys, tmp_path, monkeypatch, argv, line):
    monkeypatch.chdir(tmp_path)
    code = main(["search", *argv])
    out, err = capsys.readouterr()
    assert code == 2, (out[-300:], err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("autoprune: error: " + line), lines[0]


# -- the restoration step ----------------------------------------------------------------------------


def test_restoration_brings_back_the_unit_whose_removal_raises_the_loss_most():
    from autoprune.agents.energy import restore

    # losses by the set of units still removed, made up so that unit 3 matters most, then unit 1
    cost = {0: 0.1, 1: 0.5, 2: 0.2, 3: 2.0}
    still, restored = restore([0, 1, 2, 3], 2, lambda gone: 1.0 + sum(cost[u] for u in gone))
    assert restored == [1, 3] and still == [0, 2]
    assert restore([0, 1, 2, 3], 0, lambda gone: 0.0) == ([0, 1, 2, 3], [])


class Teacher(nn.Module):
    """A 3-layer MLP whose middle layer (the one prunable group) has, in unit 0, the smallest weights
    (coming in and going out: a group's L1 counts both) and the whole answer: units 1-3 have larger
    weights but a bias that keeps them dead after the ReLU, unit 1 the smallest of them. The answer is
    unit 0's activation against a threshold (the bias of class 1), given confidently, so that the loss
    is small with unit 0 and large without it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 4)
        self.fc3 = nn.Linear(4, 2)
        with torch.no_grad():
            self.fc1.bias.zero_()
            self.fc2.weight[0] = 0.05  # L1 0.4 in, 1.0 out
            self.fc2.weight[1] = 30.0  # L1 240 in
            self.fc2.weight[2:] = 40.0  # L1 320 in
            self.fc2.bias.copy_(torch.tensor([0.0, -100.0, -100.0, -100.0]))
            self.fc3.weight.fill_(0.01)
            self.fc3.weight[:, 0] = torch.tensor([50.0, -50.0])  # L1 100 out: a confident answer
            self.fc3.bias.copy_(torch.tensor([0.0, 12.0]))

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_energy_agent_restores_the_low_magnitude_channel_the_loss_needs():
    from torch.utils.data import DataLoader, TensorDataset

    from autoprune.agents.base import SearchContext
    from autoprune.agents.energy import EnergyAgent
    from autoprune.budget import Budgets, parse_budget
    from autoprune.evaluator import Evaluator
    from autoprune.task import LoaderTask

    model = Teacher().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 4, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    assert 0.2 < y.float().mean() < 0.8  # both classes: a model without unit 0 answers one of them only
    data = DataLoader(TensorDataset(x, y), batch_size=64)
    task = LoaderTask.classification(data, data)
    ev = Evaluator(model, task, device="cpu", bn_batches=0)
    assert ev.space.names == ["fc2"]
    l1 = ev.pruner.scores("l1")["fc2"]
    assert int(l1.argmin()) == 0  # magnitude alone would remove unit 0 first
    ctx = SearchContext(ev, Budgets([parse_budget("energy", "90%")], ev), optuna.create_study(), "energy")
    agent = EnergyAgent(restore=1, local_steps=0)
    agent.batches = [next(iter(task.train_batches(0, augment=False)))]
    kept = {"fc2": [0, 1, 2, 3]}
    _, removed, restored = agent.visit(ctx, ev.model, kept, "fc2", 1, seed=0)
    # the two smallest units (0 and 1) were candidates; unit 0's removal raises the loss most: it comes back
    assert restored == [0] and removed == [1] and kept == {"fc2": [0, 2, 3]}


def test_an_energy_budget_on_a_masked_evaluator_is_refused(digits_task):
    from autoprune.budget import Budgets, parse_budget
    from autoprune.evaluator import Evaluator

    ev = Evaluator(build_model("resnet20", 1, 10, 8), digits_task, device="cpu", granularity="2:4", bn_batches=0)
    with pytest.raises(ParameterError, match="an energy budget needs channel"):
        Budgets([parse_budget("energy", "50%")], ev)
    assert "energy" not in ev.cost(ev.uniform(0.5))  # masked weights still move: no energy figure
