"""Training health (gptlab/health.py): bad steps are skipped on the step they happen, the per-layer telemetry is
what it says, a spike is rolled back, and the moving average of the weights resumes bit for bit."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import corpus_slice

import playground
from config import TrainConfig, parse_config
from gpt import GPT, GPTConfig
from gptlab.checkpoint import load_checkpoint
from gptlab.data import TokenSplit, batch_rng, build_token_cache
from gptlab.health import Health
from gptlab.objectives import NextToken
from gptlab.runtime import Runtime
from gptlab.tokenizer import Tokenizer, corpus_files, train_tokenizer
from gptlab.training import make_optimizer, train_step

TINY = ["--embedding_dim", "32", "--num_of_layers", "2", "--num_of_heads", "2", "--block_size", "32",
        "--batch_size", "8", "--eval_iters", "4", "--log_interval", "5", "--warmup_iters", "5", "--lr", "3e-3",
        "--sample_tokens", "0", "--dropout", "0"]
CPU = Runtime(torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return corpus_slice(tmp_path_factory.mktemp("corpus"), 60_000)


@pytest.fixture(scope="module")
def tokenizer_path(corpus, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(corpus_files([corpus]), "bbpe", 320, show_progress=False).save(path)
    return path


@pytest.fixture(scope="module")
def split(corpus, tokenizer_path, tmp_path_factory) -> TokenSplit:
    folder = tmp_path_factory.mktemp("cache")
    return build_token_cache(corpus_files([corpus]), Tokenizer.from_file(tokenizer_path), folder, 0.1)["train"]


def train(tmp_path: Path, corpus: Path, tokenizer: Path, *extra: str, name: str = "ckpt") -> dict[str, float]:
    c, set_by_flags = parse_config([str(corpus), "--tokenizer", str(tokenizer), "--out_dir", str(tmp_path / "runs"),
                                    "--checkpoint", str(tmp_path / f"{name}.tar"), *TINY, *extra])
    return playground.train(c, set_by_flags)


def metrics(tmp_path: Path, name: str = "ckpt") -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "runs" / f"{name}.metrics.jsonl").read_text().splitlines()]


def poison_training_loss(monkeypatch, bad_calls: set[int], value: float = math.nan) -> None:
    """The training loss of the given forward calls (0-based, training mode only) becomes `value`."""
    real_loss, calls = NextToken.loss, [0]

    def loss(self, model, x, y):
        logits, out = real_loss(self, model, x, y)
        if model.training:
            calls[0] += 1
            if calls[0] - 1 in bad_calls:
                out = out * value
        return logits, out

    monkeypatch.setattr(NextToken, "loss", loss)


def tiny_setup(c: TrainConfig) -> tuple[GPT, torch.optim.Optimizer, Health]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=320, block_size=32, embedding_dim=32, num_of_layers=2, num_of_heads=2,
                          dropout=0.0, tie_embeddings=c.model.tie_embeddings))
    optimizer = make_optimizer(model, c, CPU.device)
    return model, optimizer, Health(model, optimizer, c, CPU)


def state_of(model: GPT, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    moments = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return [t.clone() for t in [*model.parameters(), *moments]]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])  # skipped on the device (fused AdamW), or by the host
def test_a_non_finite_step_leaves_weights_and_optimizer_untouched(optimizer, split, monkeypatch):
    c = TrainConfig(optimizer=optimizer, batch_size=4, grad_clip=1.0).replace(block_size=32)
    model, opt, health = tiny_setup(c)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_step(model, opt, scaler, split, 0, c, CPU, NextToken(), health)  # the moments exist from here on
    before = state_of(model, opt)
    poison_training_loss(monkeypatch, {0}, math.inf)
    train_step(model, opt, scaler, split, 1, c, CPU, NextToken(), health)
    assert all(torch.equal(a, b) for a, b in zip(before, state_of(model, opt), strict=True))
    counts = health.counters()
    assert counts["skipped_steps"] == 1 and counts["nonfinite_steps"] == 1
    train_step(model, opt, scaler, split, 2, c, CPU, NextToken(), health)  # and the next step trains again
    assert not torch.equal(before[0], next(model.parameters()))


def test_an_injected_nan_loss_is_skipped_and_training_continues(tmp_path, corpus, tokenizer_path, monkeypatch):
    poison_training_loss(monkeypatch, {7})
    final = train(tmp_path, corpus, tokenizer_path, "--max_iters", "30", "--eval_interval", "30")
    rows = metrics(tmp_path)
    assert math.isfinite(final["val_loss"]) and final["val_loss"] < rows[0]["loss"] - 0.5
    last = [r for r in rows if "skipped_steps" in r][-1]
    assert last["step"] == 30 and last["nonfinite_steps"] == 1 and last["skipped_steps"] == 1
    assert all(torch.isfinite(t).all() for t in load_checkpoint(tmp_path / "ckpt.tar")["model"].values())


@pytest.mark.parametrize("tied", [True, False])
def test_layer_telemetry_equals_norms_computed_by_hand(tied, split):
    c = TrainConfig(batch_size=4, grad_clip=0.0, health_interval=1, lr=1e-2).replace(block_size=32,
                                                                                      tie_embeddings=tied)
    model, opt, health = tiny_setup(c)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for it in range(2):  # at step 1 AdamW has moments: an ordinary update
        x, y = NextToken().batch(split, 4, 32, batch_rng(0, 0, it))
        _, loss = model(x, y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        norm = torch.nn.utils.get_total_norm(list(grads.values()))
        assert health.before_update(it, loss.detach(), norm, opt, scaler)
        opt.step()
        health.after_update(it, opt)
        opt.zero_grad(set_to_none=True)
        row = health.take_row()
    layers = {"embed": ("wte.", "wpe."), "block0": ("blocks.0.",), "block1": ("blocks.1.",),
              "head": ("ln_f.", "lm_head.")}
    for layer, prefixes in layers.items():
        names = [n for n in grads if n.startswith(prefixes)]
        grad = torch.cat([grads[n].flatten() for n in names]).norm()
        weight = torch.cat([before[n].flatten() for n in names]).norm()
        delta = torch.cat([(dict(model.named_parameters())[n].detach() - before[n]).flatten() for n in names]).norm()
        assert row[f"grad_norm/{layer}"] == pytest.approx(grad.item(), rel=1e-5)
        assert row[f"weight_norm/{layer}"] == pytest.approx(weight.item(), rel=1e-5)
        assert row[f"update_ratio/{layer}"] == pytest.approx((delta / weight).item(), rel=1e-4)
    assert ("lm_head.weight" in grads) == (not tied)  # tied: the head's matrix is counted under embed
