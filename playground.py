"""Train a GPT on a text corpus: python playground.py [CORPUS ...] [--flags] [--config file.yaml]

The job in three parts, each a function below:
    build_run   corpus + tokenizer -> token cache; model, optimizer, objective; state restored on --resume
    train_loop  for each step: learning rate -> train_step -> log -> evaluate -> checkpoint
    finish      loss-curve and health PNGs, and a text sample
with metrics (JSONL, optional wandb) and, when started by torchrun, DistributedDataParallel (a full replica per
process) or FSDP2 (--fsdp: each process holds a shard of the parameters, gradients and optimizer state).
"""

import contextlib
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from config import TrainConfig, check_dependent_flags, parse_settings
from gpt import GPT, GPTConfig
from gptlab.checkpoint import ShardedSaver, checkpoint_exists, save_checkpoint
from gptlab.cli import format_size
from gptlab.data import TokenSplit, batch_rng
from gptlab.errors import Diverged, UsageError, run_cli
from gptlab.evaluation import batch_loss, evaluate
from gptlab.fileio import RunLock
from gptlab.health import Health, describe_event, plot_health
from gptlab.memory import MemoryPlan, plan_run
from gptlab.metrics import Metrics, plot_losses
from gptlab.objectives import Objective, objective_for
from gptlab.pacing import Throughput, TimeBudget
from gptlab.preparation import corpus_of, load_data, resolve_tokenizer
from gptlab.runtime import (
    Runtime,
    agree_on,
    gather_rng_states,
    mean_over_ranks,
    peak_flops,
    restore_rng_states,
    seconds_since_start,
    setup_runtime,
    teardown,
)
from gptlab.sharding import FULL_STATE, load_shards, sharded_model, unsharded_copy
from gptlab.starting import (
    check_fresh_run,
    check_outputs,
    check_runtime,
    init_config,
    metrics_path,
    plot_path,
    resume_config,
)
from gptlab.stopping import StopRequest, exit_on_sigterm
from gptlab.tokenizer import MASK, LearnedFrom, Tokenizer
from gptlab.training import Stepper, learning_rate, make_optimizer, set_learning_rate, train_step


@dataclass
class Run:
    """Everything a training run holds: made by build_run, advanced by train_loop."""

    c: TrainConfig  # the settings as given (on --resume, as saved); the run's own step count is max_iters below
    rt: Runtime
    tokenizer: Tokenizer
    objective: Objective
    splits: dict[str, TokenSplit]
    model: GPT  # the plain model (under FSDP, each rank's shard of it): what is evaluated and saved
    stepper: Stepper  # what a training step runs (the model compiled and/or DDP-wrapped), its optimizer and scaler
    metrics: Metrics | None  # rank 0 only
    metrics_path: Path
    started: float  # time.perf_counter() when the command started
    plan: MemoryPlan  # the micro-batch each forward/backward pass takes, and the estimated peak memory
    health: Health  # bad-step guard, spike reaction, telemetry, EMA (gptlab/health.py)
    max_iters: int  # the step to train to: --max_iters, or what --time_budget plans
    stop: StopRequest  # set by Ctrl-C or SIGTERM: save at the end of the current step, then stop
    saver: ShardedSaver | None  # --checkpoint_format dcp: every rank writes its shards in the background
    meter: Throughput = field(default_factory=Throughput)
    budget: TimeBudget | None = None  # --time_budget, until its last plan
    planned_budget: float | None = None  # the --time_budget max_iters is planned from, kept after the last plan
    tokenizer_learned_from: LearnedFrom | None = None  # see gptlab.tokenizer.learned_from; None: unknown
    seconds_before: float = 0.0  # wall time of the runs this one resumes
    iteration: int = 0  # optimiser steps done
    best_val_loss: float = math.inf
    final: dict[str, float] = field(default_factory=dict)  # the latest evaluation
    evaluated_at: int = -1  # the step of `final`
    last_loss: float = math.nan  # the latest logged training loss (averaged over ranks)
    saved_at: int | None = None  # the step of the latest checkpoint this run wrote or resumed; None: none yet
    budget_note: str | None = None  # how --time_budget and --max_iters were combined

    @property
    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    @property
    def tokens_per_step(self) -> int:
        return self.c.batch_size * self.c.model.block_size * self.c.grad_accum_steps * self.rt.world_size

    def due(self, interval: int) -> bool:
        """Whether the step just done is one to log / evaluate / save at: every `interval` steps, and the last."""
        return self.iteration % interval == 0 or self.iteration == self.max_iters

    def saved_config(self) -> TrainConfig:
        """The config a checkpoint holds: with the planned max_iters, and the budget only until its last plan
        (a resumed run then is an ordinary one of that length)."""
        planning = self.budget is not None and not self.budget.done
        return self.c.replace(max_iters=self.max_iters, time_budget=self.c.time_budget if planning else None)


