"""Training configuration: defaults <- a YAML file <- command-line flags, into one frozen dataclass.

The model's settings are declared once, in gpt.GPTConfig; the training's here, in TrainConfig, which holds a
GPTConfig as `model`. On the command line and in YAML files both are flat and share one namespace:
`--embedding_dim 128` sets `c.model.embedding_dim`, `--lr 1e-3` sets `c.lr`. Flags typed on the command line
win over the YAML file, which wins over the defaults. Unknown keys and values of the wrong type are errors.
"""

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt import GPTConfig
from gptlab.cli import (
    FRACTION,
    NON_NEGATIVE,
    OPEN_FRACTION,
    POSITIVE,
    SIZE,
    Rule,
    add_flags,
    build,
    check_fields,
    check_requirements,
    coerce,
    flag_fields,
    read_yaml,
    setting,
)
from gptlab.corpus import TEXT_FIELD
from gptlab.data import DEFAULT_VAL_FRACTION
from gptlab.errors import CliParser, UsageError
from gptlab.runtime import device_setting, dtype_setting
from gptlab.tokenizer import MAX_VOCAB_SIZE, TOKENIZER_SAMPLE

BUNDLED_CORPUS = str(Path(__file__).resolve().parent / "data" / "shakespeare.txt")
LR_SCHEDULES = ("cosine", "linear", "constant", "wsd", "inverse_sqrt")


