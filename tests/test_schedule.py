"""Each learning-rate schedule matches its formula at the warmup start, warmup end, middle and end."""

import math

import pytest

from config import LR_SCHEDULES, TrainConfig
from gptlab.training import learning_rate

LR, MIN_LR, WARMUP, MAX = 1e-3, 1e-4, 100, 1100


def cfg(schedule: str, **kw) -> TrainConfig:
    return TrainConfig(lr=LR, min_lr=MIN_LR, warmup_iters=WARMUP, max_iters=MAX, lr_schedule=schedule, **kw)


@pytest.mark.parametrize("schedule", LR_SCHEDULES)
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


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_embedding_lr_scales_the_token_embeddings_step_and_nothing_else(optimizer):
    """One step from the same weights and batch: with --embedding_lr 10 x lr the token embedding moves exactly
    10 times as far (AdamW's step, weight decay included, is proportional to its lr) and every other parameter
    moves as it does without the flag; the schedule's lr reaches the group scaled the same way."""
    import torch

    from gpt import GPT, GPTConfig
    from gptlab.training import make_optimizer, set_learning_rate

    def step(embedding_lr: float | None) -> tuple[dict[str, torch.Tensor], torch.optim.Optimizer]:
        c = TrainConfig(model=GPTConfig(vocab_size=40, block_size=8, embedding_dim=16, num_of_layers=2,
                                        num_of_heads=2, dropout=0.0, tie_embeddings=False),
                        lr=1e-3, weight_decay=0.1, optimizer=optimizer, embedding_lr=embedding_lr)
        torch.manual_seed(0)
        model = GPT(c.model)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = make_optimizer(model, c, torch.device("cpu"))
        set_learning_rate(opt, 0.5e-3, c)  # half-way down some schedule: every group at half its peak
        x = torch.randint(0, 40, (4, 8), generator=torch.Generator().manual_seed(1))
        model(x, x)[1].backward()
        opt.step()
        return {n: p.detach() - before[n] for n, p in model.named_parameters()}, opt

    plain, plain_opt = step(None)
    scaled, opt = step(1e-2)
    assert not any(g.get("embedding") for g in plain_opt.param_groups)  # no flag: the groups as they were
    (own,) = [g for g in opt.param_groups if g.get("embedding")]
    assert own["lr"] == pytest.approx(0.5e-2) and len(own["params"]) == 1 and own["weight_decay"] == 0.1
    # atol: float32 rounds p (1 - lr wd) - p, the whole step of a row whose token is not in the batch
    torch.testing.assert_close(scaled["wte.weight"], 10 * plain["wte.weight"], rtol=1e-4, atol=1e-7)
    for name in plain:
        if name != "wte.weight":
            torch.testing.assert_close(scaled[name], plain[name], rtol=0, atol=0)
