"""Timing and the training set-up that bench.py and gpu_check.py share: seconds per call of a function on a
device, an achievable matmul peak, and a model with its optimizer, loss scaler and random tokens, stepped by
training.train_step (the step the training loop runs)."""

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from config import TrainConfig
from gpt import GPT, GPTConfig
from gptlab.data import TokenSplit, token_dtype
from gptlab.health import Health
from gptlab.objectives import NextToken
from gptlab.runtime import Runtime
from gptlab.training import Stepper, make_optimizer, train_step


def sync(device: torch.device) -> None:
    """Wait for the device's queued work: GPU calls return before they finish."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], object], warmup: int, iters: int, device: torch.device) -> float:
    """Seconds per call, after `warmup` untimed calls (compilation, allocator, caches)."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def matmul_flops(device: torch.device, dtype: torch.dtype, size: int, iters: int) -> float:
    """FLOP/s of a size x size x size matmul: what this device achieves at its best, measured on the spot."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size ** 3 / seconds_per_call(lambda: a @ b, 2, iters, device)


def random_tokens(folder: Path, vocab_size: int, block_size: int) -> TokenSplit:
    """Random tokens, in the dtype the token cache would use for this vocabulary: speed does not depend on the
    text, and nothing is downloaded."""
    n = max(200_000, 2 * block_size + 2)
    dtype = token_dtype(vocab_size)
    path = folder / "random_tokens.bin"
    np.random.default_rng(0).integers(0, vocab_size, n).astype(dtype).tofile(path)  # scratch, in a temp folder
    return TokenSplit((path,), dtype, n, n)


@dataclass
class Trainer:
    """A model, its optimizer and loss scaler, and random tokens to train on, one train_step at a time.
    `step_model` is what a step runs: the model itself, torch.compile of it, or a DDP wrapper of it."""

    model: GPT
    step_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    config: TrainConfig
    rt: Runtime
    split: TokenSplit
    folder: tempfile.TemporaryDirectory  # holds split's file; removed with the Trainer
    health: Health | None = None  # the step guard and telemetry, as the training loop runs them
    iteration: int = 0

    @property
    def tokens_per_step(self) -> int:
        return self.config.batch_size * self.config.model.block_size

    def step(self) -> torch.Tensor:
        loss = train_step(Stepper(self.step_model, self.optimizer, self.scaler, self.split, self.config, self.rt,
                                  NextToken(), health=self.health), self.iteration)
        self.iteration += 1
        return loss


def trainer(model_config: GPTConfig, batch_size: int, rt: Runtime, compile: bool = False,
            health_interval: int | None = None) -> Trainer:
    """A fresh model (seed 0) on rt.device with AdamW, a loss scaler for float16, and random tokens; with a
    health_interval, the health guard of every step and telemetry every health_interval steps (0: none)."""
    c = TrainConfig(model=model_config, batch_size=batch_size, compile=compile, warmup_iters=0,
                    health_interval=health_interval or 0)
    torch.manual_seed(0)
    model = GPT(model_config).to(rt.device)
    optimizer = make_optimizer(model, c, rt.device)
    folder = tempfile.TemporaryDirectory()
    return Trainer(model, torch.compile(model) if compile else model, optimizer,
                   torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16), c, rt,
                   random_tokens(Path(folder.name), model_config.vocab_size, model_config.block_size), folder,
                   Health(model, optimizer, c, rt) if health_interval is not None else None)


def write_repeated(path: Path, texts: list[bytes], mb: float) -> None:
    """A benchmark corpus: `texts` as documents (one per line break), repeated until `mb` MB are written."""
    written = 0
    with open(path, "wb") as f:  # scratch input in a temporary folder: nothing to keep whole
        while written < mb * 1_000_000:
            for text in texts:
                f.write(text + b"\n")
                written += len(text) + 1
                if written >= mb * 1_000_000:
                    break
