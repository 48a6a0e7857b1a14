"""The latency protocol, checked with an injected clock (nothing here is timed for real): a latency is
the least of three medians of 6 timed forward passes, after 5 untimed warm-up passes, of
``--latency-batch`` samples."""

import statistics
import types

import pytest
import torch
from torch import nn

import autoprune.cost
from autoprune.cost import measure_latency
from autoprune.evaluator import Evaluator

MS = 1e-3


class Clock:
    """A fake ``time`` module for :mod:`autoprune.cost` and a model whose forward passes advance it.

    Readings come in pairs around a timed pass (one before it, one after), so a pass run after an odd
    number of readings is a timed one and takes the next of ``timed`` seconds; any other pass is a
    warm-up and takes ``warmup`` seconds (slow, as first passes are). ``events`` is the sequence of
    clock readings ("T") and passes ("F"), ``batches`` the batch size of every pass."""

    def __init__(self, timed, warmup=1.0):
        self.now, self.timed, self.warmup = 0.0, list(timed), warmup
        self.events, self.batches, self.n_timed = [], [], 0

    def perf_counter(self):
        self.events.append("T")
        return self.now

    def forward(self, x):
        timed = self.events.count("T") % 2 == 1
        self.n_timed += timed
        self.now += self.timed.pop(0) if timed else self.warmup
        self.events.append("F")
        self.batches.append(x.shape[0])

    def timed_passes(self):
        """How many passes were timed, and the whole sequence of events as text."""
        return self.n_timed, "".join(self.events)


class Timed(nn.Module):
    def __init__(self, clock):
        super().__init__()
        self.clock = clock
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        self.clock.forward(x)
        return x


@pytest.fixture
def clock(monkeypatch):
    def install(timed, warmup=1.0):
        c = Clock(timed, warmup)
        monkeypatch.setattr(autoprune.cost, "time", types.SimpleNamespace(perf_counter=c.perf_counter))
        return c

    return install


def test_one_measurement_is_the_median_of_the_timed_passes_after_untimed_warm_ups(clock):
    c = clock([5 * MS, 1 * MS, 9 * MS, 2 * MS, 100 * MS, 3 * MS])
    result = measure_latency(Timed(c), torch.zeros(1, 3), warmup=5, repeats=6)
    # the median (4 ms), not the mean (20 ms) nor the least (1 ms); the 1 s warm-ups not at all
    assert result == pytest.approx(4 * MS)
    assert c.events[:5] == ["F"] * 5 and c.timed_passes()[0] == 6 and not c.timed


def test_the_evaluators_latency_is_the_least_of_three_medians_of_six_after_five_warm_ups(
        trained_resnet20, digits_task, clock):
    # three rounds of six timed passes: medians 5, 4 and 6 ms (means 36.7, 11.2 and 6 ms; least 1 ms;
    # the median of all eighteen 5.5 ms): only the least of the three medians is 4 ms
    rounds = [[5, 5, 5, 5, 100, 100], [1, 4, 4, 4, 4, 50], [6, 6, 6, 6, 6, 6]]
    ev = Evaluator(trained_resnet20, digits_task, device="cpu", bn_batches=0, latency=True, latency_batch=4)
    c = clock([t * MS for r in rounds for t in r])
    assert ev.latency_of(Timed(c)) == pytest.approx(4 * MS)
    count, events = c.timed_passes()
    assert count == 18 and not c.timed  # three rounds of six, every one of them used
    assert events.startswith("FFFFFT")  # five untimed warm-up passes before the first timed one
    assert statistics.median(t for r in rounds for t in r) != 4  # the figure cannot come from pooling
    # every pass, warm-ups included, runs --latency-batch samples
    assert set(c.batches) == {4}