# ----------------------------------------------------------------------------- build the run

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
              init: dict[str, Any] | None = None, cap: int | None = None) -> Run:
    """ckpt: the checkpoint a --resume continues; init: the weights and tokenizer of --init_from; cap: the
    --max_iters a --time_budget's plan may not pass."""
    check_runtime(c, rt)  # before the tokenizer, the token cache or the metrics are written
    files = corpus_of(c)  # none for a folder prepared by preprocessing/prepare_data.py
    source = ckpt or init
    if source:  # a checkpoint from before the record, or a Hugging Face folder: unknown (None)
        tokenizer, learned = Tokenizer.from_json(source["tokenizer"]), source.get("tokenizer_learned_from")
    else:
        tokenizer, learned = resolve_tokenizer(c, files, rt)
    objective = objective_for(c.objective, tokenizer, c.mask_prob)
    config = replace(c.model, vocab_size=tokenizer.vocab_size, causal=objective.causal)
    plan = plan_run(c, config, rt)  # before anything is allocated, or the token cache built: refuses what cannot fit
    sharded = ckpt is not None and "sharded_folder" in ckpt  # a folder each rank reads its part of, below
    splits = load_data(c, tokenizer, files, rt)
    model = build_model(c, replace(config, activation_checkpointing=plan.activation_checkpointing), rt,
                        source["model"] if source and not sharded else None, ckpt["rng"] if ckpt else None)
    optimizer = make_optimizer(model, c, rt.device)
    if sharded:
        ckpt = load_shards(ckpt, model, optimizer, rt)
    elif ckpt is not None:  # the saved state is whole; under FSDP each rank keeps its shard of it
        set_optimizer_state_dict(model, optimizer, ckpt["optimizer"], options=StateDictOptions(full_state_dict=True))
    step_model = torch.compile(model) if c.compile else model
    if rt.distributed and not rt.fsdp:
        step_model = DistributedDataParallel(step_model,
                                             device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
    if ckpt is not None and "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    health = Health(model, optimizer, c, rt, ckpt.get("health") if ckpt else None, ckpt.get("ema") if ckpt else None)
    stepper = Stepper(step_model, optimizer, scaler, splits["train"], c, rt, objective, plan.micro_batch, health)
    saver = ShardedSaver(c.checkpoint, rt.is_main, rt.distributed) if c.checkpoint_format == "dcp" else None
    resumed_at = ckpt["iteration"] if ckpt else None
    metrics = Metrics(metrics_path(c), c.to_dict(), resumed_at, c.wandb_project, c.wandb_run_name) \
        if rt.is_main else None
    run = Run(c, rt, tokenizer, objective, splits, model, stepper, metrics, metrics_path(c), started, plan, health,
              c.max_iters, StopRequest(rt), saver, tokenizer_learned_from=learned)
    if ckpt is not None:
        run.iteration, run.best_val_loss = ckpt["iteration"], ckpt["best_val_loss"]
        run.saved_at = run.iteration
        run.seconds_before = ckpt.get("seconds", 0.0)
        run.planned_budget = ckpt.get("planned_budget")
    if c.time_budget is not None:
        run.planned_budget = c.time_budget
        run.budget = time_budget(run, cap)
    return run


def time_budget(run: Run, cap: int | None) -> TimeBudget:
    """--time_budget's planner, asked by the loop after each step; it times the steps from here on."""
    def log(row: dict[str, float | None]) -> None:
        if run.metrics:
            run.metrics.log(run.iteration, row)

    budget = TimeBudget(run.c.time_budget, run.c.eval_interval, run.meter, lambda: run.seconds,
                        lambda: 2 * run.c.eval_iters * time_eval_batch(run), lambda n: agree_on(n, run.rt),
                        tqdm.write if run.rt.is_main else lambda _: None, log, cap)
    budget.start(run.iteration)
    return budget


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
    if run.budget_note:
        print(run.budget_note)
    if c.fsdp and not rt.fsdp:
        print("--fsdp: one process has nothing to shard across, so the model stays whole (start with "
              "torchrun --nproc_per_node N to shard it)")


# ----------------------------------------------------------------------------- the loop

def train_loop(run: Run) -> None:
    """Steps until max_iters, or a Ctrl-C / SIGTERM: the learning rate, one optimiser step, then logging,
    evaluation and a checkpoint at their intervals. Under --time_budget, the budget moves max_iters as it plans."""
    # disable=None: a bar on terminals only; logs and pipes get the evaluation lines
    bar = tqdm(total=run.max_iters, initial=run.iteration, desc="training", disable=None if run.rt.is_main else True,
               dynamic_ncols=True)
    while run.iteration < run.max_iters:
        lr = learning_rate(run.iteration, run.max_iters, run.c) * run.health.lr_factor(run.iteration)
        set_learning_rate(run.stepper.optimizer, lr, run.c)
        loss = train_step(run.stepper, run.iteration)
        run.iteration += 1
        run.meter.tokens += run.tokens_per_step
        if run.budget is not None:
            run.max_iters = bar.total = run.budget.check(run.iteration, run.max_iters)
        stopping = run.stop.agreed(run.due(run.c.log_interval))  # read once: a later signal waits for the next step
        evaluating, saving = run.due(run.c.eval_interval), run.due(run.c.checkpoint_interval) or stopping
        if run.due(run.c.log_interval) or evaluating or saving:
            log_step(run, loss, lr, bar)
        log_health(run)
        bar.update(1)
        if evaluating:
            with run.meter.paused():  # evaluations and checkpoint writes are not training throughput
                evaluate_and_log(run, bar)
        saved = False
        if saving:
            with run.meter.paused():
                saved = save(run)
        if stopping:
            bar.close()
            wait_for_checkpoint(run)
            run.stop.exit(run.iteration, run.c.checkpoint if saved else None)
    bar.close()
    if not sound(run):
        skipped = run.health.counters()["skipped_steps"]
        raise Diverged(f"the run diverged: its final loss at step {run.iteration} is {run.last_loss:.4g} ({skipped} "
                       f"updates were skipped). Try a lower --lr")


def log_step(run: Run, loss: torch.Tensor, lr: float, bar: tqdm) -> None:
    """The loss (averaged over ranks: the host-device syncs are here, once per log), lr, tokens/s, MFU and the
    health counts; then the reaction to bad steps since the last log (--on_spike). A non-finite loss is logged
    as it is: its update was skipped."""
    loss_value = mean_over_ranks(loss, run.rt)
    tok_s = run.meter.rate()
    run.meter.restart()
    logged = {"loss": loss_value, "lr": lr, "tokens_per_s": tok_s, **run.health.counters()}
    if run.stepper.scaler.is_enabled():
        logged["loss_scale"] = run.stepper.scaler.get_scale()
    peak = peak_flops(run.rt.device, run.rt.dtype)
    if peak:  # model FLOPs utilisation: achieved FLOP/s over the peak of all the ranks' GPUs
        logged["mfu"] = run.model.flops_per_token() * tok_s / (peak * run.rt.world_size)
    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}",
                    **({"mfu": f"{logged['mfu']:.1%}"} if peak else {}))
    run.last_loss = loss_value
    if run.metrics:
        run.metrics.log(run.iteration, {**logged, "time_s": run.seconds})
    for event in run.health.check(run.iteration):
        if run.rt.is_main:
            bar.write(f"step {run.iteration}: {describe_event(event)}")
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
    run.evaluated_at = run.iteration
    run.best_val_loss = min(run.best_val_loss, run.final["val_loss"])
    if run.rt.is_main:
        ema = f", EMA val loss {run.final['ema_val_loss']:.4f}" if "ema_val_loss" in run.final else ""
        bar.write(f"step {run.iteration}: train loss {run.final['train_loss']:.4f}, val loss "
                  f"{run.final['val_loss']:.4f}, {run.objective.describe(run.final)}{ema}")
        run.metrics.log(run.iteration, {**run.final, "time_s": run.seconds})


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


