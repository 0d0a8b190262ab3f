"""Where a run's numbers go: a JSONL file (always), Weights & Biases (when asked), and a loss-curve PNG; the
files are named after the run's checkpoint, beside it (run_file).

One JSON object per line, each with its "step"; five kinds of lines, written by playground.py:
    training     "loss", "lr", "tokens_per_s", the health counts, ["loss_scale"], ["mfu"], "time_s"
    evaluation   "train_loss", "val_loss", "val_bpb" or "val_accuracy", [the same for the EMA, "ema_..."], "time_s"
    health       the per-layer telemetry, every --health_interval steps
    event        what was done about a bad step
    plan         "planned_max_iters", "time_budget": each plan of --time_budget (gptlab/pacing.py)
time_s is wall seconds since the run's command started (summed over resumed runs). The health counts', health
lines' and event lines' keys are listed in docs/health.md (written by gptlab/health.py).
"""

import json
import os
from pathlib import Path
from typing import Any

from gptlab.errors import UsageError
from gptlab.fileio import atomic_write, atomic_write_text

METRICS = "metrics.jsonl"  # a run's files: <checkpoint less its suffix>.metrics.jsonl, .loss.png, .health.png


def run_file(checkpoint: str | Path, kind: str) -> Path:
    """A run's file of `kind` (METRICS, "loss.png", "health.png"), named after its checkpoint and beside it:
    a/ck.tar -> a/ck.metrics.jsonl. Two runs' checkpoints are two paths, so their files never meet (two
    checkpoints in one folder that differ only in their suffix would share them: a fresh run refuses that)."""
    path = Path(checkpoint)
    return path.with_name(f"{path.stem}.{kind}")


def earlier_run_file(out_dir: str | Path, checkpoint: str | Path, kind: str) -> Path:
    """Where runs before the layout above put their files: <out_dir>/<checkpoint stem>.<kind> (so runs of
    a/ck.tar and b/ck.tar met there)."""
    return Path(out_dir) / f"{Path(checkpoint).stem}.{kind}"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics file in the order written, or [] when there is none: the one reader, for every
    command. What is not a row (a line torn by a kill, a blank line, a hand edit) is skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


class Metrics:
    """One place metrics go: a JSONL file (always) and Weights & Biases (when asked).

    The file is started at the first row, not before: a run refused before its first step leaves none behind
    (which would block the corrected command), nor cuts an earlier run's file that --overwrite would replace."""

    def __init__(self, path: Path, config: dict[str, Any], resumed_at: int | None, wandb_project: str | None,
                 wandb_run_name: str | None) -> None:
        """resumed_at: the checkpoint's step when resuming (lines past it, logged before a kill, are dropped so
        no step appears twice); None for a fresh run, which starts the file anew."""
        self.path, self.resumed_at = path, resumed_at
        self.file: Any = None
        self.wandb_run = start_wandb(wandb_project, wandb_run_name, config, path.parent) if wandb_project else None

    def _start(self) -> None:
        kept = []
        if self.resumed_at is not None:
            kept = [row for row in read_metrics(self.path) if row.get("step", 0) <= self.resumed_at]
        atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept), "metrics file")
        try:
            self.file = open(self.path, "a", encoding="utf-8")  # line by line; read_metrics skips a torn last one
        except OSError as e:
            raise UsageError(f"cannot write metrics file {self.path}: {e.strerror}") from None

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.file is None:
            self._start()
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def start_wandb(project: str, run_name: str | None, config: dict[str, Any], folder: Path) -> Any:
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
        return wandb.init(project=project, name=run_name, config=config, mode=mode, dir=str(folder),
                          settings=wandb.Settings(init_timeout=30, silent=True))
    except Exception as e:  # noqa: BLE001 - logging must never stop training
        print(f"wandb: could not start ({str(e).splitlines()[0]}); metrics stay in the local JSONL file")
        return None


def _netrc_has_wandb() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def pyplot() -> Any:
    """matplotlib.pyplot drawing to files (no window), or None when matplotlib is not installed (it is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(plt: Any, fig: Any, path: Path, what: str) -> None:
    """Write a pyplot figure as a PNG (atomically: an earlier picture stays whole until the new one is) and
    free it."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), what)
    plt.close(fig)


def plot_losses(metrics_path: Path, png_path: Path) -> bool:
    """Train and val loss against step, from the JSONL file; skipped when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return False
    rows = read_metrics(metrics_path)
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
    save_figure(plt, fig, png_path, "loss plot")
    return True
