"""Checkpoints: one plain dict in one file, written atomically, read without running code.

What a checkpoint holds (all tensors or plain Python values, so `torch.load(weights_only=True)` reads it):
    version         CHECKPOINT_VERSION, checked on load
    config          the TrainConfig as a dict (schedule, data settings: what --resume continues with)
    model_config    the GPTConfig as a dict (all that is needed to rebuild the model)
    model           the model's full state dict (never a torch.compile, DDP or FSDP wrapper's, nor a shard)
    optimizer       the full AdamW state dict keyed by parameter name (torch.distributed.checkpoint's
                    format, so single-process, DDP and FSDP runs save alike and resume each other's)
    iteration       optimiser steps done; the learning rate and the data order follow from it
    best_val_loss   the lowest validation loss seen so far
    rng             torch CPU (and CUDA) RNG states, for dropout
    tokenizer       the tokenizer's JSON text, so a checkpoint alone is enough to generate
"""

import os
from pathlib import Path
from typing import Any

import torch

from errors import UsageError
from gpt import GPT, GPTConfig
from preprocessing.tokenizer import Tokenizer

CHECKPOINT_VERSION = 2
REQUIRED_KEYS = ("version", "model_config", "model", "tokenizer")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename over `path`.

    A crash at any moment leaves either the old checkpoint or the new one, never a torn file.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"version": CHECKPOINT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise UsageError(f"cannot write checkpoint {path}: {e.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint; any problem is a UsageError naming the file."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"checkpoint not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"checkpoint path is a folder, not a file: {path}") from None
    except PermissionError:
        raise UsageError(f"cannot read checkpoint {path}: permission denied") from None
    except Exception as e:  # a truncated, foreign or corrupt file fails in many ways inside torch.load
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{path} is not a readable checkpoint ({first_line[:200]})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise UsageError(f"{path} is not a GPT-experiments checkpoint")
    if ckpt["version"] != CHECKPOINT_VERSION:
        raise UsageError(f"{path} has checkpoint format version {ckpt['version']}; this code reads version "
                         f"{CHECKPOINT_VERSION}")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """Rebuild the model (in eval mode, on `device`) and its tokenizer from a loaded checkpoint."""
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    tokenizer = Tokenizer.from_json(ckpt["tokenizer"])
    if tokenizer.vocab_size != model.config.vocab_size:
        raise UsageError(f"checkpoint's tokenizer has {tokenizer.vocab_size} tokens but its model "
                         f"{model.config.vocab_size}")
    return model.to(device).eval(), tokenizer
