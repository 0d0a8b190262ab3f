"""What the training loop (playground.py), fine-tuning (finetune.py) and the benchmark (bench.py) share: the
learning-rate schedule, the optimizer, and one optimiser step over gradient-accumulation micro-batches (with
DDP/FSDP gradient sync)."""

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from config import TrainConfig
from gpt import GPT
from gptlab.data import TokenSplit, batch_rng
from gptlab.health import Health
from gptlab.muon import Muon, muon_groups, require_whole_matrices
from gptlab.objectives import Objective
from gptlab.runtime import Runtime, to_device

TRAIN_STREAM = 0  # the random stream of training batches (evaluation draws from its own streams)


class ScheduleSettings(Protocol):
    """What the schedule reads: a TrainConfig, or a Schedule."""

    lr: float
    warmup_iters: int
    lr_schedule: str
    decay_fraction: float

    @property
    def final_lr(self) -> float: ...


@dataclass(frozen=True)
class Schedule:
    """A schedule's settings for a loop without a TrainConfig (fine-tuning's: warmup, then linear to 0)."""

    lr: float
    warmup_iters: int
    lr_schedule: str = "linear"
    final_lr: float = 0.0
    decay_fraction: float = 0.0


def learning_rate(it: int, max_iters: int, c: ScheduleSettings) -> float:
    """The learning rate for optimiser step `it` (0-based) of `max_iters`: linear warmup, then the chosen schedule.

    With p the fraction of the post-warmup steps done (0 -> 1):
        cosine        min + (lr - min) * (1 + cos(pi p)) / 2
        linear        lr - (lr - min) * p
        constant      lr
        wsd           lr until the last `decay_fraction` of the run, then linear down to min
        inverse_sqrt  lr * sqrt(warmup / (it + 1)), never below min
    """
    if it < c.warmup_iters:
        return c.lr * (it + 1) / c.warmup_iters
    p = min(1.0, (it - c.warmup_iters) / max(1, max_iters - c.warmup_iters))
    lr, low = c.lr, c.final_lr
    if c.lr_schedule == "cosine":
        return low + (lr - low) * (1 + math.cos(math.pi * p)) / 2
    if c.lr_schedule == "linear":
        return lr - (lr - low) * p
    if c.lr_schedule == "constant":
        return lr
    if c.lr_schedule == "wsd":
        decay_start = max_iters * (1 - c.decay_fraction)
        q = min(1.0, max(0.0, (it - decay_start) / max(1.0, max_iters - decay_start)))
        return lr - (lr - low) * q
    if c.lr_schedule == "inverse_sqrt":
        return max(low, lr * math.sqrt(max(1, c.warmup_iters) / (it + 1)))
    raise ValueError(c.lr_schedule)


