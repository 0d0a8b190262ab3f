"""Muon: the Newton-Schulz orthogonalisation against an SVD reference, one Muon step by hand, the AdamW groups
against torch.optim.AdamW, bit-exact resume from a state dict (plain and torch.distributed.checkpoint's full
state dicts), the parameter split for a GPT, the FSDP refusal, and a loss that falls."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from gpt import GPT, GPTConfig
from gptlab.errors import UsageError
from gptlab.muon import Muon, muon_groups, newton_schulz

A, B, C = 3.4445, -4.7750, 2.0315


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=50, block_size=16, embedding_dim=32, num_of_layers=2, num_of_heads=2,
                         dropout=0.0))


def ns_by_svd(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The same iteration computed on the singular values: U p(p(...p(s / ||g||_F))) V^T, in float64."""
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    s = s / g.double().norm()
    for _ in range(steps):
        s = A * s + B * s**3 + C * s**5
    return (u * s) @ vh


@pytest.mark.parametrize("shape", [(96, 32), (32, 128), (32, 32)])
def test_newton_schulz_maps_singular_values_into_a_band_near_one(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    if shape[0] == shape[1]:  # a random square matrix has a near-zero singular value: lift it out of the tail
        u, _, vh = torch.linalg.svd(g)
        g = (u * torch.linspace(1.0, 20.0, shape[0])) @ vh
    o = newton_schulz(g)
    s = torch.linalg.svdvals(o)
    assert 0.5 <= s.min() and s.max() <= 1.5
    assert 0.65 <= s.min() and s.max() <= 1.21  # the band observed: p(1) = 0.70, overshoot to about 1.2
    s_in = torch.linalg.svdvals(g)
    assert s_in.max() / s_in.min() > 3 and s.max() / s.min() < 1.9  # far from the input's spread
    torch.testing.assert_close(o.double(), ns_by_svd(g), atol=2e-5, rtol=0)
    # Only the direction matters: the Frobenius normalisation removes the gradient's scale.
    torch.testing.assert_close(newton_schulz(1000 * g), o, atol=1e-5, rtol=0)


def test_newton_schulz_of_zero_is_zero():
    assert torch.equal(newton_schulz(torch.zeros(8, 4)), torch.zeros(8, 4))


def test_two_muon_steps_match_the_update_by_hand():
    torch.manual_seed(0)
    w0 = torch.randn(96, 32)  # tall, like attention's fused qkv: scale sqrt(96 / 32)
    g1, g2 = torch.randn(96, 32), torch.randn(96, 32)
    w = torch.nn.Parameter(w0.clone())
    lr, mu, wd = 0.02, 0.95, 0.1
    opt = Muon([{"params": [w], "use_muon": True, "lr": lr, "momentum": mu, "weight_decay": wd}])
    for g in (g1, g2):
        w.grad = g.clone()
        opt.step()

    scale = (96 / 32) ** 0.5
    buf1 = g1
    expected = w0.double() * (1 - lr * wd) - lr * scale * ns_by_svd(g1 + mu * buf1)
    buf2 = mu * buf1 + g2
    expected = expected * (1 - lr * wd) - lr * scale * ns_by_svd(g2 + mu * buf2)
    torch.testing.assert_close(w.detach().double(), expected, atol=1e-6, rtol=0)


def test_muon_without_nesterov_orthogonalises_the_momentum_buffer():
    torch.manual_seed(0)
    w0, g1, g2 = torch.randn(16, 48), torch.randn(16, 48), torch.randn(16, 48)  # wide: scale 1
    w = torch.nn.Parameter(w0.clone())
    opt = Muon([{"params": [w], "use_muon": True}], lr=0.05, momentum=0.9, nesterov=False)
    for g in (g1, g2):
        w.grad = g.clone()
        opt.step()
    expected = w0.double() - 0.05 * ns_by_svd(g1) - 0.05 * ns_by_svd(0.9 * g1 + g2)
    torch.testing.assert_close(w.detach().double(), expected, atol=1e-6, rtol=0)


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(0)
    params = [torch.randn(8, 4), torch.randn(4)]
    ours = [torch.nn.Parameter(p.clone()) for p in params]
    theirs = [torch.nn.Parameter(p.clone()) for p in params]
    settings = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8}
    opt = Muon([{"params": [ours[0]], "use_muon": False, "weight_decay": 0.1, **settings},
                {"params": [ours[1]], "use_muon": False, "weight_decay": 0.0, **settings}])
    ref = torch.optim.AdamW([{"params": [theirs[0]], "weight_decay": 0.1},
                             {"params": [theirs[1]], "weight_decay": 0.0}], **settings)
    for _ in range(6):
        grads = [torch.randn_like(p) for p in params]
        for o, t, g in zip(ours, theirs, grads, strict=True):
            o.grad, t.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for o, t, p in zip(ours, theirs, params, strict=True):
        assert not torch.equal(o, p)  # they moved
        torch.testing.assert_close(o, t, atol=1e-6, rtol=0)