@dataclass(frozen=True)
class TrainConfig:
    model: GPTConfig = field(default_factory=GPTConfig)  # the model's settings (their flags: see gpt.py)
    # data and tokenizer
    corpus: tuple[str, ...] = setting((BUNDLED_CORPUS,), "text file(s) (.txt, .jsonl, .json, .parquet, "
                                  ".gz, .zst), folder(s) of them, or a folder prepared by "
                                  "preprocessing/prepare_data.py", group="data")
    tokenizer: str | None = setting(None, "tokenizer.json to use; if omitted, a byte-level BPE tokenizer is "
                                    "trained on the corpus and saved in out_dir", group="data")
    tokenizer_kind: str = setting("bbpe", "kind of tokenizer to train when --tokenizer is not given",
                                  choices=("bbpe", "bpe"), group="data", requires=("tokenizer", None))
    vocab_size: int | None = setting(None, "vocabulary size of the trained tokenizer (default 8000); with "
                                     "--tokenizer it must match the tokenizer's size", rule=POSITIVE, group="data")
    val_fraction: float = setting(DEFAULT_VAL_FRACTION, "fraction of the corpus (its last bytes) held out for "
                                  "validation, from the model and from the tokenizer trained here",
                                  rule=OPEN_FRACTION, group="data")
    text_field: str = setting(TEXT_FIELD, "the field of each .jsonl/.json record, or the .parquet column, that "
                              "holds a document's text", group="data")
    tokenizer_sample: str = setting(TOKENIZER_SAMPLE, "the most of the training split that the tokenizer trained "
                                    "here reads, like 100MB or 1GB: blocks spread evenly over the whole split (all "
                                    "of it when it is smaller)", group="data", requires=("tokenizer", None), rule=SIZE)
    out_dir: str = setting("runs", "folder for the token cache and a trained tokenizer (a run's metrics and "
                           "PNGs go beside its --checkpoint)", group="data")
    # what the model learns
    objective: str = setting("clm", "clm: next-token prediction with a causal decoder (GPT); mlm: masked-token "
                             "prediction with a bidirectional encoder (BERT)", choices=("clm", "mlm"), group="model")
    mask_prob: float = setting(0.15, "mlm only: fraction of tokens chosen for prediction (of those, 80% become "
                               "<mask>, 10% a random token, 10% stay)", rule=OPEN_FRACTION, group="model",
                               requires=("objective", "mlm"))
    init_from: str | None = setting(None, "start from the weights of a local Hugging Face GPT-2, Llama or Qwen3 folder "
                                    "(save_pretrained), taking its model settings and tokenizer", group="model")
    # optimisation
    batch_size: int = setting(16, "sequences per micro-batch (per process)", rule=POSITIVE, group="optimisation")
    grad_accum_steps: int = setting(1, "micro-batches accumulated per optimiser step", rule=POSITIVE,
                                    group="optimisation")
    max_iters: int = setting(5000, "optimiser steps in the whole run", rule=POSITIVE, group="optimisation")
    time_budget: float | None = setting(None, "train for this many seconds of wall time (from the command's start, "
                                        "tokenizer and evaluations included): max_iters is planned after timing "
                                        "the first steps, and planned again up to 3 times as the run goes on",
                                        rule=POSITIVE, group="optimisation")
    lr: float = setting(6e-4, "peak learning rate", rule=NON_NEGATIVE, group="optimisation")
    min_lr: float | None = setting(None, "final learning rate (default lr / 10)", rule=NON_NEGATIVE,
                                   group="optimisation")
    lr_schedule: str = setting("cosine", "shape of the learning rate after warmup", choices=LR_SCHEDULES,
                               group="optimisation")
    warmup_iters: int = setting(2000, "linear warmup steps (the GPT-1 paper used 2000)", rule=NON_NEGATIVE,
                                group="optimisation")
    decay_fraction: float = setting(0.2, "wsd only: fraction of the run spent decaying to min_lr", rule=FRACTION,
                                    group="optimisation", requires=("lr_schedule", "wsd"))
    weight_decay: float = setting(0.01, "decoupled weight decay on matrices and embeddings (never on biases or "
                                  "LayerNorm gains)", rule=NON_NEGATIVE, group="optimisation")
    beta1: float = setting(0.9, "AdamW beta1", rule=FRACTION, group="optimisation")
    beta2: float = setting(0.95, "AdamW beta2", rule=FRACTION, group="optimisation")
    optimizer: str = setting("adamw", "adamw: AdamW for every parameter; muon: Muon (orthogonalised momentum) for "
                             "the matrices inside the blocks, AdamW for embeddings, head, gains and biases",
                             choices=("adamw", "muon"), group="optimisation")
    muon_lr: float = setting(0.02, "muon only: peak learning rate of the Muon matrices (follows the same "
                             "schedule as --lr)", rule=NON_NEGATIVE, group="optimisation",
                             requires=("optimizer", "muon"))
    embedding_lr: float | None = setting(None, "peak learning rate of the token embedding table (AdamW; follows the "
                                         "same schedule as --lr; default: --lr). A looked-up row gets a gradient "
                                         "only when its token occurs, so it can take a far larger step",
                                         rule=NON_NEGATIVE, group="optimisation")
    muon_momentum: float = setting(0.95, "muon only: momentum of the Muon matrices", rule=FRACTION,
                                   group="optimisation", requires=("optimizer", "muon"))
    muon_weight_decay: float = setting(0.0, "muon only: decoupled weight decay of the Muon matrices (W *= 1 - "
                                       "lr * wd each step, lr the Muon lr); --weight_decay is the AdamW part's",
                                       rule=NON_NEGATIVE, group="optimisation", requires=("optimizer", "muon"))
    grad_clip: float = setting(1.0, "clip the global gradient norm to this (0 = off)", rule=NON_NEGATIVE,
                               group="optimisation")
    # evaluation, checkpoints and logging
    eval_interval: int = setting(500, "steps between evaluations of train/val loss", rule=POSITIVE,
                                 group="evaluation")
    eval_iters: int = setting(50, "batches averaged per evaluation", rule=POSITIVE, group="evaluation")
    log_interval: int = setting(10, "steps between progress-bar/metrics updates", rule=POSITIVE, group="evaluation")
    checkpoint_interval: int = setting(500, "steps between checkpoints (one is always written at the end, and one "
                                       "at the step where Ctrl-C stops a run)", rule=POSITIVE, group="evaluation")
    checkpoint: str = setting("model_checkpoint.tar", "checkpoint file to write (and to read with --resume)",
                              group="evaluation", output=True)
    checkpoint_format: str = setting("file", "file: one file, written by rank 0; dcp: a folder in which each process "
                                     "writes its shards in the background (torch.distributed.checkpoint), which any "
                                     "number of processes resumes (docs/cluster.md)", choices=("file", "dcp"),
                                     group="evaluation")
    resume: bool | str = setting(False, "continue the run saved in --checkpoint; auto: continue it if it exists, "
                                 "else start it (for torchrun --max-restarts)", choices=("auto",), group="evaluation")
    overwrite: bool = setting(False, "let a fresh run replace an existing --checkpoint (and its metrics)",
                              group="evaluation")
    sample_tokens: int = setting(200, "tokens of text sampled from the model at the end (0 = none)",
                                 rule=NON_NEGATIVE, group="evaluation")
    wandb_project: str | None = setting(None, "log metrics to this Weights & Biases project (honours WANDB_MODE; "
                                        "offline when not logged in)", group="evaluation")
    wandb_run_name: str | None = setting(None, "Weights & Biases run name", group="evaluation")
    # training health (docs/health.md)
    health_interval: int = setting(50, "steps between per-layer health measurements (gradient and weight norms, "
                                   "update ratios, activation RMS, attention logits) in the metrics and the "
                                   "health PNG; 0 = off", rule=NON_NEGATIVE, group="health")
    on_spike: str = setting("skip", "what a bad step (a non-finite loss or gradient, or a loss spike) does beyond "
                            "skipping its update: skip: nothing more; rollback: restore the model and optimizer "
                            "from the latest in-memory snapshot; stop: end the run",
                            choices=("skip", "rollback", "stop"), group="health")
    spike_threshold: float = setting(6.0, "a loss above median + this x MAD (median absolute deviation) of the "
                                     "last 50 accepted losses is a spike", rule=POSITIVE, group="health")
    snapshot_interval: int = setting(100, "rollback only: steps between in-memory snapshots of the model and "
                                     "optimizer", rule=POSITIVE, group="health",
                                     requires=("on_spike", "rollback"))
    rollback_lr_factor: float = setting(1.0, "rollback only: learning-rate multiplier for snapshot_interval steps "
                                        "after a rollback", rule=Rule("in (0, 1]", lambda v: 0 < v <= 1),
                                        group="health", requires=("on_spike", "rollback"))
    ema_decay: float = setting(0.0, "keep an exponential moving average of the weights with this decay (e.g. "
                               "0.999), evaluated beside the raw weights and saved in the checkpoint, where "
                               "generate/evaluate/finetune/export use it; 0 = off", rule=FRACTION, group="health")
    # system
    seed: int = setting(1337, "random seed (model init, batches, dropout)", rule=NON_NEGATIVE, group="system")
    device: str = device_setting(group="system")
    dtype: str = dtype_setting(group="system")
    compile: bool = setting(False, "torch.compile the model (first steps are slow while it compiles)",
                            group="system")
    fsdp: bool = setting(False, "under torchrun: shard parameters, gradients and optimizer state across processes "
                         "(FSDP2) instead of replicating them (DDP); for models that do not fit one device. Ignored "
                         "in a single process", group="system")
    max_memory: str | None = setting(None, "memory budget per process, like 8GB or 512MB (powers of 1024; a bare "
                                     "number is bytes): the "
                                     "sequences per step (batch_size x grad_accum_steps) stay, split into the "
                                     "largest micro-batch that fits, with activation checkpointing only if even "
                                     "one sequence would not fit; default on CUDA: the free memory less a margin, "
                                     "none elsewhere", rule=SIZE, group="system")

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.corpus:
            raise UsageError("no corpus given")
        if self.final_lr > self.lr:
            raise UsageError(f"--min_lr {self.final_lr} is above --lr {self.lr}")
        if self.vocab_size is not None and self.vocab_size > MAX_VOCAB_SIZE:
            raise UsageError(f"--vocab_size {self.vocab_size} is above the largest supported, {MAX_VOCAB_SIZE:,}")
        if self.objective == "mlm" and self.model.position == "none":
            raise UsageError("--position none (NoPE) needs --objective clm: without positions or a causal mask, an "
                             "encoder cannot tell the order of its tokens")
        if self.checkpoint == "" or self.out_dir == "":
            raise UsageError("--checkpoint and --out_dir cannot be empty")

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def to_dict(self) -> dict[str, Any]:
        """The flat view (every flag's value under its name), in plain Python values, so a checkpoint holding
        it loads with weights_only=True."""
        flat = {f.name: getattr(self.model, f.name) for f in flag_fields(GPTConfig)}
        flat.update({f.name: getattr(self, f.name) for f in flag_fields(TrainConfig)})
        flat["corpus"] = list(self.corpus)
        return flat

    @classmethod
    def from_dict(cls, flat: dict[Any, Any]) -> "TrainConfig":
        """From a flat mapping (YAML, flags, a checkpoint's config); unknown keys and bad values are UsageErrors."""
        model_fields = {f.name: f for f in flag_fields(GPTConfig)}
        train_fields = {f.name: f for f in flag_fields(TrainConfig)}
        unknown = [str(k) for k in flat if k not in model_fields and k not in train_fields]
        if unknown:
            raise UsageError(f"unknown config key(s): {', '.join(sorted(unknown))}")
        model = build(GPTConfig, {k: coerce(model_fields[k], v) for k, v in flat.items() if k in model_fields})
        return build(cls, {"model": model, **{k: coerce(train_fields[k], v) for k, v in flat.items()
                                              if k in train_fields}})

    def replace(self, **flat: Any) -> "TrainConfig":
        """A copy with some flat settings changed (model ones included)."""
        return TrainConfig.from_dict({**self.to_dict(), **flat})