def checkpoint_state(run: Run) -> dict[str, Any]:
    """The checkpoint's contents. Every rank must call it: it gathers their RNG states and, for one file under
    FSDP, their shards of the model and optimizer state (a sharded checkpoint keeps each rank's own)."""
    options = StateDictOptions() if run.saver else FULL_STATE
    return {"config": run.saved_config().to_dict(), "model_config": asdict(run.model.config),
            "model": get_model_state_dict(run.model, options=options),
            "optimizer": get_optimizer_state_dict(run.model, run.stepper.optimizer, options=options),
            "scaler": run.stepper.scaler.state_dict(), "iteration": run.iteration, "best_val_loss": run.best_val_loss,
            "rng": gather_rng_states(run.rt), "seconds": run.seconds, "planned_budget": run.planned_budget,
            "tokenizer": run.tokenizer.to_json(), "tokenizer_learned_from": run.tokenizer_learned_from,
            "health": run.health.state_dict(), **({"ema": run.health.ema.model.state_dict()} if run.health.ema else {})}


def sound(run: Run) -> bool:
    """Whether the weights look sound: the latest logged loss and, when evaluated at this step, the val loss are
    finite and no blow-up (gptlab/health.py; rank 0's answer: under DDP it alone evaluates)."""
    evaluated = [run.final["val_loss"]] if run.evaluated_at == run.iteration and run.final else []
    return bool(agree_on(int(all(run.health.sound(x) for x in [run.last_loss, *evaluated])), run.rt))


