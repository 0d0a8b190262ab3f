"""Train a GPT on a text corpus: python playground.py [CORPUS ...] [--flags] [--config file.yaml]

The whole job, top to bottom in `train()`:
    corpus + tokenizer -> token cache -> batches -> GPT -> loss -> AdamW + lr schedule -> checkpoint
with evaluation (train/val loss, val bits per byte), metrics (JSONL, optional wandb), resume, and, when
started by torchrun, DistributedDataParallel (a full replica per process) or FSDP2 (--fsdp: each process
holds a shard of the parameters, gradients and optimizer state).
"""

import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from checkpoint import load_checkpoint, save_checkpoint
from config import MODEL_SHAPE_FIELDS, TrainConfig, parse_config
from data import Masking, TokenSplit, batch_rng, build_token_cache, cache_key, get_batch
from errors import UsageError, run_cli
from gpt import GPT, GPTConfig
from preprocessing.tokenizer import MASK, Tokenizer, corpus_files, train_tokenizer
from runtime import Runtime, barrier, peak_flops, setup_runtime, teardown, to_device
from training import learning_rate, make_optimizer, train_step

DEFAULT_VOCAB_SIZE = 8000
EVAL_TRAIN_STREAM, EVAL_VAL_STREAM = 1, 2  # random streams of evaluation batches, apart from training's (0)
# Checkpointed state dicts: whole (unsharded) tensors under a plain GPT's names, copied to the CPU; under
# FSDP or DDP only rank 0 receives them (the others get empty dicts), so no rank holds the full model twice.
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


# ----------------------------------------------------------------------------- data

def resolve_tokenizer(c: TrainConfig, files: list[Path], rt: Runtime) -> Tokenizer:
    """The --tokenizer file, or one trained on the corpus (once; kept in out_dir, keyed by corpus and size)."""
    if c.tokenizer is not None:
        tokenizer = Tokenizer.from_file(c.tokenizer)
        if c.vocab_size is not None and c.vocab_size != tokenizer.vocab_size:
            raise UsageError(f"--vocab_size {c.vocab_size} does not match {c.tokenizer}, which has "
                             f"{tokenizer.vocab_size} tokens (leave --vocab_size out to use the tokenizer's)")
        return tokenizer
    vocab_size = c.vocab_size or DEFAULT_VOCAB_SIZE
    corpus_hash = cache_key(files, _NO_TOKENIZER, 0.0)[:12]
    path = Path(c.out_dir) / f"tokenizer-{c.tokenizer_kind}{vocab_size}-{corpus_hash}.json"
    if rt.is_main and not path.exists():
        print(f"training a {c.tokenizer_kind} tokenizer ({vocab_size} tokens) on the corpus -> {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        # With <mask> <pad> <cls> <sep> (4 of the vocab_size ids), so that the same tokenizer serves masked-LM
        # pretraining and fine-tuning (finetune.py) of the model trained here.
        train_tokenizer(files, c.tokenizer_kind, vocab_size, show_progress=sys.stderr.isatty(),
                        bert_tokens=True).save(path)
    barrier(rt)
    return Tokenizer.from_file(path)


class _NoTokenizer:
    """Stands in for a tokenizer when hashing the corpus alone."""

    def to_json(self) -> str:
        return ""


_NO_TOKENIZER: Any = _NoTokenizer()


def load_data(c: TrainConfig, tokenizer: Tokenizer, files: list[Path], rt: Runtime) -> dict[str, TokenSplit]:
    """Token files for the train and val splits (built by rank 0 once, then reused)."""
    cache_dir = Path(c.out_dir) / "token_cache"
    if rt.is_main:
        splits = build_token_cache(files, tokenizer, cache_dir, c.val_fraction)
    barrier(rt)
    if not rt.is_main:
        splits = build_token_cache(files, tokenizer, cache_dir, c.val_fraction)
    for name, split in splits.items():
        if split.num_tokens < c.block_size + 1:
            raise UsageError(f"the {name} split has {split.num_tokens} tokens, fewer than block_size + 1 = "
                             f"{c.block_size + 1}: use a longer corpus, a smaller --block_size or another "
                             f"--val_fraction")
    return splits


def masking_for(c: TrainConfig, tokenizer: Tokenizer) -> Masking | None:
    """How batches are corrupted for a masked-LM run; None for next-token prediction."""
    if c.objective == "clm":
        return None
    return Masking(tokenizer.special_id(MASK, "--objective mlm"), tokenizer.special_ids, tokenizer.vocab_size,
                   c.mask_prob)




# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def estimate_loss(model: GPT, split: TokenSplit, stream: int, c: TrainConfig, rt: Runtime,
                  masking: Masking | None = None) -> tuple[float, float]:
    """Mean loss over `eval_iters` batches, and the fraction of predicted tokens the model ranks first;
    the same batches (and masks) at every evaluation, so curves are comparable."""
    model.eval()
    losses, correct, predicted = [], 0, 0
    for i in range(c.eval_iters):
        x, y = get_batch(split, c.batch_size, c.block_size, batch_rng(c.seed, stream, i), masking)
        x, y = to_device(x, rt.device), to_device(y, rt.device)
        with rt.autocast():
            logits, loss = model(x, y)
        losses.append(loss.item())
        scored = y != -1
        correct += int((logits.argmax(-1)[scored] == y[scored]).sum())
        predicted += int(scored.sum())
    model.train()
    return sum(losses) / len(losses), correct / max(predicted, 1)


