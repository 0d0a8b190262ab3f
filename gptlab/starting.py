"""How a training run starts: fresh (never over an earlier run's files), resumed from its checkpoint, or from a
local Hugging Face folder's weights; and where its files go."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from config import TrainConfig, fixed_on_resume
from gptlab.checkpoint import checkpoint_exists, load_checkpoint, sharded_folder
from gptlab.errors import UsageError
from gptlab.fileio import check_output, check_output_dir
from gptlab.hf_folder import load_checkpoint_or_folder
from gptlab.metrics import METRICS, earlier_run_file, run_file
from gptlab.pacing import TIMED_STEPS, UNTIMED_STEPS
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
                  in_yaml: set[str] = frozenset()) -> tuple[TrainConfig, dict[str, Any], str | None]:
    """On --resume, the run continues with the checkpoint's config. The settings given now, typed as flags or
    held by the --config file alike, override it, except those that would change the model, its tokenizer or
    its optimizer: those are refused, naming the setting, before any work. Also returns the line that says how a
    time budget and max_iters were combined (None without a budget)."""
    ckpt = load_checkpoint(c.checkpoint, tensors=False)  # a sharded one's tensors: each rank its part, later
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
    if "ema_decay" in given and now["ema_decay"] == 0 and "ema" in ckpt:
        raise UsageError(f"{named('ema_decay')} 0: {c.checkpoint} holds a moving average of the weights (decay "
                         f"{saved['ema_decay']:g}), which generate.py, evaluate.py and export.py use by default; "
                         f"resuming without it would drop it: leave --ema_decay out to keep it")
    if c.init_from is not None and "init_from" in given:
        raise UsageError(f"{named('init_from')} starts a fresh run from a folder's weights; --resume continues a "
                         f"checkpoint: give one of them")
    steps, note = resume_budget(c, saved, ckpt, given, named)
    merged = TrainConfig.from_dict({**saved, **now, **steps, "resume": True})
    if merged.max_iters <= ckpt["iteration"]:
        raise UsageError(f"{c.checkpoint} is already at step {ckpt['iteration']}: give a --max_iters above it to "
                         f"train on")
    return merged, ckpt, note


def resume_budget(c: TrainConfig, saved: dict[str, Any], ckpt: dict[str, Any], given: set[str],
                  named: Callable[[str], str]) -> tuple[dict[str, Any], str | None]:
    """The max_iters and time_budget a resumed run trains with, and one line saying how they were combined. A
    time budget counts the run's whole wall time, its earlier parts included; one typed now bounds the run."""
    typed = "time_budget" in given and c.time_budget is not None
    budget = c.time_budget if typed else saved["time_budget"]  # the checkpoint's while it is still planning
    if budget is None:
        return {}, None
    spent, iteration, plan = ckpt.get("seconds", 0.0), ckpt["iteration"], saved["max_iters"]
    capped = "max_iters" in given
    if saved["time_budget"] is None and budget == ckpt.get("planned_budget"):  # its plan is made: go on with it
        steps = min(c.max_iters, plan) if capped else plan
        if steps <= iteration:
            raise UsageError(f"{c.checkpoint} is already at step {iteration}, the end its --time_budget {budget:g} "
                             f"planned ({spent:.1f}s of wall time): give a larger {named('time_budget')} (it counts "
                             f"the whole run), or --max_iters without it")
        beyond = f", not --max_iters {c.max_iters}" if capped and c.max_iters > plan else ""
        return {"max_iters": steps, "time_budget": None}, (
            f"time budget {budget:g}s: the one this run's max_iters was planned from, so it trains to step {steps}"
            f"{beyond}")
    if typed and spent >= budget:
        raise UsageError(f"{named('time_budget')} {budget:g} counts the whole run's wall time, and {c.checkpoint} "
                         f"has trained {spent:.1f}s already: give a larger budget, or --max_iters without it")
    steps = c.max_iters if capped else max(plan, iteration + UNTIMED_STEPS + TIMED_STEPS)  # until the first plan
    return {"max_iters": steps, "time_budget": budget}, (
        f"time budget {budget:g}s counts the whole run's wall time ({spent:.1f}s before this resume): max_iters "
        f"is planned to fit" + (f", at most --max_iters {c.max_iters}" if capped else ""))


def init_config(c: TrainConfig, set_by_flags: set[str]) -> tuple[TrainConfig, dict[str, Any]]:
    """--init_from DIR: the run starts from the weights of a local Hugging Face folder (or of a checkpoint),
    taking its model settings and tokenizer; a flag typed now that contradicts them is an error."""
    start = load_checkpoint_or_folder(c.init_from)  # or a checkpoint of ours, a file or a sharded folder
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
    if Path(c.checkpoint).is_dir() and sharded_folder(c.checkpoint) is None:  # --overwrite would not help
        raise UsageError(f"--checkpoint {c.checkpoint} is a folder; give a file name inside it")
    if checkpoint_exists(c.checkpoint) and not c.overwrite:  # a sharded one may be aside (see swap_in)
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
    if c.checkpoint_format == "file" and sharded_folder(c.checkpoint) is not None:
        raise UsageError(f"--checkpoint {c.checkpoint} is a sharded checkpoint: continue it with --checkpoint_format "
                         f"dcp, or make it one file first (python -m gptlab.checkpoint {c.checkpoint} FILE)")
    # a sharded checkpoint is a folder (check_fresh_run keeps any other folder safe): probe with its lock file
    check_output(c.checkpoint if c.checkpoint_format == "file" else f"{c.checkpoint}.lock", "--checkpoint", inputs)
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
