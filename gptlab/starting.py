"""How a training run starts: fresh (never over an earlier run's files), resumed from its checkpoint, or from a
local Hugging Face folder's weights; and where its files go."""

from pathlib import Path
from typing import Any

import torch

from config import TrainConfig, fixed_on_resume
from gptlab.checkpoint import load_checkpoint
from gptlab.convert import checkpoint_from_hf_folder
from gptlab.errors import UsageError
from gptlab.fileio import check_output, check_output_dir
from gptlab.metrics import METRICS, earlier_run_file, run_file
from gptlab.runtime import Runtime
from gptlab.tokenizer import Tokenizer


def metrics_path(c: TrainConfig) -> Path:
    """Beside the checkpoint (a/ck.tar -> a/ck.metrics.jsonl). A resumed checkpoint whose metrics are where runs
    put them before, in --out_dir, keeps them there: they are found, cut back and continued."""
    path, earlier = run_file(c.checkpoint, METRICS), earlier_run_file(c.out_dir, c.checkpoint, METRICS)
    return earlier if c.resume and not path.exists() and earlier.exists() else path


def plot_path(c: TrainConfig, picture: str = "loss") -> Path:
    """The loss curve (picture="loss") or the health heat maps (picture="health"), beside the metrics."""
    metrics = metrics_path(c)
    return metrics.with_name(metrics.name.removesuffix(METRICS) + f"{picture}.png")


def resume_config(c: TrainConfig, set_by_flags: set[str],
                  in_yaml: set[str] = frozenset()) -> tuple[TrainConfig, dict[str, Any]]:
    """On --resume, the run continues with the checkpoint's config. The settings given now, typed as flags or
    held by the --config file alike, override it, except those that would change the model, its tokenizer or
    its optimizer: those are refused, naming the setting, before any work."""
    ckpt = load_checkpoint(c.checkpoint)
    if "optimizer" not in ckpt or "config" not in ckpt:
        raise UsageError(f"{c.checkpoint} holds no training state to resume (was it exported?)")
    saved = TrainConfig.from_dict(ckpt["config"]).to_dict()  # older checkpoints lack newer settings
    given = set(set_by_flags) | set(in_yaml)
    now = {name: c.to_dict()[name] for name in given}

    def named(name: str) -> str:
        return f"--{name}" if name in set_by_flags else f"--{name} (from --config)"

    for name in sorted(given & set(fixed_on_resume())):
        if now[name] != saved[name]:
            raise UsageError(f"{named(name)} {now[name]} differs from the checkpoint's {saved[name]}: "
                             f"a checkpoint resumes only with the model and optimizer it was trained with")
    if c.tokenizer is not None and "tokenizer" in given and \
            Tokenizer.from_file(c.tokenizer).to_json() != ckpt["tokenizer"]:
        raise UsageError(f"{named('tokenizer')} {c.tokenizer} is not the tokenizer {c.checkpoint} was trained with")
    if c.time_budget is not None and "time_budget" in given and saved["time_budget"] is None:
        planned = ckpt.get("planned_budget")
        if c.time_budget != planned:
            was = f"; it was planned from --time_budget {planned:g}" if planned is not None else ""
            raise UsageError(f"{named('time_budget')}: {c.checkpoint} has no time budget left to continue (a "
                             f"budgeted run fixes its max_iters, saved in the checkpoint, once timed{was}): give "
                             f"--max_iters to train on, or start a fresh run with --time_budget")
        del now["time_budget"]  # the budget its max_iters was planned from: the run goes on as planned
    if c.init_from is not None and "init_from" in given:
        raise UsageError(f"{named('init_from')} starts a fresh run from a folder's weights; --resume continues a "
                         f"checkpoint: give one of them")
    merged = TrainConfig.from_dict({**saved, **now, "resume": True})
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
            raise UsageError(f"{path} already exists (an earlier run's {what}, named after its checkpoint): choose "
                             f"another --checkpoint, or replace it with --overwrite")


def check_outputs(c: TrainConfig) -> None:
    """Before any work: every file the run writes can be written, and none of them is one of its inputs."""
    inputs = [("corpus", path) for path in c.corpus] + [("--tokenizer", c.tokenizer)]
    check_output_dir(c.out_dir, "--out_dir")
    check_output(c.checkpoint, "--checkpoint", inputs)
    check_output(metrics_path(c), "--checkpoint's metrics file", inputs, [("--checkpoint", c.checkpoint)])


def check_runtime(c: TrainConfig, rt: Runtime) -> None:
    """The refusals that depend on how the run is launched (under torchrun with --fsdp), made before the run
    writes its tokenizer, token cache or metrics (gptlab/health.py and gptlab/muon.py keep their own checks of
    the last two, for other callers)."""
    if not rt.fsdp:
        return
    if rt.dtype == torch.float16:
        raise UsageError("--fsdp with --dtype float16 is not supported: the loss scaler would look for "
                         "overflows in each rank's shard alone; use --dtype bfloat16")
    if c.ema_decay > 0:
        raise UsageError("--ema_decay is not supported with --fsdp yet (the average would need sharding too): "
                         "leave --ema_decay out, or train with DDP (torchrun without --fsdp)")
    if c.optimizer == "muon":
        raise UsageError("--optimizer muon does not support --fsdp (FSDP shards the weight matrices Muon "
                         "orthogonalises whole): train with DDP (torchrun without --fsdp) or --optimizer adamw")
