"""Training configuration: one frozen dataclass, filled from defaults <- a YAML file <- command-line flags.

Every field of `TrainConfig` is a flag of the same name (`--embedding_dim`, `--lr`, ...) and a key
of the same name in a `--config file.yaml`. Flags given on the command line win over the YAML file,
which wins over the defaults below. Unknown YAML keys and values of the wrong type are errors.
"""

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from errors import CliParser, UsageError

BUNDLED_CORPUS = str(Path(__file__).resolve().parent / "data" / "shakespeare.txt")
LR_SCHEDULES = ("cosine", "linear", "constant", "wsd", "inverse_sqrt")

# Fields that define the model (its weights' shapes, what it predicts): a run resumes only with the same ones.
MODEL_SHAPE_FIELDS = ("vocab_size", "block_size", "embedding_dim", "num_of_layers", "num_of_heads", "bias",
                      "norm_position", "objective")


def _opt(default: Any, group: str, help: str, **argparse_kwargs: Any) -> Any:
    """A dataclass field that also carries its --help text and flag group."""
    return field(default=default, metadata={"group": group, "help": help, **argparse_kwargs})


@dataclass(frozen=True)
class TrainConfig:
    # data and tokenizer
    corpus: tuple[str, ...] = _opt((BUNDLED_CORPUS,), "data", "text file(s) or folder(s) of .txt files")
    tokenizer: str | None = _opt(None, "data", "tokenizer.json to use; if omitted, a byte-level BPE "
                                 "tokenizer is trained on the corpus and saved in out_dir")
    tokenizer_kind: str = _opt("bbpe", "data", "kind of tokenizer to train when --tokenizer is not given",
                               choices=("bbpe", "bpe"))
    vocab_size: int | None = _opt(None, "data", "vocabulary size of the trained tokenizer (default 8000); "
                                  "with --tokenizer it must match the tokenizer's size")
    val_fraction: float = _opt(0.1, "data", "fraction of the corpus (its last bytes) held out for validation")
    out_dir: str = _opt("runs", "data", "folder for the token cache, a trained tokenizer, metrics.jsonl "
                        "and the loss-curve PNG")
    # model
    objective: str = _opt("clm", "model", "clm: next-token prediction with a causal decoder (GPT); mlm: "
                          "masked-token prediction with a bidirectional encoder (BERT)", choices=("clm", "mlm"))
    mask_prob: float = _opt(0.15, "model", "mlm only: fraction of tokens chosen for prediction (of those, "
                            "80%% become <mask>, 10%% a random token, 10%% stay)")
    block_size: int = _opt(256, "model", "context length in tokens")
    embedding_dim: int = _opt(384, "model", "width of the residual stream (n_embd)")
    num_of_layers: int = _opt(4, "model", "number of transformer blocks")
    num_of_heads: int = _opt(4, "model", "attention heads per block (must divide embedding_dim)")
    dropout: float = _opt(0.1, "model", "dropout on embeddings, attention weights and residual branches")
    bias: bool = _opt(True, "model", "biases in linear layers and LayerNorms")
    attention: str = _opt("sdpa", "model", "sdpa: PyTorch's fused kernels; scratch: the from-scratch "
                          "reference path", choices=("sdpa", "scratch"))
    norm_position: str = _opt("pre", "model", "pre: LayerNorm before each sub-layer (GPT-2); post: after "
                              "(GPT-1 paper)", choices=("pre", "post"))
    init: str = _opt("gpt2", "model", "gpt2: N(0, 0.02) with scaled residual projections; pytorch: "
                     "PyTorch's default init", choices=("gpt2", "pytorch"))
    # optimisation
    batch_size: int = _opt(16, "optimisation", "sequences per micro-batch (per process)")
    grad_accum_steps: int = _opt(1, "optimisation", "micro-batches accumulated per optimiser step")
    max_iters: int = _opt(5000, "optimisation", "optimiser steps in the whole run")
    lr: float = _opt(6e-4, "optimisation", "peak learning rate")
    min_lr: float | None = _opt(None, "optimisation", "final learning rate (default lr / 10)")
    lr_schedule: str = _opt("cosine", "optimisation", "shape of the learning rate after warmup",
                            choices=LR_SCHEDULES)
    warmup_iters: int = _opt(2000, "optimisation", "linear warmup steps (the GPT-1 paper used 2000)")
    decay_fraction: float = _opt(0.2, "optimisation", "wsd only: fraction of the run spent decaying to min_lr")
    weight_decay: float = _opt(0.01, "optimisation", "decoupled weight decay on matrices and embeddings "
                               "(never on biases or LayerNorm gains)")
    beta1: float = _opt(0.9, "optimisation", "AdamW beta1")
    beta2: float = _opt(0.95, "optimisation", "AdamW beta2")
    grad_clip: float = _opt(1.0, "optimisation", "clip the global gradient norm to this (0 = off)")
    # evaluation, checkpoints and logging
    eval_interval: int = _opt(500, "evaluation", "steps between evaluations of train/val loss")
    eval_iters: int = _opt(50, "evaluation", "batches averaged per evaluation")
    log_interval: int = _opt(10, "evaluation", "steps between progress-bar/metrics updates")
    checkpoint_interval: int = _opt(500, "evaluation", "steps between checkpoints (one is always written "
                                    "at the end)")
    checkpoint: str = _opt("model_checkpoint.tar", "evaluation", "checkpoint file to write (and to read "
                           "with --resume)")
    resume: bool = _opt(False, "evaluation", "continue the run saved in --checkpoint")
    sample_tokens: int = _opt(200, "evaluation", "tokens of text sampled from the model at the end (0 = none)")
    wandb_project: str | None = _opt(None, "evaluation", "log metrics to this Weights & Biases project "
                                     "(honours WANDB_MODE; offline when not logged in)")
    wandb_run_name: str | None = _opt(None, "evaluation", "Weights & Biases run name")
    # system
    seed: int = _opt(1337, "system", "random seed (model init, batches, dropout)")
    device: str = _opt("auto", "system", "auto picks cuda, then mps, then cpu")
    dtype: str = _opt("auto", "system", "autocast precision; auto: bfloat16 on GPUs that support it, "
                      "else float32", choices=("auto", "float32", "bfloat16", "float16"))
    compile: bool = _opt(False, "system", "torch.compile the model (first steps are slow while it compiles)")
    fsdp: bool = _opt(False, "system", "under torchrun: shard parameters, gradients and optimizer state across "
                      "processes (FSDP2) instead of replicating them (DDP); for models that do not fit one device. "
                      "Ignored in a single process")

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values only, so a checkpoint holding it loads with weights_only=True."""
        d = dataclasses.asdict(self)
        d["corpus"] = list(self.corpus)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UsageError(f"unknown config key(s): {', '.join(sorted(unknown))}")
        d = {k: _coerce(k, v) for k, v in d.items()}
        return cls(**d)


def _validate(c: TrainConfig) -> None:
    positive = ("block_size", "embedding_dim", "num_of_layers", "num_of_heads", "batch_size",
                "grad_accum_steps", "max_iters", "eval_interval", "eval_iters", "log_interval",
                "checkpoint_interval")
    for name in positive:
        if getattr(c, name) <= 0:
            raise UsageError(f"--{name} must be a positive integer, got {getattr(c, name)}")
    if c.warmup_iters < 0:
        raise UsageError(f"--warmup_iters must be >= 0, got {c.warmup_iters}")
    if c.vocab_size is not None and c.vocab_size <= 0:
        raise UsageError(f"--vocab_size must be positive, got {c.vocab_size}")
    if c.embedding_dim % c.num_of_heads:
        raise UsageError(f"--embedding_dim {c.embedding_dim} is not divisible by --num_of_heads "
                         f"{c.num_of_heads}")
    for name in ("lr", "weight_decay", "grad_clip", "sample_tokens"):
        if getattr(c, name) < 0 or not math.isfinite(getattr(c, name)):
            raise UsageError(f"--{name} must be a finite number >= 0, got {getattr(c, name)}")
    if c.final_lr > c.lr:
        raise UsageError(f"--min_lr {c.final_lr} is above --lr {c.lr}")
    if not 0 < c.mask_prob < 1:
        raise UsageError(f"--mask_prob must be in (0, 1), got {c.mask_prob}")
    for name in ("dropout", "decay_fraction"):
        if not 0 <= getattr(c, name) < 1:
            raise UsageError(f"--{name} must be in [0, 1), got {getattr(c, name)}")
    if not 0 < c.val_fraction < 1:
        raise UsageError(f"--val_fraction must be in (0, 1), got {c.val_fraction}")
    if not c.corpus:
        raise UsageError("no corpus given")
    for f in dataclasses.fields(c):
        choices = f.metadata.get("choices")
        if choices and getattr(c, f.name) not in choices:
            raise UsageError(f"--{f.name} must be one of {', '.join(choices)}, got {getattr(c, f.name)!r}")


def _field_type(name: str) -> type:
    """The scalar type behind a field's annotation (`int | None` -> int, `tuple[str, ...]` -> str)."""
    f = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    default = f.default
    if isinstance(default, tuple):
        return str
    if default is None:
        return {"vocab_size": int, "min_lr": float}.get(name, str)
    return type(default)