def loss_on(model: GPT, step: int) -> torch.Tensor:
    """A fixed batch per step, so two runs see the same data."""
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, 50, (4, 16), generator=g)
    _, loss = model(x, torch.roll(x, -1, dims=1))
    return loss


def make_optimizer(model: GPT) -> Muon:
    return Muon(muon_groups(model.named_parameters(), weight_decay=0.1, adam_lr=3e-3, muon_lr=0.02,
                            muon_momentum=0.95, betas=(0.9, 0.95)))


def train(model: GPT, opt: Muon, steps: range) -> list[float]:
    losses = []
    for step in steps:
        loss = loss_on(model, step)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_state_dict_round_trip_resumes_bit_for_bit(tmp_path):
    model = tiny_gpt()
    opt = make_optimizer(model)
    train(model, opt, range(0, 6))

    resumed = tiny_gpt(seed=1)  # different weights, replaced below
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    resumed_opt = make_optimizer(resumed)
    resumed_opt.load_state_dict(ckpt["optimizer"])

    train(model, opt, range(6, 10))
    train(resumed, resumed_opt, range(6, 10))
    for (name, a), b in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.fixture
def single_process_group(tmp_path):
    """A gloo group of one process, which torch.distributed.checkpoint's full state dicts ask for."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_distributed_checkpoint_full_state_dict_resumes_bit_for_bit(single_process_group):
    """What playground.py does: get_optimizer_state_dict(full) to save, set_optimizer_state_dict on a fresh
    optimizer (whose state it first creates with a zero-lr step, which must not move the weights)."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model = tiny_gpt()
    opt = make_optimizer(model)
    train(model, opt, range(0, 5))
    saved = copy.deepcopy(get_optimizer_state_dict(model, opt, options=full))
    assert set(saved["state"]["blocks.0.mlp.fc.weight"]) == {"momentum_buffer"}
    assert set(saved["state"]["wte.weight"]) == {"step", "exp_avg", "exp_avg_sq"}

    resumed = copy.deepcopy(model)
    resumed_opt = make_optimizer(resumed)
    set_optimizer_state_dict(resumed, resumed_opt, saved, options=StateDictOptions(full_state_dict=True))
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    train(model, opt, range(5, 8))
    train(resumed, resumed_opt, range(5, 8))
    for (name, a), b in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_sharded_parameters_are_refused(single_process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    w = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]))
    with pytest.raises(UsageError, match="--optimizer muon does not support --fsdp"):
        Muon([{"params": [w], "use_muon": True}])


