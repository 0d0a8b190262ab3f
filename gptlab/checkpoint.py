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

A sharded checkpoint (--checkpoint_format dcp) is a folder holding the same dict: the tensors of model, optimizer
and ema in torch.distributed.checkpoint's files (each rank writes its shards; any number of processes reads them
back), and everything else in state.pt, a file like the one above, with `sharded` naming where each tensor goes.
load_checkpoint reads either kind whole; `python -m gptlab.checkpoint FOLDER FILE` turns a folder into one file.
"""

import dataclasses
import pickle
import shutil
import sys
import warnings
import zipfile
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from gpt import GPT, GPTConfig
from gptlab.errors import UsageError, run_cli
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


def _checked(ckpt: Any, path: str | Path) -> dict[str, Any]:
    if not isinstance(ckpt, dict):
        raise UsageError(f"{path} {NOT_OURS} (it holds a {type(ckpt).__name__}, not a dict)")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise UsageError(f"{path} {NOT_OURS} (no {', '.join(missing)} entry)")
    if ckpt["version"] != CHECKPOINT_VERSION:
        raise UsageError(f"{path} has checkpoint format version {ckpt['version']}; this code reads version "
                         f"{CHECKPOINT_VERSION}")
    return ckpt


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    tensors: bool = True) -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint, or a sharded folder written by ShardedSaver, whole; any
    problem is a UsageError naming the file.

    Loaded on the CPU by default: a caller that only needs the model moves the model, never the optimizer's
    moments, to the GPU (see model_from_checkpoint). tensors=False, for a sharded folder: everything but the
    tensors of model, optimizer and ema, with `sharded_folder` naming the folder that read_shards fills them
    from (a resumed run reads only its shards of them)."""
    folder = sharded_folder(path)
    if folder is None:
        return _checked(_read(path, map_location), path)
    ckpt = _checked(_read(folder / STATE_FILE, map_location), path)
    if not isinstance(ckpt.get("sharded"), dict):
        raise UsageError(f"{path} {NOT_OURS} (its {STATE_FILE} says nothing of its shards)")
    if not tensors:
        return {**ckpt, "sharded_folder": str(folder)}
    try:
        return join_tensors(ckpt, read_shards(folder))
    except (KeyError, TypeError, AttributeError):  # an index and a state.pt of different saves
        raise UsageError(f"{path} {DAMAGED} (its {STATE_FILE} and its shards do not match)") from None


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


# ----------------------------------------------------------------------------- sharded checkpoints (folders)

SHARDED_ENTRIES = ("model", "optimizer", "ema")  # their tensors go to torch.distributed.checkpoint's files
STATE_FILE = "state.pt"  # the rest of the checkpoint, in a folder's file that torch.load(weights_only=True) reads
METADATA_FILE = ".metadata"  # torch.distributed.checkpoint's index of the tensors, written last
# A single process reads and writes sharded folders too (no_dist); torch warns each time that it assumes so.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _aside(path: Path, what: str) -> Path:
    """A hidden sibling of the checkpoint: `tmp` while a save is written, `old` while a swap puts it in place."""
    return path.with_name(f".{path.name}.{what}")


def sharded_folder(path: str | Path) -> Path | None:
    """The sharded checkpoint at `path`, or, when nothing is there, the last good one a swap stopped by a kill
    left aside; None when neither is one."""
    path = Path(path)
    for folder in (path,) if path.exists() else (path, _aside(path, "old")):
        if (folder / METADATA_FILE).is_file() and (folder / STATE_FILE).is_file():
            return folder
    return None


def checkpoint_exists(path: str | Path) -> bool:
    return Path(path).exists() or sharded_folder(path) is not None


def split_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors inside the sharded entries, keyed by their path ("model/lm_head.weight",
    "optimizer/state/blocks.0.mlp.fc.weight/exp_avg"), and the rest of the state: those entries without their
    tensors, and `sharded`, each key's path, for join_tensors."""
    tensors: dict[str, torch.Tensor] = {}
    paths: dict[str, list[str]] = {}

    def strip(tree: dict[str, Any], path: list[str]) -> dict[str, Any]:
        kept = {}
        for name, value in tree.items():
            if isinstance(value, dict):
                kept[name] = strip(value, [*path, name])
            elif isinstance(value, torch.Tensor):
                key = "/".join(map(str, [*path, name]))
                tensors[key], paths[key] = value, [*path, name]
            else:  # plain values (the optimizer's param_groups) stay with the rest
                kept[name] = value
        return kept

    rest = {name: strip(value, [name]) if name in SHARDED_ENTRIES and isinstance(value, dict) else value
            for name, value in state.items()}
    return tensors, {**rest, "sharded": paths}