def _coerce(name: str, value: Any) -> Any:
    """Check a YAML (or checkpoint) value against the field's type; ints are accepted for floats."""
    if value is None:
        return None
    kind = _field_type(name)
    if name == "corpus":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(x, str) for x in items):
            raise UsageError(f"config key 'corpus' must be a path or a list of paths, got {value!r}")
        return tuple(items)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML reads "6e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if type(value) is not kind:
        raise UsageError(f"config key '{name}' must be of type {kind.__name__}, got {value!r}")
    return value


def load_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise UsageError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
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
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        group_name = meta.pop("group")
        group = groups.get(group_name) or groups.setdefault(group_name, parser.add_argument_group(group_name))
        help_text = f"{meta.pop('help')} (default: {_show_default(f.default)})"
        if f.name == "corpus":
            group.add_argument("corpus", nargs="*", help=help_text)
        elif isinstance(f.default, bool):
            group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(f"--{f.name}", type=_field_type(f.name), help=help_text, **meta)
    return parser


def _show_default(default: Any) -> str:
    if isinstance(default, tuple):
        return "the bundled corpus data/shakespeare.txt"
    return str(default)


def parse_config(argv: list[str] | None = None) -> tuple[TrainConfig, set[str]]:
    """Parse the command line into a TrainConfig; also return the names of the fields set by flags."""
    args = vars(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    values = load_yaml(args.pop("config")) if "config" in args else {}
    if args.get("corpus") == []:  # the positional is optional: no corpus typed means "not set"
        del args["corpus"]
    values.update(args)
    return TrainConfig.from_dict(values), set(args)