def test_muon_groups_send_exactly_the_block_matrices_to_muon():
    model = tiny_gpt()
    groups = muon_groups(model.named_parameters(), weight_decay=0.1, adam_lr=1e-3, muon_lr=0.02,
                         muon_momentum=0.9, betas=(0.9, 0.95))
    names = {id(p): n for n, p in model.named_parameters()}
    by_kind = {(g["use_muon"], g["weight_decay"]): sorted(names[id(p)] for p in g["params"]) for g in groups}
    block_matrices = sorted(f"blocks.{i}.{m}.weight" for i in range(2)
                            for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"))
    assert by_kind[(True, 0.0)] == block_matrices
    assert by_kind[(False, 0.1)] == ["wpe.weight", "wte.weight"]  # wte is also the tied lm_head
    decayed, not_decayed = model.decay_parameter_names()
    assert sorted(by_kind[(False, 0.0)]) == sorted(not_decayed)
    assert sorted(block_matrices + by_kind[(False, 0.1)]) == sorted(decayed)
    muon = next(g for g in groups if g["use_muon"])
    assert (muon["lr"], muon["momentum"]) == (0.02, 0.9)
    assert all(g["lr"] == 1e-3 and g["betas"] == (0.9, 0.95) for g in groups if not g["use_muon"])


def test_muon_weight_decay_goes_to_the_muon_matrices_alone():
    model = tiny_gpt()
    groups = muon_groups(model.named_parameters(), weight_decay=0.1, adam_lr=1e-3, muon_lr=0.02,
                         muon_momentum=0.9, betas=(0.9, 0.95), muon_weight_decay=0.3)
    assert sorted((g["use_muon"], g["weight_decay"]) for g in groups) == [(False, 0.0), (False, 0.1), (True, 0.3)]


def test_training_with_muon_weight_decay_shrinks_only_the_block_matrices():
    """Two runs from the same weights on the same batches, one with --muon_weight_decay: the block matrices end
    smaller, everything AdamW trains is untouched by the flag (its groups keep --weight_decay)."""
    from config import TrainConfig
    from gptlab.training import make_optimizer
    norms = []
    for muon_wd in (0.0, 5.0):
        torch.manual_seed(0)
        model = tiny_gpt()
        c = TrainConfig(optimizer="muon", muon_weight_decay=muon_wd, lr=0.0)  # lr 0: AdamW does not move
        opt = make_optimizer(model, c, torch.device("cpu"))
        x = torch.randint(0, model.config.vocab_size, (2, 8))
        for _ in range(3):
            model(x, x)[1].backward()
            opt.step()
            opt.zero_grad()
        norms.append({n: p.norm().item() for n, p in model.named_parameters()})
    for name, plain in norms[0].items():
        if "blocks." in name and name.endswith("weight") and model.get_parameter(name).dim() == 2:
            assert norms[1][name] < plain * 0.99, name
        else:
            assert norms[1][name] == plain, name


def test_muon_groups_keep_an_untied_head_with_adamw():
    model = tiny_gpt()
    model.lm_head.weight = torch.nn.Parameter(model.wte.weight.detach().clone())
    groups = muon_groups(model.named_parameters(), 0.1, 1e-3, 0.02, 0.95, (0.9, 0.95))
    head = next(g for g in groups if any(p is model.lm_head.weight for p in g["params"]))
    assert not head["use_muon"] and head["weight_decay"] == 0.1


@pytest.mark.parametrize("adam_lr, ratio", [(3e-3, 0.5), (0.0, 0.9)])
def test_training_with_muon_lowers_the_loss(adam_lr, ratio):
    """With adam_lr = 0 only the block matrices move (Muon alone): the loss still falls, if less."""
    model = tiny_gpt()
    wte = model.wte.weight.detach().clone()
    opt = Muon(muon_groups(model.named_parameters(), weight_decay=0.1, adam_lr=adam_lr, muon_lr=0.02,
                           muon_momentum=0.95, betas=(0.9, 0.95)))
    x = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(30):
        logits, _ = model(x)
        loss = F.cross_entropy(logits.view(-1, 50), torch.roll(x, -1, dims=1).view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < ratio * losses[0]
    assert torch.equal(model.wte.weight, wte) == (adam_lr == 0)


def test_groups_must_say_which_rule_they_follow():
    w = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="use_muon"):
        Muon([{"params": [w]}])
    with pytest.raises(ValueError, match="2-D"):
        Muon([{"params": [torch.nn.Parameter(torch.randn(4))], "use_muon": True}])
    with pytest.raises(ValueError, match="betas"):
        Muon([{"params": [w], "use_muon": True, "betas": (0.9, 0.95)}])
