"""gptlab/memory.py: the estimated peak of a training step against the peak measured in real training steps on
the CPU (every live tensor storage counted), over a grid of shapes, batch sizes and switches; activation
checkpointing (same numbers, less memory); and --max_memory's plan (same losses, accumulated; refusals).

`python tests/test_memory.py` prints the grid's table (docs/memory.md)."""

import json
import re
import tempfile
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import corpus_slice
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import playground
from config import TrainConfig, fixed_on_resume, parse_config
from gpt import GPT, GPTConfig
from gptlab import memory
from gptlab.checkpoint import load_checkpoint
from gptlab.cli import format_size, parse_size
from gptlab.convert import architecture_for
from gptlab.data import TokenSplit, token_dtype
from gptlab.errors import UsageError
from gptlab.objectives import NextToken
from gptlab.runtime import Runtime
from gptlab.tokenizer import corpus_files, train_tokenizer
from gptlab.training import Stepper, make_optimizer, train_step

BF16 = torch.bfloat16


class PeakTensorMemory(TorchDispatchMode):
    """Bytes of live tensor storages and their peak: those given at the start (weights, optimizer state) plus
    every storage an operation makes inside the mode (forward, backward and optimizer alike), until it is freed.
    What the CUDA allocator's max_memory_allocated counts, without its rounding."""

    def __init__(self, alive: list[torch.Tensor]) -> None:
        super().__init__()
        self.seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.current = 0
        for t in alive:
            self.count(t.untyped_storage())
        self.peak = self.current

    def count(self, storage: torch.UntypedStorage) -> None:
        if storage in self.seen:  # views share their base's storage
            return
        self.seen[storage] = True
        self.current += storage.nbytes()
        weakref.finalize(storage, self.free, storage.nbytes())

    def free(self, size: int) -> None:
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.count(t.untyped_storage())
        self.peak = max(self.peak, self.current)
        return out


def random_split(folder: Path, vocab_size: int) -> TokenSplit:
    n = 50_000
    path = folder / "tokens.bin"
    np.random.default_rng(0).integers(0, vocab_size, n).astype(token_dtype(vocab_size)).tofile(path)
    return TokenSplit((path,), token_dtype(vocab_size), n, n)


def training_setup(point: dict) -> tuple[GPTConfig, TrainConfig, Runtime]:
    """A grid point: model settings, plus batch (B), accumulation (accum), dtype and optimizer."""
    point = dict(point)
    train = {"batch_size": point.pop("B", 4), "grad_accum_steps": point.pop("accum", 1),
             "optimizer": point.pop("optimizer", "adamw"), "warmup_iters": 0}
    dtype = point.pop("dtype", torch.float32)
    shape = {"vocab_size": 512, "block_size": 64, "embedding_dim": 64, "num_of_layers": 2, "num_of_heads": 4,
             "dropout": 0.0}
    config = GPTConfig(**{**shape, **point})
    return config, TrainConfig(model=config, **train), Runtime(torch.device("cpu"), dtype)


def measured_peak(point: dict) -> int:
    """Peak tensor bytes of a real training step (training.train_step), the second one: the optimizer state
    exists, as in every step but the first."""
    config, c, rt = training_setup(point)
    torch.manual_seed(0)
    model = GPT(config)
    optimizer = make_optimizer(model, c, rt.device)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with tempfile.TemporaryDirectory() as folder:
        split = random_split(Path(folder), config.vocab_size)
        train_step(Stepper(model, optimizer, scaler, split, c, rt, NextToken()), 0)
        state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        with PeakTensorMemory(list(model.parameters()) + state) as tracker:
            train_step(Stepper(model, optimizer, scaler, split, c, rt, NextToken()), 1)
    return tracker.peak


def estimated_peak(point: dict) -> memory.Estimate:
    config, c, rt = training_setup(point)
    return memory.estimate(config, memory.Step(c.batch_size, c.grad_accum_steps, rt.dtype, c.optimizer, "cpu"))


# Shapes, batch sizes and every switch the estimate depends on; the base is 2 layers, 64 wide, 4 heads, T = 64,
# vocabulary 512, batch 4, float32, fused attention (SDPA), AdamW.
GRID = [
    {},
    {"attention": "scratch"},
    {"dtype": BF16},
    {"dtype": BF16, "attention": "scratch", "B": 2, "block_size": 128},
    {"activation_checkpointing": True},
    {"activation_checkpointing": True, "dtype": BF16, "vocab_size": 16, "num_of_layers": 4},
    {"optimizer": "muon", "B": 1, "embedding_dim": 128, "vocab_size": 300, "block_size": 32},
    {"mlp": "swiglu", "norm": "rmsnorm", "position": "rope", "bias": False, "dtype": BF16},
    {"mlp": "relu2", "qk_norm": True, "dropout": 0.1},
    {"dropout": 0.1, "attention": "scratch", "norm_position": "post"},
    {"accum": 2, "tie_embeddings": False, "logit_softcap": 30.0},
    {"B": 6, "block_size": 96, "embedding_dim": 96, "num_of_heads": 6, "vocab_size": 1000},
    {"B": 1, "block_size": 32, "embedding_dim": 128, "vocab_size": 2000},
    {"vocab_size": 16, "attention": "scratch", "num_of_layers": 3},
]