def bits_per_byte(loss_nats: float, split: TokenSplit) -> float:
    """Loss per token in bits, times tokens per byte of text: comparable across tokenizers."""
    return loss_nats / math.log(2) * split.num_tokens / split.num_bytes


# ----------------------------------------------------------------------------- metrics

class Metrics:
    """One place metrics go: a JSONL file (always) and Weights & Biases (when asked)."""

    def __init__(self, path: Path, c: TrainConfig, resumed: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a" if resumed else "w", encoding="utf-8")
        self.wandb_run = start_wandb(c) if c.wandb_project else None

    def log(self, step: int, values: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def close(self) -> None:
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def start_wandb(c: TrainConfig) -> Any:
    """Start a wandb run without ever prompting or waiting on the network when it cannot be reached.

    WANDB_MODE is honoured; when it is unset and no API key is configured, the run is kept offline
    (sync it later with `wandb sync`). A failure to start only costs the wandb copy of the metrics.
    """
    try:
        import wandb
    except ImportError:
        raise UsageError("--wandb_project needs the wandb package: pip install wandb") from None
    mode = os.environ.get("WANDB_MODE")
    if mode is None:
        has_key = bool(os.environ.get("WANDB_API_KEY")) or _netrc_has_wandb()
        mode = "online" if has_key else "offline"
        if not has_key:
            print("wandb: no API key configured, logging offline (upload later with `wandb sync`)")
    try:
        return wandb.init(project=c.wandb_project, name=c.wandb_run_name, config=c.to_dict(), mode=mode,
                          dir=c.out_dir, settings=wandb.Settings(init_timeout=30, silent=True))
    except Exception as e:  # noqa: BLE001 - logging must never stop training
        print(f"wandb: could not start ({str(e).splitlines()[0]}); metrics stay in the local JSONL file")
        return None


def _netrc_has_wandb() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def plot_losses(metrics_path: Path, png_path: Path) -> bool:
    """Train and val loss against step, from the JSONL file; skipped when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows if "loss" in r], [r["loss"] for r in rows if "loss" in r],
            alpha=0.4, label="train (batch)")
    ax.plot([r["step"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train (eval)")
    ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- model and optimiser

def gpt_config(c: TrainConfig, vocab_size: int) -> GPTConfig:
    return GPTConfig(vocab_size=vocab_size, block_size=c.block_size, embedding_dim=c.embedding_dim,
                     num_of_layers=c.num_of_layers, num_of_heads=c.num_of_heads, dropout=c.dropout,
                     bias=c.bias, attention=c.attention, norm_position=c.norm_position, init=c.init,
                     causal=c.objective == "clm")


def shard(model: GPT) -> None:
    """FSDP2, in place: each block, then the root (embeddings, final norm and the head tied to the token
    embedding), becomes a unit whose parameters are split across the ranks and gathered whole only while
    that unit computes. The parameters become DTensors, so make the optimizer afterwards."""
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)


def unsharded_copy(model: GPT, rt: Runtime) -> GPT | None:
    """Rank 0's plain copy of an FSDP model (None on the other ranks), for work rank 0 does alone: a
    sharded forward pass would wait for the others. Every rank must call it, since it all-gathers."""
    full = get_model_state_dict(model, options=FULL_STATE)
    if not rt.is_main:
        return None
    copy = GPT(model.config)
    copy.load_state_dict(full)
    return copy.to(rt.device)


def resume_config(c: TrainConfig, set_by_flags: set[str]) -> tuple[TrainConfig, dict[str, Any]]:
    """On --resume, the run continues with the checkpoint's config; flags typed now override it,
    except those that would change the model's shape."""
    ckpt = load_checkpoint(c.checkpoint)
    if "optimizer" not in ckpt or "config" not in ckpt:
        raise UsageError(f"{c.checkpoint} holds no training state to resume (was it exported?)")
    saved = ckpt["config"]
    for name in set_by_flags & set(MODEL_SHAPE_FIELDS):
        if getattr(c, name) != saved[name]:
            raise UsageError(f"--{name} {getattr(c, name)} differs from the checkpoint's {saved[name]}: "
                             f"a checkpoint resumes only with the model shape it was trained with")
    merged = {**saved, **{name: getattr(c, name) for name in set_by_flags}}
    return TrainConfig.from_dict(merged), ckpt


# ----------------------------------------------------------------------------- training

def train(c: TrainConfig, set_by_flags: set[str] = frozenset()) -> dict[str, float]:
    """Run the whole training job; returns the final metrics."""
    ckpt = None
    if c.resume:
        c, ckpt = resume_config(c, set_by_flags)
    rt = setup_runtime(c.device, c.dtype, c.fsdp)
    try:
        return _train(c, ckpt, rt)
    finally:
        teardown(rt, sys.exception())  # the exception on its way out, if any


def _train(c: TrainConfig, ckpt: dict[str, Any] | None, rt: Runtime) -> dict[str, float]:
    if rt.fsdp and rt.dtype == torch.float16:
        raise UsageError("--fsdp with --dtype float16 is not supported: the loss scaler would look for "
                         "overflows in each rank's shard alone; use --dtype bfloat16")
    files = corpus_files(list(c.corpus))
    tokenizer = Tokenizer.from_json(ckpt["tokenizer"]) if ckpt else resolve_tokenizer(c, files, rt)
    masking = masking_for(c, tokenizer)
    splits = load_data(c, tokenizer, files, rt)

    torch.manual_seed(c.seed)  # the same initial weights on every rank (FSDP keeps each rank's shard of them)
    model = GPT(gpt_config(c, tokenizer.vocab_size)).to(rt.device)
    torch.manual_seed(c.seed + rt.rank)  # but different dropout masks
    start_iter, best_val_loss = 0, math.inf
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError:
            raise UsageError(f"{c.checkpoint} holds a model of a different shape") from None
        start_iter, best_val_loss = ckpt["iteration"], ckpt["best_val_loss"]
        torch.set_rng_state(ckpt["rng"]["torch"][rt.rank % len(ckpt["rng"]["torch"])])
    if rt.fsdp:
        shard(model)
    optimizer = make_optimizer(model, c, rt.device)
    if ckpt is not None:  # the saved state is whole; under FSDP each rank keeps its shard of it
        set_optimizer_state_dict(model, optimizer, ckpt["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    raw_model = model
    if c.compile:
        model = torch.compile(model)
    if rt.distributed and not rt.fsdp:
        model = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)

    tokens_per_step = c.batch_size * c.block_size * c.grad_accum_steps * rt.world_size
    stem = Path(c.checkpoint).stem
    metrics_path = Path(c.out_dir) / f"{stem}.metrics.jsonl"
    metrics = Metrics(metrics_path, c, resumed=ckpt is not None) if rt.is_main else None
    if rt.is_main:
        print(f"model: {raw_model.num_parameters() / 1e6:.2f}M parameters (non-embedding), vocab "
              f"{tokenizer.vocab_size}, device {rt.device}, autocast {str(rt.dtype).removeprefix('torch.')}, "
              f"{rt.world_size} process(es)")
        print(f"data: train {splits['train'].num_tokens:,} tokens, val {splits['val'].num_tokens:,} tokens; "
              f"effective batch {c.batch_size} x {c.grad_accum_steps} accum x {rt.world_size} ranks = "
              f"{tokens_per_step:,} tokens/step ({rt.mode})")
        if c.fsdp and not rt.fsdp:
            print("--fsdp: one process has nothing to shard across, so the model stays whole (start with "
                  "torchrun --nproc_per_node N to shard it)")

    def state(it: int) -> dict[str, Any]:
        """The checkpoint's contents. Every rank must call it: it gathers their RNG states and, under FSDP,
        their shards of the model and optimizer state."""
        return {"config": c.to_dict(), "model_config": asdict(raw_model.config),
                "model": get_model_state_dict(raw_model, options=FULL_STATE),
                "optimizer": get_optimizer_state_dict(raw_model, optimizer, options=FULL_STATE),
                "iteration": it, "best_val_loss": best_val_loss, "rng": {"torch": _gather_rng_states(rt)},
                "tokenizer": tokenizer.to_json()}

    bar = tqdm(total=c.max_iters, initial=start_iter, desc="training", disable=not rt.is_main,
               dynamic_ncols=True)
    final: dict[str, float] = {}
    t_last, tokens_since = time.perf_counter(), 0
    peak = peak_flops(rt.device, rt.dtype)
    for it in range(start_iter, c.max_iters):
        lr = learning_rate(it, c)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = train_step(model, optimizer, scaler, splits["train"], it, c, rt, masking)
        step = it + 1
        tokens_since += tokens_per_step
        evaluating = step % c.eval_interval == 0 or step == c.max_iters
        saving = step % c.checkpoint_interval == 0 or step == c.max_iters
        if step % c.log_interval == 0 or evaluating or saving:
            loss_value = _mean_over_ranks(loss, rt)  # .item(): the only host-device sync, once per log
            if not math.isfinite(loss_value):
                raise UsageError(f"loss became {loss_value} at step {step}; stopping (the last checkpoint "
                                 f"in {c.checkpoint} is untouched). Try a lower --lr or --grad_clip.")
            elapsed = time.perf_counter() - t_last
            tok_s = tokens_since / elapsed
            t_last, tokens_since = time.perf_counter(), 0
            logged = {"loss": loss_value, "lr": lr, "tokens_per_s": tok_s}
            if peak:  # model FLOPs utilisation: achieved FLOP/s over the peak of all the ranks' GPUs
                logged["mfu"] = raw_model.flops_per_token() * tok_s / (peak * rt.world_size)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}",
                            **({"mfu": f"{logged['mfu']:.1%}"} if peak else {}))
            if metrics:
                metrics.log(step, logged)
        bar.update(1)
        if evaluating and (rt.is_main or rt.fsdp):
            # DDP: rank 0 alone, on its replica. FSDP: every rank, on the same batches, since a sharded
            # forward pass gathers each unit's parameters from all of them.
            final = evaluate(raw_model, splits, c, rt, masking)
            best_val_loss = min(best_val_loss, final["val_loss"])
            t_last = time.perf_counter()  # evaluation time is not training throughput
        if evaluating and rt.is_main:
            quality = (f"val bits/byte {final['val_bpb']:.4f}" if masking is None else
                       f"val masked-token accuracy {final['val_accuracy']:.4f}")
            bar.write(f"step {step}: train loss {final['train_loss']:.4f}, val loss {final['val_loss']:.4f}, "
                      f"{quality}")
            metrics.log(step, final)
        if saving:
            snapshot = state(step)  # every rank takes part: it gathers from all of them
            if rt.is_main:
                save_checkpoint(snapshot, c.checkpoint)
    bar.close()
    writes_text = c.sample_tokens > 0 and masking is None
    sampler = unsharded_copy(raw_model, rt) if rt.fsdp and writes_text else raw_model
    if rt.is_main:
        metrics.close()
        if plot_losses(metrics_path, Path(c.out_dir) / f"{stem}.loss.png"):
            print(f"loss curve: {Path(c.out_dir) / f'{stem}.loss.png'}")
        print(f"checkpoint: {c.checkpoint}")
        if writes_text:
            print("sample:\n" + sample(sampler, tokenizer, c.sample_tokens, rt))
        elif c.sample_tokens:
            print(f"an encoder fills masks rather than writing text: try python generate.py --checkpoint "
                  f"{c.checkpoint} --prompt 'To be, or not to {MASK}'")
    return final


def evaluate(model: GPT, splits: dict[str, TokenSplit], c: TrainConfig, rt: Runtime,
             masking: Masking | None = None) -> dict[str, float]:
    """Train and val loss; val bits per byte for a GPT, val masked-token accuracy for an encoder (whose
    loss covers only the masked tokens, so bits per byte would not mean anything)."""
    train_loss, _ = estimate_loss(model, splits["train"], EVAL_TRAIN_STREAM, c, rt, masking)
    val_loss, val_accuracy = estimate_loss(model, splits["val"], EVAL_VAL_STREAM, c, rt, masking)
    if masking is None:
        return {"train_loss": train_loss, "val_loss": val_loss, "val_bpb": bits_per_byte(val_loss, splits["val"])}
    return {"train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_accuracy}


def _mean_over_ranks(loss: torch.Tensor, rt: Runtime) -> float:
    if rt.distributed:
        loss = loss.clone()
        dist.all_reduce(loss)
        loss /= rt.world_size
    return loss.item()


def _gather_rng_states(rt: Runtime) -> list[torch.Tensor]:
    """Every rank's torch RNG state (dropout masks), so a resumed run draws the same masks."""
    state = torch.get_rng_state()
    if not rt.distributed:
        return [state]
    states = [torch.empty_like(state) for _ in range(rt.world_size)]
    dist.all_gather(states, state) if rt.device.type == "cpu" else dist.all_gather_object(states, state)
    return states


def sample(model: GPT, tokenizer: Tokenizer, max_new_tokens: int, rt: Runtime) -> str:
    """A short continuation of an end-of-text token, i.e. text from scratch."""
    model.eval()
    start = torch.tensor([[tokenizer.eot_id]], device=rt.device)
    generator = torch.Generator(device=rt.device).manual_seed(0)
    with torch.no_grad(), rt.autocast():
        out = model.generate(start, max_new_tokens, temperature=0.8, top_k=200, eos_id=tokenizer.eot_id,
                             generator=generator)
    return tokenizer.decode(out[0, 1:].tolist())


def main() -> None:
    c, set_by_flags = parse_config()
    train(c, set_by_flags)


if __name__ == "__main__":
    run_cli(main)
