"""Checkpoints: one plain dict in one file, written atomically, read without running code.

What a checkpoint holds (all tensors or plain Python values, so `torch.load(weights_only=True)` reads it):
    version         CHECKPOINT_VERSION, checked on load
    config          the TrainConfig as a dict (schedule, data settings: what --resume continues with)
    model_config    the GPTConfig as a dict (all that is needed to rebuild the model)
    model           the model's full state dict (never a torch.compile, DDP or FSDP wrapper's, nor a shard)
    optimizer       the full optimizer state dict (AdamW's moments, or Muon's momentum buffers and AdamW's moments
                    for the other parameters) keyed by parameter name (torch.distributed.checkpoint's format, so
                    single-process, DDP and FSDP runs save alike and resume each other's)
    scaler          the float16 loss scaler's state (scale, growth tracker); inert in bfloat16 and float32
    iteration       optimiser steps done; the learning rate and the data order follow from it
    seconds         wall seconds the run has trained so far (resumed runs summed), for --time_budget
    planned_budget  the --time_budget its max_iters was planned from, or None: a resume may name it again
    best_val_loss   the lowest validation loss seen so far
    rng             torch CPU (and CUDA) RNG states, for dropout
    tokenizer       the tokenizer's JSON text, so a checkpoint alone is enough to generate
    health          the spike detector's window and the bad-step counts (gptlab/health.py), for exact resume
    ema             optional (--ema_decay): the moving average of the weights, a state dict like `model`; what
                    model_from_checkpoint builds unless asked for the raw weights
    tokenizer_learned_from  the files the tokenizer learned from and how many of their bytes (the training
                    split: tokenizer.learned_from), or None when unknown (a --tokenizer file, an older checkpoint)

A fine-tuned checkpoint (finetune.py) holds version, model_config, model and tokenizer, and instead of the
training state: head (the classifier's), labels, task, input_format, finetune_config, epoch and val_accuracy.
"""

import dataclasses
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from gpt import GPT, GPTConfig
from gptlab.errors import UsageError
from gptlab.fileio import atomic_write
from gptlab.tokenizer import Tokenizer

CHECKPOINT_VERSION = 2
REQUIRED_KEYS = ("version", "model_config", "model", "tokenizer")
NOT_OURS = "is not a GPT-experiments checkpoint"
DAMAGED = "is not a readable checkpoint"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
RAW_WEIGHTS_HELP = ("use the checkpoint's raw weights even when it holds their moving average (trained with "
                    "--ema_decay), which is used by default")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename over `path` (fileio.atomic_write).

    A crash, a kill or a full disk at any moment leaves either the old checkpoint or the new one, never a torn
    file; a failure is one UsageError naming the file.
    """
    atomic_write(path, lambda f: torch.save({"version": CHECKPOINT_VERSION, **state}, f), "checkpoint")


def _read(path: str | Path, map_location: str | torch.device) -> Any:
    """torch.load(weights_only=True) with every failure turned into one line that names the file. torch's own
    message is not shown: it is long and advises weights_only=False, which would run code from the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            is_archive = zipfile.is_zipfile(f)
    except FileNotFoundError:
        raise UsageError(f"checkpoint not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"checkpoint path is a folder, not a file: {path}") from None
    except OSError as e:
        raise UsageError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    if not is_archive and head == ZIP_MAGIC:
        raise UsageError(f"{path} {DAMAGED} (a PyTorch archive cut short or damaged)")
    if not is_archive:
        raise UsageError(f"{path} {NOT_OURS} (not a PyTorch archive: another kind of file)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before failing
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise UsageError(f"{path} {NOT_OURS} (it holds Python objects other than tensors and plain "
                         f"values)") from None
    except Exception:  # a damaged archive fails in many ways inside torch.load
        raise UsageError(f"{path} {DAMAGED} (a damaged PyTorch archive)") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint; any problem is a UsageError naming the file.

    Loaded on the CPU by default: a caller that only needs the model moves the model, never the optimizer's
    moments, to the GPU (see model_from_checkpoint)."""
    ckpt = _read(path, map_location)
    if not isinstance(ckpt, dict):
        raise UsageError(f"{path} {NOT_OURS} (it holds a {type(ckpt).__name__}, not a dict)")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise UsageError(f"{path} {NOT_OURS} (no {', '.join(missing)} entry)")
    if ckpt["version"] != CHECKPOINT_VERSION:
        raise UsageError(f"{path} has checkpoint format version {ckpt['version']}; this code reads version "
                         f"{CHECKPOINT_VERSION}")
    return ckpt


def model_config_from(ckpt: dict[str, Any], source: str = "the checkpoint") -> GPTConfig:
    """The checkpoint's GPTConfig. Keys added to GPTConfig since it was written take their defaults; a key
    GPTConfig does not know, or a bad value, is an error naming the file."""
    d = ckpt["model_config"]
    if not isinstance(d, dict):
        raise UsageError(f"{source}: model_config is not a mapping")
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    required = {f.name for f in dataclasses.fields(GPTConfig)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    unknown, missing = sorted(set(d) - known), sorted(required - set(d))
    if unknown or missing:
        what = [f"unknown key(s) {', '.join(map(str, unknown))}"] * bool(unknown) + \
               [f"missing key(s) {', '.join(missing)}"] * bool(missing)
        raise UsageError(f"{source}: its model_config has {' and '.join(what)} (written by another version of "
                         f"this code?)")
    try:
        return GPTConfig(**d)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{source}: bad model_config: {e}") from None


def _check_size(config: GPTConfig, weights: dict[str, Any], source: str) -> None:
    """Refuse a config far larger than the weights stored (before allocating it: a bogus num_of_layers could
    ask for more memory than the machine has). The rough count errs high, never low."""
    stored = sum(t.numel() for t in weights.values() if isinstance(t, torch.Tensor))
    e = config.embedding_dim
    estimate = config.num_of_layers * 12 * e * e + (config.vocab_size + config.block_size) * e
    if estimate > 4 * stored + 1_000_000:
        raise UsageError(f"{source}: its model_config (about {estimate:,} parameters) does not fit its weights "
                         f"({stored:,} numbers stored)")


def model_from_checkpoint(ckpt: dict[str, Any], device: str | torch.device = "cpu",
                          source: str = "the checkpoint", raw_weights: bool = False) -> tuple[GPT, Tokenizer]:
    """Rebuild the model (in eval mode, on `device`) and its tokenizer from a loaded checkpoint: with the moving
    average of the weights when it holds one, unless raw_weights. Only the model moves to the device; load the
    checkpoint on the CPU (the default of load_checkpoint)."""
    config = model_config_from(ckpt, source)
    weights = ckpt["model"] if raw_weights or "ema" not in ckpt else ckpt["ema"]
    if not isinstance(weights, dict):
        raise UsageError(f"{source}: its model entry is not a state dict")
    _check_size(config, weights, source)
    model = GPT(config)
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, KeyError) as e:
        detail = " ".join(str(e).split())  # torch lists every mismatch on its own line
        raise UsageError(f"{source}: its weights do not fit its model_config ({detail[:300]})") from None
    tokenizer = Tokenizer.from_json(ckpt["tokenizer"], source=f"{source}'s tokenizer") \
        if isinstance(ckpt["tokenizer"], str) else None
    if tokenizer is None:
        raise UsageError(f"{source}: its tokenizer entry is not tokenizer JSON text")
    if tokenizer.vocab_size != model.config.vocab_size:
        raise UsageError(f"{source}: its tokenizer has {tokenizer.vocab_size} tokens but its model "
                         f"{model.config.vocab_size}")
    return model.to(device).eval(), tokenizer