def label(point: dict) -> str:
    return ", ".join(f"{k}={'bf16' if v is BF16 else v}" for k, v in point.items()) or "base"


@pytest.mark.parametrize("point", GRID, ids=label)
def test_the_estimate_is_within_5_percent_of_the_measured_peak(point):
    measured, estimate = measured_peak(point), estimated_peak(point)
    # The issue asked for 15%; the model is within 0.1% at every point on torch 2.13, so 5% still catches a drift.
    assert estimate.peak == pytest.approx(measured, rel=0.05), f"{estimate}"


def test_activation_checkpointing_gives_the_same_loss_and_gradients_with_less_memory():
    results = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=128, block_size=32, embedding_dim=32, num_of_layers=3, num_of_heads=2,
                              dropout=0.1, activation_checkpointing=ckpt))  # the recompute replays the dropout
        x = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(2)
        _, loss = model(x, x)
        loss.backward()
        results[ckpt] = loss.item(), {n: p.grad for n, p in model.named_parameters()}
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results[False], results[True]
    assert loss_ckpt == pytest.approx(loss_plain, abs=1e-6)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-6, rtol=1e-6, msg=name)
    point = {"B": 4, "num_of_layers": 3}
    assert measured_peak({**point, "activation_checkpointing": True}) < 0.7 * measured_peak(point)


def test_activation_checkpointing_is_free_for_the_exporter_and_on_resume():
    assert architecture_for(GPTConfig(activation_checkpointing=True)) == "gpt2"
    assert "activation_checkpointing" not in fixed_on_resume()
    assert TrainConfig().replace(activation_checkpointing=True).to_dict()["activation_checkpointing"] is True


@pytest.mark.parametrize(("text", "size"), [("8GB", 8 * 2**30), ("512MB", 512 * 2**20), ("1.5 GiB", 3 * 2**29),
                                            ("1000", 1000), ("2TB", 2 * 2**40), ("3KiB", 3072), ("7B", 7)])
def test_sizes_read_as_powers_of_1024_and_a_bare_number_as_bytes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize(("text", "why"), [("8 parsecs", "is not a size"), ("GB", "is not a size"),
                                           ("-1GB", "is negative"), ("-5", "is negative"), ("0", "is below one byte")])
def test_a_bad_size_is_one_line_naming_the_flag_and_why(text, why):
    with pytest.raises(ValueError, match=why):
        parse_size(text)
    # typed as `--max_memory -1GB` (not only `--max_memory=-1GB`): argparse used to take it for a flag
    with pytest.raises(UsageError, match=f"--max_memory '{text}' {why}"):
        parse_config(["--max_memory", text])


def test_a_size_in_yaml_may_be_a_number_of_bytes():
    assert TrainConfig.from_dict({"max_memory": 1000}).max_memory == "1000"
    with pytest.raises(UsageError, match="--max_memory '-1' is negative"):
        TrainConfig.from_dict({"max_memory": -1})


def test_a_flag_value_starting_with_a_minus_is_its_value_not_a_flag():
    with pytest.raises(UsageError, match="--lr must be a number >= 0, got -0.001"):
        parse_config(["--lr", "-1e-3"])


def test_the_budget_in_a_refusal_shows_the_bytes_typed():
    assert [format_size(n) for n in (1000, 2560, 512 * 2**20, 8 * 2**30)] == \
        ["1,000 B", "2.5 KiB", "512.0 MiB", "8.00 GiB"]
    with pytest.raises(UsageError, match="above the 1,000 B budget"):
        memory.plan(PLAN_MODEL, 12, memory.Step(12, 1, device_type="cpu"), 1000, 12)


PLAN_MODEL = GPTConfig(vocab_size=512, block_size=64, embedding_dim=64, num_of_layers=2, num_of_heads=4)