def join_tensors(rest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The inverse of split_tensors: the state with every tensor back in its place."""
    ckpt = {name: value for name, value in rest.items() if name not in ("sharded", "sharded_folder")}
    for key, path in rest["sharded"].items():
        node = ckpt
        for name in path[:-1]:
            node = node[name]
        node[path[-1]] = tensors[key]
    return ckpt


class _MetadataUnpickler(pickle.Unpickler):
    """The index file is a pickle; only torch.distributed.checkpoint's own records may be in it, so reading a
    checkpoint never runs code from it (torch's reader would unpickle anything)."""

    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("pathlib", "PosixPath"),
               ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if module == "torch.distributed.checkpoint.metadata" or (module, name) in self.ALLOWED or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp.Metadata:
        with open(Path(self.path) / METADATA_FILE, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, dcp.Metadata):
            raise pickle.UnpicklingError("not a checkpoint index")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_shards(folder: str | Path, targets: dict[str, torch.Tensor] | None = None,
                distributed: bool = False) -> dict[str, torch.Tensor]:
    """The folder's tensors (keyed as split_tensors keys them): those named in `targets` read into them (a
    DTensor receives its shard, whatever number of processes wrote the folder), the others whole, on the CPU.
    distributed: every rank calls this together (they share the reading plan)."""
    reader = _SafeReader(folder)
    try:
        stored = reader.read_metadata().state_dict_metadata
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, TypeError):
        raise UsageError(f"{folder} {DAMAGED} (its {METADATA_FILE} index is missing or damaged)") from None
    targets = targets or {}
    unknown = sorted(set(targets) - set(stored))
    if unknown:
        raise UsageError(f"{folder} holds no {unknown[0]} (a model or optimizer of another shape?)")
    tensors = {key: targets[key] if key in targets else torch.empty(meta.size, dtype=meta.properties.dtype)
               for key, meta in stored.items() if isinstance(meta, dcp.metadata.TensorStorageMetadata)}
    try:
        dcp.load(tensors, storage_reader=reader, no_dist=not distributed)
    except (Exception, CheckpointException) as e:  # a missing or cut shard file, a shape that does not fit
        raise UsageError(f"{folder} {DAMAGED} or does not fit this model ({_reason(e)})") from None
    return tensors


def _reason(e: BaseException) -> str:
    """Why torch.distributed.checkpoint failed, in brief: it wraps each rank's exception with its traceback."""
    if isinstance(e, CheckpointException) and e.failures:
        first = next(iter(e.failures.values()))
        e = first[0] if isinstance(first, tuple) else first
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return " ".join(str(e).split())[:300] or type(e).__name__


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def swap_in(new: Path, path: Path) -> None:
    """Put the complete folder `new` at `path`. The checkpoint there steps aside first and is deleted only once
    the new one is in place, so a kill at any moment leaves a whole checkpoint at `path` or aside, where
    sharded_folder finds it (and the next swap keeps it until its own folder is in place)."""
    old = _aside(path, "old")
    if path.exists() or path.is_symlink():
        if old.exists():
            _remove(old)
        path.rename(old)
    new.rename(path)
    if old.exists():
        _remove(old)


class ShardedSaver:
    """Writes sharded checkpoints (--checkpoint_format dcp): every rank its own shards (under DDP, the replicas'
    tensors are spread over the ranks), in a background thread, after a copy of the state (torch's async_save),
    so training goes on while they are written. They go to a temporary folder beside the checkpoint that rank 0
    swaps in when all have finished. A save, and the end of the run, first wait for the one in flight."""

    def __init__(self, path: str | Path, is_main: bool, distributed: bool) -> None:
        self.path, self.is_main = Path(path), is_main
        # The background writes' collectives go through a group of their own (gloo: async_save needs a CPU one),
        # so they never interleave with the training's.
        self.group = dist.new_group(backend="gloo") if distributed else None
        self.pending: Future | None = None

    def save(self, state: dict[str, Any]) -> None:
        """Every rank calls it, with its own shards in state's model and optimizer entries."""
        self.wait()
        tmp = _aside(self.path, "tmp")
        if self.is_main:
            if tmp.exists():
                _remove(tmp)  # what a save stopped by a kill left
            tmp.mkdir(parents=True)
        if self.group is not None:
            dist.barrier(group=self.group)  # no rank writes before the folder is new
        tensors, rest = split_tensors(state)
        written = dcp.async_save(tensors, storage_writer=FileSystemWriter(tmp), process_group=self.group,
                                 no_dist=self.group is None)
        written = getattr(written, "upload_completion", written)  # newer torch returns a response object
        if self.is_main:
            save_checkpoint(rest, tmp / STATE_FILE)
        done: Future = Future()

        def swap_when_written(write: Future) -> None:
            try:
                write.result()
                if self.is_main:
                    swap_in(tmp, self.path)
                done.set_result(None)
            except BaseException as e:  # raised by wait()
                done.set_exception(e)

        written.add_done_callback(swap_when_written)
        self.pending = done

    def wait(self) -> None:
        """Until the save in flight is written and in place; a failure to write it is a UsageError here."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        try:
            pending.result()
        except (Exception, CheckpointException) as e:  # a full disk, no permission: every rank says why
            raise UsageError(f"cannot write checkpoint {self.path}: {_reason(e)}") from None


def main(argv: list[str] | None = None) -> None:
    """python -m gptlab.checkpoint FOLDER FILE: a sharded checkpoint as one file."""
    from gptlab.errors import CliParser
    from gptlab.fileio import check_output

    parser = CliParser(prog="python -m gptlab.checkpoint",
                       description="Write a sharded checkpoint folder (--checkpoint_format dcp) as one checkpoint "
                                   "file, the single-file format (--checkpoint_format file).")
    parser.add_argument("folder", help="the sharded checkpoint folder")
    parser.add_argument("file", help="the checkpoint file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing FILE")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if sharded_folder(args.folder) is None:
        raise UsageError(f"{args.folder} is not a sharded checkpoint folder (one written with --checkpoint_format "
                         f"dcp holds {METADATA_FILE} and {STATE_FILE})")
    check_output(args.file, "FILE", [("FOLDER", args.folder)], overwrite=args.overwrite)
    save_checkpoint(load_checkpoint(args.folder), args.file)
    print(f"wrote {args.file}")


if __name__ == "__main__":
    run_cli(main)
