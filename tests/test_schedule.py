"""Each learning-rate schedule matches its formula at the warmup start, warmup end, middle and end."""

import math

import pytest

from config import TrainConfig
from gptlab.training import learning_rate

LR, MIN_LR, WARMUP, MAX = 1e-3, 1e-4, 100, 1100


def cfg(schedule: str, **kw) -> TrainConfig:
    return TrainConfig(lr=LR, min_lr=MIN_LR, warmup_iters=WARMUP, max_iters=MAX, lr_schedule=schedule, **kw)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "wsd", "inverse_sqrt"])
def test_warmup_is_linear_from_lr_over_warmup_to_lr(schedule):
    c = cfg(schedule)
    assert learning_rate(0, c.max_iters, c) == pytest.approx(LR / WARMUP)
    assert learning_rate(49, c.max_iters, c) == pytest.approx(LR * 50 / WARMUP)
    assert learning_rate(WARMUP - 1, c.max_iters, c) == pytest.approx(LR)


def test_cosine():
    c = cfg("cosine")
    assert learning_rate(WARMUP, c.max_iters, c) == pytest.approx(LR)
    assert learning_rate(600, c.max_iters, c) == pytest.approx((LR + MIN_LR) / 2)  # halfway: cos(pi/2) = 0
    assert learning_rate(350, c.max_iters, c) == pytest.approx(MIN_LR + (LR - MIN_LR) * (1 + math.cos(math.pi / 4)) / 2)
    assert learning_rate(MAX, c.max_iters, c) == pytest.approx(MIN_LR)


def test_linear():
    c = cfg("linear")
    assert learning_rate(WARMUP, c.max_iters, c) == pytest.approx(LR)
    assert learning_rate(600, c.max_iters, c) == pytest.approx((LR + MIN_LR) / 2)
    assert learning_rate(850, c.max_iters, c) == pytest.approx(LR - (LR - MIN_LR) * 0.75)
    assert learning_rate(MAX, c.max_iters, c) == pytest.approx(MIN_LR)


def test_constant():
    c = cfg("constant")
    assert [learning_rate(i, c.max_iters, c) for i in (WARMUP, 600, MAX)] == pytest.approx([LR] * 3)


def test_wsd_is_stable_then_decays_over_the_last_fraction():
    c = cfg("wsd", decay_fraction=0.2)  # decay over steps 880 .. 1100
    assert learning_rate(WARMUP, c.max_iters, c) == pytest.approx(LR)
    assert learning_rate(880, c.max_iters, c) == pytest.approx(LR)
    assert learning_rate(990, c.max_iters, c) == pytest.approx((LR + MIN_LR) / 2)
    assert learning_rate(MAX, c.max_iters, c) == pytest.approx(MIN_LR)


def test_inverse_sqrt_with_a_floor_at_min_lr():
    c = cfg("inverse_sqrt")
    assert learning_rate(WARMUP - 1, c.max_iters, c) == pytest.approx(LR)
    assert learning_rate(399, c.max_iters, c) == pytest.approx(LR * math.sqrt(WARMUP / 400))  # = LR / 2
    assert learning_rate(10 ** 6, c.max_iters, c) == pytest.approx(MIN_LR)  # lr*sqrt(100/1e6) = 1e-5 < min_lr


def test_min_lr_defaults_to_a_tenth_of_lr():
    c = TrainConfig(lr=1e-3, warmup_iters=0, max_iters=10)
    assert learning_rate(10, c.max_iters, c) == pytest.approx(1e-4)