def need(micro_batch: int, sequences: int = 12, ckpt: bool = False) -> int:
    config = GPTConfig(**{**PLAN_MODEL.__dict__, "activation_checkpointing": ckpt})
    return memory.estimate(config, memory.Step(micro_batch, sequences // micro_batch, device_type="cpu")).peak


def test_the_plan_takes_the_largest_dividing_micro_batch_that_fits():
    step = memory.Step(12, 1, device_type="cpu")
    assert memory.plan(PLAN_MODEL, 12, step, need(12), 12).micro_batch == 12
    assert memory.plan(PLAN_MODEL, 12, step, need(12) - 1, 12).micro_batch == 6
    plan = memory.plan(PLAN_MODEL, 12, step, need(4), 12)
    assert (plan.micro_batch, plan.micro_steps, plan.activation_checkpointing) == (4, 3, False)
    assert memory.plan(PLAN_MODEL, 12, step, None, 3).micro_batch == 3  # no budget: the user's micro-batch
    assert "12 sequences per step as 3 micro-batch(es) of 4" in plan.describe()


def test_checkpointing_only_when_one_sequence_does_not_fit_and_a_refusal_names_what_fits():
    step = memory.Step(12, 1, device_type="cpu")
    plan = memory.plan(PLAN_MODEL, 12, step, need(1) - 1, 12)
    assert plan.activation_checkpointing and plan.need <= need(1) - 1
    with pytest.raises(UsageError, match=r"--max_memory (\d+)MB would fit") as e:
        memory.plan(PLAN_MODEL, 12, step, 2**20, 12)
    fits = parse_size(re.search(r"--max_memory (\d+MB)", str(e.value)).group(1))
    assert memory.plan(PLAN_MODEL, 12, step, fits, 12).micro_batch == 1


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return corpus_slice(tmp_path_factory.mktemp("corpus"), 30_000)


@pytest.fixture(scope="module")
def tokenizer_path(corpus, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(corpus_files([corpus]), "bbpe", 320, show_progress=False).save(path)
    return path


TINY = {"embedding_dim": 32, "num_of_layers": 2, "num_of_heads": 2, "block_size": 32, "dropout": 0.0}


def train(tmp_path: Path, corpus: Path, tokenizer: Path, name: str, *flags: str) -> list[float]:
    """A short run on the CPU; its training loss at every step, then its final validation loss."""
    argv = [str(corpus), "--tokenizer", str(tokenizer), "--out_dir", str(tmp_path), "--checkpoint",
            str(tmp_path / f"{name}.tar"), *(f"--{k}={v}" for k, v in TINY.items()), "--batch_size", "8",
            "--max_iters", "4", "--log_interval", "1", "--eval_interval", "4", "--eval_iters", "1",
            "--warmup_iters", "2", "--lr", "3e-3", "--sample_tokens", "0", *flags]
    final = playground.train(*parse_config(argv))
    return losses(tmp_path / f"{name}.metrics.jsonl") + [final["val_loss"]]


def losses(metrics: Path) -> list[float]:
    return [row["loss"] for row in map(json.loads, metrics.read_text().splitlines()) if "loss" in row]


@pytest.fixture(scope="module")
def plain(corpus, tokenizer_path, tmp_path_factory) -> list[float]:
    """The losses of a run of 8 sequences per step, in one micro-batch, without checkpointing (4 steps, then
    the validation loss)."""
    return train(tmp_path_factory.mktemp("plain"), corpus, tokenizer_path, "plain")


def test_a_small_max_memory_accumulates_micro_batches_with_the_same_losses(tmp_path, corpus, tokenizer_path,
                                                                           plain, capsys):
    config = GPTConfig(vocab_size=320, **TINY)
    need = {m: memory.estimate(config, memory.Step(m, 8 // m, device_type="cpu")).peak for m in (2, 4)}
    planned = train(tmp_path, corpus, tokenizer_path, "planned", "--max_memory", str((need[2] + need[4]) // 2))
    assert "8 sequences per step as 4 micro-batch(es) of 2, activation checkpointing off" in capsys.readouterr().out
    assert planned == pytest.approx(plain, rel=1e-5, abs=1e-5) and len(plain) == 5  # evaluated in micro-batches too


def test_activation_checkpointing_is_saved_and_a_resume_may_turn_it_off(tmp_path, corpus, tokenizer_path, plain):
    first = train(tmp_path, corpus, tokenizer_path, "ckpt", "--activation_checkpointing", "--max_iters", "2")
    assert load_checkpoint(tmp_path / "ckpt.tar")["config"]["activation_checkpointing"] is True
    resumed = train(tmp_path, corpus, tokenizer_path, "ckpt", "--resume", "--no-activation_checkpointing")
    assert load_checkpoint(tmp_path / "ckpt.tar")["config"]["activation_checkpointing"] is False
    assert first[:2] == pytest.approx(plain[:2], abs=1e-5) and resumed == pytest.approx(plain, abs=1e-5)


def test_fsdp_divides_weights_gradients_and_optimizer_state_by_the_processes():
    """Not measured (the tests run one process): the arithmetic of sharding at the start of the backward pass
    of an accumulating step, where every gradient exists."""
    one, four = (memory.moments(PLAN_MODEL, memory.Step(4, 2, BF16, shards=n))[0] for n in (1, 4))
    assert (four.weights, four.gradients, four.optimizer) == (one.weights // 4, one.gradients // 4,
                                                              one.optimizer // 4)
    params = memory.Parameters.of(PLAN_MODEL)
    gathered = (params.total - PLAN_MODEL.num_of_layers * params.per_block + 2 * params.per_block) * 2
    assert four.activations == one.activations - params.linear * 2 + gathered  # gathered bf16, no autocast copies


def print_grid() -> None:
    print("| point | measured peak (bytes) | estimate (bytes) | error | peak moment (estimate) |")
    print("|---|---|---|---|---|")
    for point in GRID:
        measured, estimate = measured_peak(point), estimated_peak(point)
        print(f"| {label(point)} | {measured:,} | {estimate.peak:,} | {estimate.peak / measured - 1:+.1%} | "
              f"{estimate.moment} |")


if __name__ == "__main__":
    print_grid()