def save(run: Run) -> bool:
    """Write the checkpoint, unless the weights are not sound: a checkpoint of a diverged model would replace the
    last good one (nanoGPT and Hugging Face's Trainer keep the best or the latest; neither keeps NaNs as good)."""
    if not sound(run):
        if run.rt.is_main:
            tqdm.write(f"step {run.iteration}: not saved, its loss {run.last_loss:.4g} is not finite or blew up; "
                       f"{saved_note(run)}")
        return False
    state = checkpoint_state(run)  # every rank takes part: it gathers from all of them
    if run.saver:
        run.saver.save(state)
    elif run.rt.is_main:
        save_checkpoint(state, run.c.checkpoint)
    run.saved_at = run.iteration
    return True


def saved_note(run: Run) -> str:
    """What a user can go back to: the latest checkpoint of this run, or that there is none."""
    if run.saved_at is not None:
        return (f"{run.c.checkpoint} holds step {run.saved_at}, the last saved with a sound loss (continue it with "
                f"--resume and a lower --lr)")
    earlier = f" ({run.c.checkpoint} is an earlier run's)" if Path(run.c.checkpoint).exists() else ""
    return f"no checkpoint of this run was written{earlier}"


def wait_for_checkpoint(run: Run) -> None:
    """Before the run ends: until the sharded checkpoint in flight is written and in place."""
    if run.saver:
        run.saver.wait()