def make_optimizer(model: GPT, c: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, or Muon for the block matrices with AdamW for the rest (one optimizer object either way); with
    --embedding_lr the token embedding gets a param group of its own."""
    if c.optimizer == "muon":
        require_whole_matrices(model.parameters())
        groups = muon_groups(model.named_parameters(), c.weight_decay, c.lr, c.muon_lr, c.muon_momentum,
                             (c.beta1, c.beta2), c.muon_weight_decay)
        return Muon(embedding_group(groups, model, c.embedding_lr))
    # fused AdamW updates all parameters in one kernel; it exists for CPU and CUDA tensors (DTensors too).
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(embedding_group(model.optimizer_groups(c.weight_decay), model, c.embedding_lr),
                             lr=c.lr, betas=(c.beta1, c.beta2), fused=fused)


def embedding_group(groups: list[dict], model: GPT, embedding_lr: float | None) -> list[dict]:
    """The groups with the token embedding moved into one of its own (same settings, lr embedding_lr, marked
    "embedding"); unchanged when embedding_lr is None, so a run without the flag keeps its optimizer state."""
    if embedding_lr is None:
        return groups
    table = model.wte.weight
    home = next(g for g in groups if any(p is table for p in g["params"]))
    home["params"] = [p for p in home["params"] if p is not table]
    own = {**home, "params": [table], "lr": embedding_lr, "embedding": True}
    return [g for g in groups if g["params"]] + [own]


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float, c: TrainConfig) -> None:
    """This step's learning rate; Muon's matrices and the token embedding (with --embedding_lr) follow the same
    schedule scaled to their own peaks, --muon_lr and --embedding_lr."""
    def scale(peak: float) -> float:
        return peak / c.lr if c.lr > 0 else 0.0

    for group in optimizer.param_groups:
        if group.get("use_muon"):
            group["lr"] = lr * scale(c.muon_lr)
        elif group.get("embedding"):
            group["lr"] = lr * scale(c.embedding_lr)
        else:
            group["lr"] = lr


def step_batches(split: TokenSplit, it: int, c: TrainConfig, rt: Runtime,
                 objective: Objective) -> tuple[torch.Tensor, torch.Tensor]:
    """All of this process's sequences for optimiser step `it`: its grad_accum_steps micro-batches of batch_size,
    drawn as always, stacked (so a memory plan that splits them otherwise sees the same tokens)."""
    xs, ys = [], []
    for micro in range(c.grad_accum_steps):
        # Global slot of this micro-batch: the batches depend on the step, not on how many ranks share it.
        slot = (it * c.grad_accum_steps + micro) * rt.world_size + rt.rank
        x, y = objective.batch(split, c.batch_size, c.model.block_size, batch_rng(c.seed, TRAIN_STREAM, slot))
        xs.append(x)
        ys.append(y)
    if len(xs) == 1:  # the usual case: no copy
        return xs[0], ys[0]
    return torch.cat(xs), torch.cat(ys)


@dataclass
class Stepper:
    """What one optimiser step needs: the model it runs (compiled and/or DDP-wrapped), its optimizer and loss
    scaler, where its batches come from, the micro-batch of the memory plan, and the health guard."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    split: TokenSplit
    c: TrainConfig
    rt: Runtime
    objective: Objective
    micro_batch: int | None = None  # default batch_size; a memory plan may choose another divisor of the step
    health: Health | None = None


def train_step(s: Stepper, it: int) -> torch.Tensor:
    """Optimiser step `it` over the step's sequences, in micro-batches; returns the mean micro-batch loss (a
    tensor). With a health guard, a bad step's update is skipped and a health step is measured
    (gptlab/health.py)."""
    c, rt = s.c, s.rt
    x_all, y_all = step_batches(s.split, it, c, rt, s.objective)
    size = s.micro_batch or c.batch_size
    if s.health is not None and s.health.measures(it + 1):
        s.health.probe(to_device(x_all[:size], rt.device))
    micro_batches = list(zip(x_all.split(size), y_all.split(size), strict=True))

    def micro_loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # [1]: the loss alone; holding the logits (B x T x vocab) through the backward pass costs memory
        return s.objective.loss(s.model, to_device(batch[0], rt.device), to_device(batch[1], rt.device))[1]

    return optimizer_step(s.model, s.optimizer, s.scaler, rt, micro_batches, micro_loss, c.grad_clip, s.health, it)


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, rt: Runtime,
                   micro_batches: Sequence[Any], micro_loss: Callable[[Any], torch.Tensor], grad_clip: float,
                   health: Health | None = None, it: int = 0) -> torch.Tensor:
    """One optimiser step, whatever the batches hold: the mean of micro_loss over the micro-batches (run under
    autocast; gradients synced on the last one only), clipping to grad_clip (0 = off), the health guard, the
    update. Returns the mean loss (a tensor)."""
    total = torch.zeros((), device=rt.device)
    for micro, batch in enumerate(micro_batches):
        with gradient_sync(model, micro == len(micro_batches) - 1):
            with rt.autocast():
                loss = micro_loss(batch)
            scaler.scale(loss / len(micro_batches)).backward()
        total += loss.detach()
    loss = total / len(micro_batches)
    grad_norm = None
    if grad_clip > 0 or health is not None:  # both need the true (unscaled) gradients
        scaler.unscale_(optimizer)
        grad_norm = gradient_norm(model, grad_clip)
    if health is None or health.before_update(it, loss, grad_norm, optimizer, scaler):
        scaler.step(optimizer)
    scaler.update()
    if health is not None:
        health.after_update(it, optimizer)
    optimizer.zero_grad(set_to_none=True)
    return loss


def gradient_norm(model: torch.nn.Module, grad_clip: float) -> torch.Tensor:
    """The global gradient norm before clipping (a device tensor), clipping to grad_clip if it is > 0."""
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def gradient_sync(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """DDP all-reduces and FSDP reduce-scatters gradients in backward(); on all micro-steps but the last
    (sync=False) the gradients only accumulate on each rank. Enter before the forward pass."""
    if sync:
        return contextlib.nullcontext()
    if isinstance(model, DistributedDataParallel):
        return model.no_sync()
    unwrapped = getattr(model, "_orig_mod", model)  # torch.compile wraps an FSDP model
    if isinstance(unwrapped, FSDPModule):
        return _fsdp_no_sync(unwrapped)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: FSDPModule) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
