"""Train a GPT on a text corpus: python playground.py [CORPUS ...] [--flags] [--config file.yaml]

The job in three parts, each a function below:
    build_run   corpus + tokenizer -> token cache; model, optimizer, objective; state restored on --resume
    train_loop  for each step: learning rate -> train_step -> log -> evaluate -> checkpoint
    finish      loss-curve PNG and a text sample
with metrics (JSONL, optional wandb) and, when started by torchrun, DistributedDataParallel (a full replica per
process) or FSDP2 (--fsdp: each process holds a shard of the parameters, gradients and optimizer state).
"""

import contextlib
import math
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from config import TrainConfig, check_dependent_flags, fixed_on_resume, parse_config
from gpt import GPT, GPTConfig
from gptlab.checkpoint import load_checkpoint, save_checkpoint
from gptlab.convert import checkpoint_from_hf_folder
from gptlab.data import TokenSplit, batch_rng, build_token_cache, cache_key, val_start
from gptlab.errors import UsageError, run_cli
from gptlab.fileio import RunLock, check_output, check_output_dir
from gptlab.health import Health, plot_health
from gptlab.memory import MemoryPlan, gib, plan_run
from gptlab.metrics import Metrics, plot_losses
from gptlab.objectives import Objective, objective_for
from gptlab.runtime import Runtime, peak_flops, seconds_since_start, setup_runtime, teardown, to_device
from gptlab.tokenizer import MASK, LearnedFrom, Tokenizer, corpus_files, learned_from, train_tokenizer
from gptlab.training import learning_rate, make_optimizer, set_learning_rate, step_batches, train_step

DEFAULT_VOCAB_SIZE = 8000
EVAL_TRAIN_STREAM, EVAL_VAL_STREAM = 1, 2  # random streams of evaluation batches, apart from training's (0)
# --time_budget: the first steps (allocations, caches warming up) are slower than the rest, so the step time is
# measured over TIMED_STEPS steps after UNTIMED_STEPS; max_iters is fixed then, and checked again BUDGET_CHECKS - 1
# times, at quarters of the steps left (a machine's speed drifts by 10-20% over minutes).
UNTIMED_STEPS, TIMED_STEPS, BUDGET_CHECKS = 3, 20, 4
# Checkpointed state dicts: whole (unsharded) tensors under a plain GPT's names, copied to the CPU; under
# FSDP or DDP only rank 0 receives them (the others get empty dicts), so no rank holds the full model twice.
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class Run:
    """Everything a training run holds: made by build_run, advanced by train_loop."""

    c: TrainConfig
    rt: Runtime
    tokenizer: Tokenizer
    objective: Objective
    splits: dict[str, TokenSplit]
    model: GPT  # the plain model (under FSDP, each rank's shard of it): what is evaluated and saved
    step_model: torch.nn.Module  # what a training step runs: the model, compiled and/or DDP-wrapped
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    metrics: Metrics | None  # rank 0 only
    metrics_path: Path
    started: float  # time.perf_counter() when the command started
    plan: MemoryPlan  # the micro-batch each forward/backward pass takes, and the estimated peak memory
    health: Health  # bad-step guard, spike reaction, telemetry, EMA (gptlab/health.py)
    tokenizer_learned_from: LearnedFrom | None = None  # see gptlab.tokenizer.learned_from; None: unknown
    seconds_before: float = 0.0  # wall time of the runs this one resumes
    iteration: int = 0  # optimiser steps done
    best_val_loss: float = math.inf
    stop_requested: bool = False  # set by Ctrl-C or SIGTERM: save at the end of the current step, then stop
    stop_signal: int = signal.SIGINT  # the signal that asked, which sets the exit status (128 + its number)
    budget_checks: int = 0  # --time_budget: how many times max_iters has been (re)planned
    next_budget_check: int = 0  # the step at which it is planned next
    final: dict[str, float] = field(default_factory=dict)  # the latest evaluation

    @property
    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    @property
    def tokens_per_step(self) -> int:
        return self.c.batch_size * self.c.model.block_size * self.c.grad_accum_steps * self.rt.world_size


# ----------------------------------------------------------------------------- build the run