def check_dependent_flags(c: TrainConfig, given: set[str]) -> None:
    """Refuse a flag given that does nothing in this configuration (--muon_lr without --optimizer muon): each
    setting declares what it needs with setting(..., requires=...)."""
    check_requirements(flag_fields(GPTConfig) + flag_fields(TrainConfig), c.to_dict(), given)


def fixed_on_resume() -> tuple[str, ...]:
    """Settings that fix the model's weights, what it predicts, or the optimizer's state: a run resumes only with
    the same ones."""
    changeable = {"dropout", "attention", "init", "activation_checkpointing"}
    return tuple(f.name for f in flag_fields(GPTConfig) if f.name not in changeable) + ("objective", "optimizer")


def load_yaml(path: str) -> dict[str, Any]:
    data = read_yaml(path, "config file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of key: value")
    return data


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog="playground.py",
        description="Train a GPT on a text corpus. Defaults < --config YAML < command-line flags.",
        # SUPPRESS: a flag that was not typed does not appear at all, so it cannot hide the YAML value.
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML file with any of the keys below")
    add_flags(parser, GPTConfig)
    add_flags(parser, TrainConfig, positional="corpus")
    return parser


def parse_settings(argv: list[str] | None = None) -> tuple[TrainConfig, set[str], set[str]]:
    """Parse the command line into a TrainConfig; also return the names of the settings typed as flags and of
    those the --config file holds (a resume applies or refuses both alike)."""
    args = vars(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    values = load_yaml(args.pop("config")) if "config" in args else {}
    in_yaml = {str(k) for k in values}
    if args.get("corpus") == []:  # the positional is optional: no corpus typed means "not set"
        del args["corpus"]
    values.update(args)
    return TrainConfig.from_dict(values), set(args), in_yaml


def parse_config(argv: list[str] | None = None) -> tuple[TrainConfig, set[str]]:
    """Parse the command line into a TrainConfig; also return the names of the fields set by flags."""
    c, set_by_flags, _ = parse_settings(argv)
    return c, set_by_flags
