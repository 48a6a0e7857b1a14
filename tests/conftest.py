import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from autoprune.data import load_dataset
from autoprune.models import build_model
from autoprune.pretrain import train_model
from autoprune.task import ImageClassificationTask

# Under pytest-xdist (`make test` runs one worker per core) every worker, and every command a test starts,
# computes on one thread: two workers of two threads each on two cores would oversubscribe them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)

# Property tests judge behaviour, never speed: no per-example deadline (Hypothesis's 200 ms default fails
# them at random on a loaded machine), and no health check that times the data generation either.
settings.register_profile("autoprune", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("autoprune")


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    """Keep pretrained weights of the test run out of the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("AUTOPRUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="session")
def digits_task(digits):
    """Image classification on digits, the built-in task every evaluator of these tests runs on."""
    return ImageClassificationTask(digits)


@pytest.fixture(scope="session")
def trained_resnet20(digits, digits_task):
    """A ResNet-20 trained briefly on digits: enough to be far better than chance."""
    model = build_model("resnet20", digits.in_channels, digits.num_classes, digits.image_size)
    acc = train_model(model, digits_task, 120, device=torch.device("cpu"))
    assert acc > 0.8
    return model.eval()


@pytest.fixture
def deterministic_latency(monkeypatch):
    """Latency as a fixed function of a model's work (1 ns per MAC), so that tests of latency budgets
    check behaviour, never the timings of a shared machine. The timer itself is tested in test_latency.py."""
    from autoprune.cost import count_flops

    def latency(model, example_input, warmup=5, repeats=20, batch_size=1):
        return 1e-9 * max(1, count_flops(model, example_input))

    monkeypatch.setattr("autoprune.evaluator.measure_latency", latency)
    monkeypatch.setattr("autoprune.latency_table.measure_latency", latency)