def resolve_tokenizer(c: TrainConfig, files: list[Path], rt: Runtime) -> tuple[Tokenizer, LearnedFrom | None]:
    """The --tokenizer file (the user's choice, trained on whatever they chose: what it learned from is unknown),
    or one trained on the corpus's training split alone (once; kept in out_dir, keyed by corpus, split and size),
    so the validation text stays unseen by everything that learns; with what it learned from (learned_from)."""
    if c.tokenizer is not None:
        tokenizer = Tokenizer.from_file(c.tokenizer)
        if c.vocab_size is not None and c.vocab_size != tokenizer.vocab_size:
            raise UsageError(f"--vocab_size {c.vocab_size} does not match {c.tokenizer}, which has "
                             f"{tokenizer.vocab_size} tokens (leave --vocab_size out to use the tokenizer's)")
        return tokenizer, None
    vocab_size = c.vocab_size or DEFAULT_VOCAB_SIZE
    # "val<fraction>" in the name: tokenizers saved before the split was held out (named without it) learned
    # from the validation text too, and are never picked up.
    key = cache_key(files, None, c.val_fraction)[:12]
    path = Path(c.out_dir) / f"tokenizer-{c.tokenizer_kind}{vocab_size}-val{c.val_fraction:g}-{key}.json"
    end = val_start(files, c.val_fraction)
    if rt.prepares_data and not path.exists():
        print(f"training a {c.tokenizer_kind} tokenizer ({vocab_size} tokens) on the corpus's training split -> "
              f"{path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        # With <mask> <pad> <cls> <sep> (4 of the vocab_size ids), so that the same tokenizer serves masked-LM
        # pretraining and fine-tuning (finetune.py) of the model trained here.
        train_tokenizer(files, c.tokenizer_kind, vocab_size, show_progress=True,
                        bert_tokens=True, end=end).save(path)
    wait_for(path, "the tokenizer")
    return Tokenizer.from_file(path), learned_from(files, end)


def wait_for(path: Path, what: str) -> None:
    """Wait until `path` exists: the other processes wait for the files that each machine's first process prepares.
    Polling, not a collective, since the tokenizer and token cache of a large corpus can take longer than NCCL's
    collective timeout; if the preparing process fails, torchrun stops the job."""
    shown = False
    while not path.exists():
        if not shown:
            print(f"waiting for {what} ({path}) from this machine's first process")
            shown = True
        time.sleep(0.5)


def load_data(c: TrainConfig, tokenizer: Tokenizer, files: list[Path], rt: Runtime) -> dict[str, TokenSplit]:
    """Token files for the train and val splits (built by rank 0 once, then reused)."""
    wait = None if rt.prepares_data else partial(wait_for, what="the token cache")
    splits = build_token_cache(files, tokenizer, Path(c.out_dir) / "token_cache", c.val_fraction, wait)
    for name, split in splits.items():
        if split.num_tokens < c.model.block_size + 1:
            raise UsageError(f"the {name} split has {split.num_tokens} tokens, fewer than block_size + 1 = "
                             f"{c.model.block_size + 1}: use a longer corpus, a smaller --block_size or another "
                             f"--val_fraction")
    return splits


def shard(model: GPT, rt: Runtime) -> None:
    """FSDP2, in place: each block, then the root (embeddings, final norm and the head tied to the token
    embedding), becomes a unit whose parameters are split across the ranks and gathered whole only while
    that unit computes. The parameters become DTensors, so make the optimizer afterwards. In bfloat16, the
    gathered parameters are bfloat16 (half the traffic) and gradients are reduced in float32."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if rt.dtype == torch.bfloat16 else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def sharded_model(config: GPTConfig, rt: Runtime, weights: dict[str, torch.Tensor] | None) -> GPT:
    """FSDP: the model is built without memory (meta device), sharded, then given storage on the device, so no
    GPU ever holds it whole; rank 0 makes the full initial weights (or the checkpoint's) in CPU memory and each
    rank receives its shard of them."""
    if rt.is_main and weights is None:
        weights = GPT(config).state_dict()  # the initial weights a single process would start from
    with torch.device("meta"):
        model = GPT(config)
    shard(model, rt)
    model.to_empty(device=rt.device)
    set_model_state_dict(model, weights if rt.is_main else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def build_model(c: TrainConfig, config: GPTConfig, rt: Runtime, weights: dict[str, torch.Tensor] | None,
                rng_states: dict[str, list[torch.Tensor]] | None) -> GPT:
    """The model of `config` with its initial weights (fresh, resumed, or --init_from's), on the device, sharded
    under FSDP; with rng_states, the dropout RNG of a resumed run."""
    torch.manual_seed(c.seed)  # the same initial weights on every rank (FSDP keeps each rank's shard of them)
    try:
        if rt.fsdp:
            model = sharded_model(config, rt, weights)
        else:
            model = GPT(config)
            if weights is not None:
                model.load_state_dict(weights)
            model = model.to(rt.device)
    except RuntimeError:
        raise UsageError(f"{c.init_from or c.checkpoint} holds a model of a different shape") from None
    torch.manual_seed(c.seed + rt.rank)  # but different dropout masks
    if rng_states is not None:
        restore_rng_states(rng_states, rt)
    return model


def build_run(c: TrainConfig, ckpt: dict[str, Any] | None, rt: Runtime, started: float,
              init: dict[str, Any] | None = None) -> Run:
    """ckpt: the checkpoint a --resume continues; init: the weights and tokenizer of --init_from."""
    if rt.fsdp and rt.dtype == torch.float16:
        raise UsageError("--fsdp with --dtype float16 is not supported: the loss scaler would look for "
                         "overflows in each rank's shard alone; use --dtype bfloat16")
    files = corpus_files(list(c.corpus))
    source = ckpt or init
    if source:  # a checkpoint from before the record, or a Hugging Face folder: unknown (None)
        tokenizer, learned = Tokenizer.from_json(source["tokenizer"]), source.get("tokenizer_learned_from")
    else:
        tokenizer, learned = resolve_tokenizer(c, files, rt)
    objective = objective_for(c.objective, tokenizer, c.mask_prob)
    splits = load_data(c, tokenizer, files, rt)
    config = replace(c.model, vocab_size=tokenizer.vocab_size, causal=objective.causal)
    plan = plan_run(c, config, rt)  # before anything is allocated: refuses what cannot fit
    model = build_model(c, replace(config, activation_checkpointing=plan.activation_checkpointing), rt,
                        source["model"] if source else None, ckpt["rng"] if ckpt else None)
    optimizer = make_optimizer(model, c, rt.device)
    if ckpt is not None:  # the saved state is whole; under FSDP each rank keeps its shard of it
        set_optimizer_state_dict(model, optimizer, ckpt["optimizer"], options=StateDictOptions(full_state_dict=True))
    step_model = torch.compile(model) if c.compile else model
    if rt.distributed and not rt.fsdp:
        step_model = DistributedDataParallel(step_model,
                                             device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
    if ckpt is not None and "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    resumed_at = ckpt["iteration"] if ckpt else None
    metrics = Metrics(metrics_path(c), c.to_dict(), resumed_at, c.wandb_project, c.wandb_run_name) \
        if rt.is_main else None
    health = Health(model, optimizer, c, rt, ckpt.get("health") if ckpt else None, ckpt.get("ema") if ckpt else None)
    run = Run(c, rt, tokenizer, objective, splits, model, step_model, optimizer, scaler, metrics, metrics_path(c),
              started, plan, health, tokenizer_learned_from=learned)
    if ckpt is not None:
        run.iteration, run.best_val_loss = ckpt["iteration"], ckpt["best_val_loss"]
        run.seconds_before = ckpt.get("seconds", 0.0)
    return run


def metrics_path(c: TrainConfig) -> Path:
    return Path(c.out_dir) / f"{Path(c.checkpoint).stem}.metrics.jsonl"


def plot_path(c: TrainConfig, picture: str = "loss") -> Path:
    """The loss curve (picture="loss") or the health heat maps (picture="health")."""
    return Path(c.out_dir) / f"{Path(c.checkpoint).stem}.{picture}.png"


def describe(run: Run) -> None:
    c, rt = run.c, run.rt
    if c.resume:
        print(f"resumed from step {run.iteration} of {c.checkpoint}")
    print(f"model: {run.model.num_parameters() / 1e6:.2f}M parameters (non-embedding), vocab "
          f"{run.tokenizer.vocab_size}, device {rt.device}, autocast {str(rt.dtype).removeprefix('torch.')}, "
          f"{rt.world_size} process(es)")
    print(f"data: train {run.splits['train'].num_tokens:,} tokens, val {run.splits['val'].num_tokens:,} tokens; "
          f"effective batch {c.batch_size} x {c.grad_accum_steps} accum x {rt.world_size} ranks = "
          f"{run.tokens_per_step:,} tokens/step ({rt.mode})")
    print(run.plan.describe())
    if c.fsdp and not rt.fsdp:
        print("--fsdp: one process has nothing to shard across, so the model stays whole (start with "
              "torchrun --nproc_per_node N to shard it)")


# ----------------------------------------------------------------------------- the loop

def train_loop(run: Run) -> None:
    """Steps until max_iters (or a Ctrl-C): the learning rate, one optimiser step, then logging, evaluation
    and checkpoints at their intervals. Under --time_budget, max_iters is fixed after the first steps."""
    c = run.c
    # disable=None: a bar on terminals only; logs and pipes get the evaluation lines
    bar = tqdm(total=c.max_iters, initial=run.iteration, desc="training", disable=None if run.rt.is_main else True,
               dynamic_ncols=True)
    meter = Throughput()
    run.next_budget_check = run.iteration + UNTIMED_STEPS + TIMED_STEPS
    while run.iteration < run.c.max_iters:
        lr = learning_rate(run.iteration, run.c) * run.health.lr_factor(run.iteration)
        set_learning_rate(run.optimizer, lr, run.c)
        if run.health.measures(run.iteration + 1):
            x, _ = step_batches(run.splits["train"], run.iteration, run.c, run.rt, run.objective)
            run.health.probe(to_device(x[:run.plan.micro_batch], run.rt.device))
        loss = train_step(run.step_model, run.optimizer, run.scaler, run.splits["train"], run.iteration, run.c,
                          run.rt, run.objective, run.plan.micro_batch, run.health)
        run.iteration += 1
        step, c = run.iteration, run.c
        meter.tokens += run.tokens_per_step
        if c.time_budget is not None and step == run.next_budget_check - TIMED_STEPS and not run.budget_checks:
            meter.start_timing(step)
        if c.time_budget is not None and step == run.next_budget_check:
            plan_time_budget(run, meter, bar)
            c = run.c
        # Read the stop flag once: a signal arriving later in this step must not stop it unsaved.
        stopping = stop_agreed(run)
        evaluating = step % c.eval_interval == 0 or step == c.max_iters
        saving = step % c.checkpoint_interval == 0 or step == c.max_iters or stopping
        if step % c.log_interval == 0 or evaluating or saving:
            log_step(run, loss, lr, meter, bar)
        log_health(run)
        bar.update(1)
        if evaluating:
            since = time.perf_counter()
            evaluate_and_log(run, bar)
            meter.exclude(since)  # evaluation time is not training throughput
        if saving:
            since = time.perf_counter()
            save(run)
            meter.exclude(since)
        if stopping:
            bar.close()
            if run.rt.is_main:
                print(f"stopped at step {step}; checkpoint {c.checkpoint} saved (continue with --resume)",
                      file=sys.stderr)
            if run.stop_signal == signal.SIGINT:
                raise KeyboardInterrupt  # exit status 130, as for any Ctrl-C
            raise SystemExit(128 + run.stop_signal)  # 143 for SIGTERM: what schedulers expect
    bar.close()


def stop_agreed(run: Run) -> bool:
    """Whether this step is the last one (a Ctrl-C or SIGTERM arrived). Under torchrun the signal reaches the
    ranks at different moments, so they agree at each log step (where the loss is synced anyway): all stop if
    one was asked."""
    if not run.rt.distributed:
        return run.stop_requested
    if run.iteration % run.c.log_interval and run.iteration != run.c.max_iters:
        return False
    flag = torch.tensor([int(run.stop_requested)], device=run.rt.device if run.rt.device.type == "cuda" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


class Throughput:
    """Tokens per second of training steps alone: restarted after evaluations and checkpoint writes."""

    def __init__(self) -> None:
        self.tokens, self.since = 0, time.perf_counter()
        self.timing_from, self.timing_step, self.excluded = self.since, 0, 0.0  # for --time_budget

    def start_timing(self, step: int) -> None:
        self.timing_from, self.timing_step, self.excluded = time.perf_counter(), step, 0.0

    def step_seconds(self, step: int) -> float:
        """Mean seconds per training step since start_timing, evaluations and checkpoint writes left out."""
        return (time.perf_counter() - self.timing_from - self.excluded) / max(1, step - self.timing_step)

    def exclude(self, since: float) -> None:
        """Leave the time from `since` to now out of the rates (an evaluation, a checkpoint write)."""
        self.excluded += time.perf_counter() - since
        self.restart()

    def restart(self) -> None:
        self.tokens, self.since = 0, time.perf_counter()

    def rate(self) -> float:
        return self.tokens / max(time.perf_counter() - self.since, 1e-9)


def log_step(run: Run, loss: torch.Tensor, lr: float, meter: Throughput, bar: tqdm) -> None:
    """The loss (averaged over ranks: the host-device syncs are here, once per log), lr, tokens/s, MFU and the
    health counts; then the reaction to bad steps since the last log (--on_spike). A non-finite loss is logged
    as it is: its update was skipped."""
    loss_value = mean_over_ranks(loss, run.rt)
    tok_s = meter.rate()
    meter.restart()
    logged = {"loss": loss_value, "lr": lr, "tokens_per_s": tok_s, **run.health.counters()}
    if run.scaler.is_enabled():
        logged["loss_scale"] = run.scaler.get_scale()
    peak = peak_flops(run.rt.device, run.rt.dtype)
    if peak:  # model FLOPs utilisation: achieved FLOP/s over the peak of all the ranks' GPUs
        logged["mfu"] = run.model.flops_per_token() * tok_s / (peak * run.rt.world_size)
    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}",
                    **({"mfu": f"{logged['mfu']:.1%}"} if peak else {}))
    if run.metrics:
        run.metrics.log(run.iteration, {**logged, "time_s": run.seconds})
    for event in run.health.check(run.iteration):
        bar.write(f"step {run.iteration}: {event}")
        if run.metrics:
            run.metrics.log(run.iteration, event)


def log_health(run: Run) -> None:
    """The per-layer telemetry of a health step, into the metrics."""
    row = run.health.take_row()
    if row and run.metrics:
        run.metrics.log(run.iteration, row)


def evaluate_and_log(run: Run, bar: tqdm) -> None:
    """DDP: rank 0 alone, on its replica. FSDP: every rank, on the same batches, since a sharded forward pass
    gathers each unit's parameters from all of them."""
    if not (run.rt.is_main or run.rt.fsdp):
        return
    run.final = evaluate(run.model, run.splits, run.c, run.rt, run.objective, run.plan.micro_batch)
    if run.health.ema is not None:  # the average, beside the raw weights
        ema = evaluate(run.health.ema.model, run.splits, run.c, run.rt, run.objective, run.plan.micro_batch)
        run.final.update({f"ema_{name}": value for name, value in ema.items()})
    run.best_val_loss = min(run.best_val_loss, run.final["val_loss"])
    if run.rt.is_main:
        ema = f", EMA val loss {run.final['ema_val_loss']:.4f}" if "ema_val_loss" in run.final else ""
        bar.write(f"step {run.iteration}: train loss {run.final['train_loss']:.4f}, val loss "
                  f"{run.final['val_loss']:.4f}, {run.objective.describe(run.final)}{ema}")
        run.metrics.log(run.iteration, {**run.final, "time_s": run.seconds})


def plan_time_budget(run: Run, meter: Throughput, bar: tqdm) -> None:
    """--time_budget: from the mean time of the steps so far and of one evaluation batch, the largest max_iters
    whose steps and evaluations end within the budget. Checked BUDGET_CHECKS times; after the last, the run is an
    ordinary one of that length (the config saved in checkpoints holds it), so resume stays exact."""
    c = run.c
    step_seconds = meter.step_seconds(run.iteration)
    eval_seconds = 2 * c.eval_iters * time_eval_batch(run)
    left = c.time_budget - run.seconds  # the budget counts from the command's start, resumed runs included

    def cost(n: int) -> float:  # seconds from now until step n and its final evaluation are done
        evaluations = n // c.eval_interval - run.iteration // c.eval_interval + (n % c.eval_interval != 0)
        return (n - run.iteration) * step_seconds + evaluations * eval_seconds

    n = run.iteration + max(0, int(left / step_seconds))
    while n > run.iteration and cost(n) > left:
        n -= max(1, (n - run.iteration) // 50)
    n = agree_on(max(n, run.iteration), run.rt)
    if cost(run.iteration) > left:  # even stopping now, the final evaluation ends past the budget: say so
        bar.write(f"time budget {c.time_budget:g}s cannot be met: {run.seconds:.1f}s are spent (tokenizer, data, "
                  f"{run.iteration} steps) and the final evaluation takes {eval_seconds:.1f}s, so the run stops at "
                  f"step {n}; --time_budget {run.seconds + eval_seconds + 100 * step_seconds:.0f} would train "
                  f"100 steps more ({step_seconds * 1e3:.1f} ms per step)")
    run.budget_checks += 1
    last = run.budget_checks == BUDGET_CHECKS or n - run.iteration < 4 * TIMED_STEPS
    run.c = c.replace(max_iters=n, time_budget=None if last else c.time_budget)
    run.next_budget_check = run.iteration + (n - run.iteration) // 4
    bar.total = n
    bar.write(f"time budget {c.time_budget:g}s: {step_seconds * 1e3:.1f} ms/step, {eval_seconds:.2f}s per "
              f"evaluation, {left:.1f}s left -> max_iters {n}")
    if run.metrics:
        run.metrics.log(run.iteration, {"planned_max_iters": n, "time_budget": c.time_budget})


@torch.no_grad()
def time_eval_batch(run: Run) -> float:
    """Seconds of one evaluation forward pass (on a throwaway batch, so no random stream moves)."""
    x, y = run.objective.batch(run.splits["val"], run.c.batch_size, run.c.model.block_size, batch_rng(0, 99, 0))
    run.model.eval()
    start = time.perf_counter()
    batch_loss(run.model, x, y, run.plan.micro_batch, run.rt, run.objective)
    seconds = time.perf_counter() - start
    run.model.train()
    return seconds


def agree_on(value: int, rt: Runtime) -> int:
    """Rank 0's value, on every rank."""
    if not rt.distributed:
        return value
    t = torch.tensor([value], device=rt.device if rt.device.type == "cuda" else "cpu")
    dist.broadcast(t, src=0)
    return int(t.item())


def checkpoint_state(run: Run) -> dict[str, Any]:
    """The checkpoint's contents. Every rank must call it: it gathers their RNG states and, under FSDP, their
    shards of the model and optimizer state."""
    return {"config": run.c.to_dict(), "model_config": asdict(run.model.config),
            "model": get_model_state_dict(run.model, options=FULL_STATE),
            "optimizer": get_optimizer_state_dict(run.model, run.optimizer, options=FULL_STATE),
            "scaler": run.scaler.state_dict(), "iteration": run.iteration, "best_val_loss": run.best_val_loss,
            "rng": gather_rng_states(run.rt), "seconds": run.seconds,
            "tokenizer": run.tokenizer.to_json(), "tokenizer_learned_from": run.tokenizer_learned_from,
            "health": run.health.state_dict(), **({"ema": run.health.ema.model.state_dict()} if run.health.ema else {})}


def save(run: Run) -> None:
    state = checkpoint_state(run)  # every rank takes part: it gathers from all of them
    if run.rt.is_main:
        save_checkpoint(state, run.c.checkpoint)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def batch_loss(model: GPT, x: torch.Tensor, y: torch.Tensor, micro_batch: int, rt: Runtime,
               objective: Objective) -> tuple[float, int, int]:
    """A batch's mean loss over its scored targets (those not -1), how many of them the model ranks first, and
    their count, computed in the memory plan's micro-batches: where those are smaller than the batch, the whole
    batch's logits may not fit."""
    loss_sum, correct, scored_count = 0.0, 0, 0
    for xm, ym in zip(x.split(micro_batch), y.split(micro_batch), strict=True):
        xm, ym = to_device(xm, rt.device), to_device(ym, rt.device)
        with rt.autocast():
            logits, loss = objective.loss(model, xm, ym)
        scored = ym != -1
        n = int(scored.sum())
        loss_sum += loss.item() * n if n else 0.0  # a micro-batch with nothing scored has a NaN mean
        correct += int((logits.argmax(-1)[scored] == ym[scored]).sum())
        scored_count += n
    return loss_sum / max(scored_count, 1), correct, scored_count


@torch.no_grad()
def estimate_loss(model: GPT, split: TokenSplit, stream: int, c: TrainConfig, rt: Runtime, objective: Objective,
                  micro_batch: int) -> tuple[float, float]:
    """Mean loss over `eval_iters` batches, and the fraction of predicted tokens the model ranks first;
    the same batches (and masks) at every evaluation, so curves are comparable."""
    model.eval()
    losses, correct, predicted = [], 0, 0
    for i in range(c.eval_iters):
        x, y = objective.batch(split, c.batch_size, c.model.block_size, batch_rng(c.seed, stream, i))
        loss, batch_correct, scored = batch_loss(model, x, y, micro_batch, rt, objective)
        losses.append(loss)
        correct += batch_correct
        predicted += scored
    model.train()
    return sum(losses) / len(losses), correct / max(predicted, 1)


def evaluate(model: GPT, splits: dict[str, TokenSplit], c: TrainConfig, rt: Runtime, objective: Objective,
             micro_batch: int) -> dict[str, float]:
    """Train and val loss, and what the objective reports (val bits per byte, or masked-token accuracy)."""
    train_loss, _ = estimate_loss(model, splits["train"], EVAL_TRAIN_STREAM, c, rt, objective, micro_batch)
    val_loss, val_accuracy = estimate_loss(model, splits["val"], EVAL_VAL_STREAM, c, rt, objective, micro_batch)
    return objective.report(train_loss, val_loss, val_accuracy, splits["val"])


def mean_over_ranks(loss: torch.Tensor, rt: Runtime) -> float:
    if rt.distributed:
        loss = loss.clone()
        dist.all_reduce(loss)
        loss /= rt.world_size
    return loss.item()


def gather_rng_states(rt: Runtime) -> dict[str, list[torch.Tensor]]:
    """Every rank's RNG states (dropout masks: the CPU generator, and the GPU's on CUDA), so a resumed run draws
    the same masks."""
    states = {"torch": torch.get_rng_state()}
    if rt.device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(rt.device)
    if not rt.distributed:
        return {name: [state] for name, state in states.items()}
    gathered: dict[str, list[torch.Tensor]] = {}
    for name, state in states.items():
        gathered[name] = [torch.empty_like(state) for _ in range(rt.world_size)]
        if rt.device.type == "cpu":
            dist.all_gather(gathered[name], state)
        else:
            dist.all_gather_object(gathered[name], state)
    return gathered


def restore_rng_states(saved: dict[str, list[torch.Tensor]], rt: Runtime) -> None:
    """This rank's RNG states from a checkpoint (one written by fewer ranks gives its states round-robin)."""
    torch.set_rng_state(saved["torch"][rt.rank % len(saved["torch"])])
    if rt.device.type == "cuda" and "cuda" in saved:
        torch.cuda.set_rng_state(saved["cuda"][rt.rank % len(saved["cuda"])], rt.device)


# ----------------------------------------------------------------------------- finish

def unsharded_copy(model: GPT, rt: Runtime) -> GPT | None:
    """Rank 0's plain copy of an FSDP model in CPU memory (None on the other ranks), for work rank 0 does alone:
    a sharded forward pass would wait for the others, and a whole copy might not fit its GPU. Every rank must
    call it, since it all-gathers."""
    full = get_model_state_dict(model, options=FULL_STATE)
    if not rt.is_main:
        return None
    copy = GPT(model.config)
    copy.load_state_dict(full)
    return copy


def finish(run: Run) -> None:
    """The loss-curve PNG and, for a model that writes text, a sample."""
    c, rt = run.c, run.rt
    writes_text = c.sample_tokens > 0 and run.objective.writes_text
    sampler = unsharded_copy(run.model, rt) if rt.fsdp and writes_text else run.model
    if not rt.is_main:
        return
    run.metrics.close()
    png = plot_path(c)
    if plot_losses(run.metrics_path, png):
        print(f"loss curve: {png}")
    health_png = plot_path(c, "health")
    if plot_health(run.metrics_path, health_png):
        print(f"health heat maps: {health_png}")
    print(f"checkpoint: {c.checkpoint}")
    if rt.device.type == "cuda":  # the memory model beside what the allocator saw (evaluations included)
        print(f"memory: peak {gib(torch.cuda.max_memory_allocated(rt.device))} allocated, estimated "
              f"{gib(run.plan.need)}")
    if writes_text:
        print("sample:\n" + sample(sampler, run.tokenizer, c.sample_tokens, rt))
    elif c.sample_tokens:
        print(f"an encoder fills masks rather than writing text: try python generate.py --checkpoint "
              f"{c.checkpoint} --prompt 'To be, or not to {MASK}'")


def sample(model: GPT, tokenizer: Tokenizer, max_new_tokens: int, rt: Runtime) -> str:
    """Text from scratch, from the start of a line: a continuation of a newline (after end-of-text, which a
    one-file corpus shows once, the model starts mid-word)."""
    model.eval()
    device = next(model.parameters()).device  # under FSDP, a CPU copy
    start = torch.tensor([tokenizer.encode("\n") or [tokenizer.eot_id]], device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad(), rt.autocast():
        out = model.generate(start, max_new_tokens, temperature=0.8, top_k=200, eos_id=tokenizer.eot_id,
                             generator=generator)
    return tokenizer.decode(out[0, start.size(1):].tolist())


# ----------------------------------------------------------------------------- the job

def resume_config(c: TrainConfig, set_by_flags: set[str]) -> tuple[TrainConfig, dict[str, Any]]:
    """On --resume, the run continues with the checkpoint's config; flags typed now override it, except those
    that would change the model or its tokenizer."""
    ckpt = load_checkpoint(c.checkpoint)
    if "optimizer" not in ckpt or "config" not in ckpt:
        raise UsageError(f"{c.checkpoint} holds no training state to resume (was it exported?)")
    saved = TrainConfig.from_dict(ckpt["config"]).to_dict()  # older checkpoints lack newer settings
    typed = {name: c.to_dict()[name] for name in set_by_flags}
    for name in set_by_flags & set(fixed_on_resume()):
        if typed[name] != saved[name]:
            raise UsageError(f"--{name} {typed[name]} differs from the checkpoint's {saved[name]}: "
                             f"a checkpoint resumes only with the model and optimizer it was trained with")
    if "tokenizer" in set_by_flags and Tokenizer.from_file(c.tokenizer).to_json() != ckpt["tokenizer"]:
        raise UsageError(f"--tokenizer {c.tokenizer} is not the tokenizer {c.checkpoint} was trained with")
    if "time_budget" in set_by_flags and saved["time_budget"] is None:
        raise UsageError(f"--time_budget: {c.checkpoint} has no time budget left to continue (a budgeted run fixes "
                         f"its max_iters, saved in the checkpoint, once timed): give --max_iters to train on, or "
                         f"start a fresh run with --time_budget")
    if "init_from" in set_by_flags:
        raise UsageError("--init_from starts a fresh run from a folder's weights; --resume continues a checkpoint: "
                         "give one of them")
    merged = TrainConfig.from_dict({**saved, **typed, "resume": True})
    if merged.max_iters <= ckpt["iteration"]:
        raise UsageError(f"{c.checkpoint} is already at step {ckpt['iteration']}: give a --max_iters above it to "
                         f"train on")
    return merged, ckpt


def init_config(c: TrainConfig, set_by_flags: set[str]) -> tuple[TrainConfig, dict[str, Any]]:
    """--init_from DIR: the run starts from a local Hugging Face folder's weights, taking its model settings and
    tokenizer; a flag typed now that contradicts them is an error."""
    start = checkpoint_from_hf_folder(c.init_from)
    theirs = start["model_config"]
    model_settings = {name: theirs[name] for name in fixed_on_resume() if name in theirs}
    for name in set_by_flags & set(model_settings):
        if c.to_dict()[name] != model_settings[name]:
            raise UsageError(f"--{name} {c.to_dict()[name]} contradicts {c.init_from}, whose model has "
                             f"{name} {model_settings[name]}")
    if c.tokenizer is not None and Tokenizer.from_file(c.tokenizer).to_json() != start["tokenizer"]:
        raise UsageError(f"--tokenizer {c.tokenizer} is not the tokenizer of {c.init_from}: leave it out")
    return c.replace(**model_settings), start


def check_fresh_run(c: TrainConfig) -> None:
    """A fresh run never silently replaces an earlier run's checkpoint, nor its metrics or loss plot (which
    outlive a checkpoint that was moved, or never written by a run killed before its first save)."""
    if Path(c.checkpoint).is_dir():  # --overwrite would not help: say so first
        raise UsageError(f"--checkpoint {c.checkpoint} is a folder; give a file name inside it")
    if Path(c.checkpoint).exists() and not c.overwrite:
        raise UsageError(f"{c.checkpoint} already exists: continue it with --resume, choose another --checkpoint, "
                         f"or replace it with --overwrite")
    for path, what in ((metrics_path(c), "metrics"), (plot_path(c), "loss plot"),
                       (plot_path(c, "health"), "health picture")):
        if path.exists() and not c.overwrite:
            raise UsageError(f"{path} already exists (an earlier run's {what}): choose another --checkpoint or "
                             f"--out_dir, or replace it with --overwrite")


def train(c: TrainConfig, set_by_flags: set[str] = frozenset(), started: float | None = None) -> dict[str, float]:
    """Run the whole training job; returns the final evaluation. started: time.perf_counter() when the command
    started (default: now), the start of a --time_budget."""
    started = time.perf_counter() if started is None else started
    ckpt = init = None
    if c.resume:
        c, ckpt = resume_config(c, set_by_flags)
    else:
        check_fresh_run(c)
        if c.init_from is not None:
            c, init = init_config(c, set_by_flags)
    check_dependent_flags(c, set_by_flags)  # with the settings a resume or --init_from brings
    check_outputs(c)
    rt = setup_runtime(c.device, c.dtype, c.fsdp)
    try:
        return run_job(c, ckpt, init, rt, started)
    finally:  # after run_job has returned: its model, optimizer and DDP wrapper are gone
        teardown(rt, sys.exception())  # the exception on its way out, or None


def run_job(c: TrainConfig, ckpt: dict[str, Any] | None, init: dict[str, Any] | None, rt: Runtime,
            started: float) -> dict[str, float]:
    # Rank 0 writes the checkpoint: it holds the lock that keeps a second run off it for the whole job.
    with RunLock(c.checkpoint) if rt.is_main else contextlib.nullcontext():
        run = build_run(c, ckpt, rt, started, init)
        if rt.is_main:
            describe(run)
        with stop_on_signals(run):
            train_loop(run)
        finish(run)
        return run.final


def check_outputs(c: TrainConfig) -> None:
    """Before any work: every file the run writes can be written, and none of them is one of its inputs."""
    inputs = [("corpus", path) for path in c.corpus] + [("--tokenizer", c.tokenizer)]
    check_output_dir(c.out_dir, "--out_dir")
    check_output(c.checkpoint, "--checkpoint", inputs)
    check_output(metrics_path(c), "--checkpoint's metrics file", inputs, [("--checkpoint", c.checkpoint)])


@contextlib.contextmanager
def stop_on_signals(run: Run) -> Iterator[None]:
    """Ctrl-C (SIGINT) or SIGTERM (timeout, docker, Kubernetes, SLURM) asks the loop to save a checkpoint at the
    end of the current step and stop. In a single process a second signal stops at once; under torchrun it is
    ignored, since torchrun forwards each signal it gets itself (and kills the ranks 30 s after the first)."""

    def handle(signum: int, frame: Any) -> None:
        if run.stop_requested:
            if run.rt.distributed:
                return
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        run.stop_requested, run.stop_signal = True, signum
        if run.rt.is_main:
            again = "" if run.rt.distributed else " (again to stop at once)"
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step{again}",
                  file=sys.stderr)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM before or after the training loop: unwind like Ctrl-C (the run lock is released), exit 143."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    started = time.perf_counter() - seconds_since_start()
    c, set_by_flags = parse_config(argv)
    train(c, set_by_flags, started)


if __name__ == "__main__":
    run_cli(main)
