"""Learning-rate schedules: linear warmup, then cosine / WSD / constant down to min_lr_ratio."""

import math

import pytest

from megamoe.config import load_config
from megamoe.train.engine import lr_at


def cfg(schedule: str):
    return load_config(None, [f"optim.schedule={schedule}", "optim.lr=1.0", "optim.min_lr_ratio=0.1",
                              "optim.warmup_steps=10", "optim.decay_fraction=0.2", "train.steps=110"])


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_warmup_is_linear(schedule):
    c = cfg(schedule)
    assert [lr_at(c, s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])


def test_cosine_reaches_the_floor_at_the_last_step():
    c = cfg("cosine")
    assert lr_at(c, 10) == pytest.approx(1.0)
    assert lr_at(c, 60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(c, 110) == pytest.approx(0.1)
    lrs = [lr_at(c, s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_wsd_is_stable_then_decays_linearly_over_the_last_fraction():
    c = cfg("wsd")  # 110 steps, last 22 decay
    assert all(lr_at(c, s) == 1.0 for s in range(10, 88))
    assert lr_at(c, 88) < 1.0 and lr_at(c, 109) == pytest.approx(0.1)


def test_constant_stays():
    assert lr_at(cfg("constant"), 100) == 1.0