# ----------------------------------------------------------------------------- finish

def pictures(run: Run) -> None:
    """Rank 0: close the metrics, and draw the loss-curve and health PNGs from them."""
    if not run.rt.is_main:
        return
    run.metrics.close()
    png = plot_path(run.c)
    if plot_losses(run.metrics_path, png):
        print(f"loss curve: {png}")
    health_png = plot_path(run.c, "health")
    if plot_health(run.metrics_path, health_png):
        print(f"health heat maps: {health_png}")


def finish(run: Run) -> None:
    """The pictures and, for a model that writes text, a sample."""
    c, rt = run.c, run.rt
    wait_for_checkpoint(run)
    writes_text = c.sample_tokens > 0 and run.objective.writes_text
    sampler = unsharded_copy(run.model, rt) if rt.fsdp and writes_text else run.model
    pictures(run)
    if not rt.is_main:
        return
    print(f"checkpoint: {c.checkpoint}")
    if rt.device.type == "cuda":  # the memory model beside what the allocator saw (evaluations included)
        print(f"memory: peak {format_size(torch.cuda.max_memory_allocated(rt.device))} allocated, estimated "
              f"{format_size(run.plan.need)}")
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

def train(c: TrainConfig, set_by_flags: set[str] = frozenset(), started: float | None = None,
          in_yaml: set[str] = frozenset()) -> dict[str, float]:
    """Run the whole training job; returns the final evaluation. set_by_flags, in_yaml: the settings typed as
    flags and those the --config file holds. started: time.perf_counter() when the command started (default:
    now), the start of a --time_budget."""
    started = time.perf_counter() if started is None else started
    ckpt = init = note = None
    restarting = c.resume == "auto" and not checkpoint_exists(c.checkpoint)
    if restarting:  # --resume auto with nothing saved yet: the files of an attempt killed before its first save go
        c = c.replace(resume=False)
    if c.resume:
        c, ckpt, note = resume_config(c, set_by_flags, in_yaml)
    else:
        check_fresh_run(c.replace(overwrite=True) if restarting else c)
        if c.init_from is not None:
            c, init = init_config(c, set_by_flags)
    check_dependent_flags(c, set_by_flags)  # with the settings a resume or --init_from brings
    check_outputs(c)
    capped = c.time_budget is not None and "max_iters" in set(set_by_flags) | set(in_yaml)
    if capped and not c.resume:
        note = f"time budget {c.time_budget:g}s and --max_iters {c.max_iters}: the run stops at whichever comes first"
    rt = setup_runtime(c.device, c.dtype, c.fsdp)
    try:
        return run_job(c, ckpt, init, rt, started, c.max_iters if capped else None, note)
    finally:  # after run_job has returned: its model, optimizer and DDP wrapper are gone
        teardown(rt, sys.exception())  # the exception on its way out, or None


def run_job(c: TrainConfig, ckpt: dict[str, Any] | None, init: dict[str, Any] | None, rt: Runtime,
            started: float, cap: int | None = None, budget_note: str | None = None) -> dict[str, float]:
    # Rank 0 writes the checkpoint: it holds the lock that keeps a second run off it for the whole job.
    with RunLock(c.checkpoint) if rt.is_main else contextlib.nullcontext():
        run = build_run(c, ckpt, rt, started, init, cap)
        run.budget_note = budget_note
        if rt.is_main:
            describe(run)
        with run.stop.on_signals():
            try:
                train_loop(run)
            except Diverged as e:  # the pictures show how; the message says what is left to go back to
                wait_for_checkpoint(run)
                pictures(run)
                raise Diverged(f"{e}; {saved_note(run)}") from None
        finish(run)
        return run.final


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    started = time.perf_counter() - seconds_since_start()
    c, set_by_flags, in_yaml = parse_settings(argv)
    train(c, set_by_flags, started, in_yaml)


if __name__ == "__main__":
    run_cli(main)
