"""An experiment's report: each run's numbers, the summary over seeds (mean, 95% interval, paired difference to
the baseline), report.md, results.csv and curves.png, from the runs of a plan (gptlab/planning.py). experiment.py
trains; nothing here trains."""


import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptlab import blimp, stats
from gptlab.checkpoint import load_checkpoint, model_from_checkpoint
from gptlab.fileio import atomic_write_text
from gptlab.metrics import pyplot, read_metrics, save_figure
from gptlab.planning import BUDGETS, CHECKPOINT_NAME, METRICS_NAME, Plan, Variant, show


@dataclass(frozen=True)
class RunResult:
    variant: str
    seed: int
    steps: int
    val_bpb: float
    val_loss: float
    tokens_per_s: float
    wall_s: float
    parameters: int
    curve: list[tuple[int, float | None, float]]  # evaluations: (step, seconds since the start or None, val_bpb)
    objective: str = "clm"  # what the run learned: bits/byte compare only runs of one objective


CSV_COLUMNS = ("variant", "seed", "steps", "val_bpb", "val_loss", "tokens_per_s", "wall_s", "parameters")


@dataclass(frozen=True)
class Run:
    variant: Variant
    seed: int
    folder: Path

    @property
    def label(self) -> str:
        return f"{self.variant.name}/seed{self.seed}"

    @property
    def checkpoint(self) -> Path:
        return self.folder / CHECKPOINT_NAME

    @property
    def metrics(self) -> Path:
        return self.folder / METRICS_NAME

    @property
    def log(self) -> Path:
        return self.folder / "run.log"

    @property
    def result(self) -> Path:
        return self.folder / "result.json"


def plan_runs(plan: Plan, folder: Path) -> list[Run]:
    """The runs in the order they train: seed by seed, every variant of a seed one after another, so a machine
    whose speed drifts over minutes slows the runs of a pair alike (under a time budget, pairs that ran at
    different speeds would differ by the machine, not by the variant)."""
    return [Run(v, seed, folder / v.name / f"seed{seed}") for seed in plan.seeds for v in plan.variants]


def final_eval(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    evals = [r for r in rows if "val_loss" in r]
    return evals[-1] if evals else None


def read_result(run: Run) -> RunResult:
    """A finished run's numbers: its metrics file, its checkpoint (parameters) and the runner's result.json."""
    rows = read_metrics(run.metrics)
    final = final_eval(rows)
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    times = [r["time_s"] for r in rows if "time_s" in r]
    wall_s = times[-1] if times else read_json(run.result).get("wall_s", math.nan)
    ckpt = load_checkpoint(run.checkpoint)
    model, _ = model_from_checkpoint(ckpt)
    curve = [(r["step"], r.get("time_s"), r.get("val_bpb", math.nan)) for r in rows if "val_loss" in r]
    return RunResult(run.variant.name, run.seed, final["step"], final.get("val_bpb", math.nan), final["val_loss"],
                     stats.mean(speeds) if speeds else math.nan, wall_s, model.num_parameters(), curve,
                     ckpt["config"].get("objective", "clm"))


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def summarise(plan: Plan, results: list[RunResult]) -> list[dict[str, Any]]:
    """Per variant: the spread over its seeds, and its difference to the baseline paired by seed."""
    baseline = {r.seed: r.val_bpb for r in results if r.variant == plan.baseline}
    rows = []
    for v in plan.variants:
        mine = [r for r in results if r.variant == v.name]
        row: dict[str, Any] = {"variant": v.name, "n": len(mine)}
        if mine:
            bpb = [r.val_bpb for r in mine]
            row |= {"bpb_mean": stats.mean(bpb), "bpb_ci": stats.confidence_interval(bpb), "bpb_min": min(bpb),
                    "bpb_max": max(bpb), "loss_mean": stats.mean([r.val_loss for r in mine]),
                    "tokens_per_s": stats.mean([r.tokens_per_s for r in mine]),
                    "wall_s": stats.mean([r.wall_s for r in mine]), "parameters": mine[0].parameters}
        pairs = [(r.val_bpb, baseline[r.seed]) for r in mine if r.seed in baseline and
                 math.isfinite(r.val_bpb) and math.isfinite(baseline[r.seed])]
        theirs = {r.objective for r in results if r.variant == plan.baseline}
        if v.name != plan.baseline and mine and theirs and mine[0].objective not in theirs:
            row["diff_note"] = f"not comparable ({mine[0].objective} vs the baseline's {theirs.pop()})"
        elif v.name != plan.baseline and pairs:
            diff, low, high, p = stats.paired_t_test([a for a, _ in pairs], [b for _, b in pairs])
            row |= {"diff": diff, "diff_ci": (low, high), "p": p, "pairs": len(pairs)}
        rows.append(row)
    return rows


def _number(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def _interval(ci: tuple[float, float] | None) -> str:
    return "n/a" if ci is None or math.isnan(ci[0]) else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def report_markdown(plan: Plan, rows: list[dict[str, Any]], missing: list[str], has_png: bool,
                    diverged: Sequence[str] = (), benchmark: list[str] | None = None) -> str:
    (kind, amount), = plan.budget.items()
    lines = [f"# Experiment {plan.name}", "",
             f"Budget: {kind} {show(amount)} ({BUDGETS[kind]}). Seeds: {', '.join(map(str, plan.seeds))}. "
             f"Baseline: {plan.baseline}.", "",
             "| variant | n | val bits/byte | 95% CI | min | max | val loss | tokens/s | wall s | parameters "
             "| Δ bits/byte vs baseline | 95% CI of Δ | p |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["n"]:
            lines.append(f"| {r['variant']} | 0 | " + " | ".join(["n/a"] * 11) + " |")
            continue
        diff = ("baseline", "", "") if r["variant"] == plan.baseline else (
            (f"{r['diff']:+.4f} (n={r['pairs']})", _interval(r["diff_ci"]), _number(r["p"], 3)) if "diff" in r
            else (r.get("diff_note", "n/a"), "n/a", "n/a"))
        lines.append(f"| {r['variant']} | {r['n']} | {_number(r['bpb_mean'])} | {_interval(r['bpb_ci'])} | "
                     f"{_number(r['bpb_min'])} | {_number(r['bpb_max'])} | {_number(r['loss_mean'])} | "
                     f"{_number(r['tokens_per_s'], 0)} | {_number(r['wall_s'], 1)} | {r['parameters']:,} | "
                     f"{diff[0]} | {diff[1]} | {diff[2]} |")
    lines += ["", "Lower bits/byte is better. 95% CI: Student t interval of the mean over seeds (n/a with one "
              "seed). Δ = variant − baseline, paired by seed (only seeds both finished), with its 95% CI and the "
              "two-sided paired t-test's p. tokens/s and wall s: means over seeds. Parameters: non-embedding "
              "count, as playground.py prints it.", "", *(benchmark or []), "## Variants", ""]
    for v in plan.variants:
        changes = ", ".join(f"{k}={show(x) if not isinstance(x, list) else x}" for k, x in v.overrides.items())
        steps = f"; max_iters {v.max_iters}" if v.max_iters is not None else ""
        lines.append(f"- **{v.name}**: {changes or 'the base settings'}{steps}")
    if diverged:
        lines += ["", f"## Diverged ({len(diverged)})", "", "Stopped by their health checks, or ended with a "
                  "non-finite or blown-up loss (docs/health.md): no score, and left out of the numbers above. Each "
                  "run's run.log says why and which checkpoint is left.", "", *[f"- {d}" for d in diverged]]
    if missing:
        lines += ["", f"## Not finished ({len(missing)})", "", *[f"- {m}" for m in missing]]
    if has_png:
        lines += ["", "## Curves", "", "![val bits/byte vs step and vs wall time](curves.png)"]
    return "\n".join(lines) + "\n"


def write_csv(results: list[RunResult], path: Path) -> None:
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(CSV_COLUMNS)
    for r in results:
        writer.writerow([getattr(r, column) for column in CSV_COLUMNS])
    atomic_write_text(path, text.getvalue(), "results")


def mean_band(curves: list[tuple[list[float], list[float]]]) -> tuple[list[float], list[float], list[float],
                                                                       list[float]]:
    """Seeds' curves on common x values (those inside every curve's range, linearly interpolated): the x
    values, and the mean, minimum and maximum across seeds at each."""
    import numpy as np

    lo, hi = max(xs[0] for xs, _ in curves), min(xs[-1] for xs, _ in curves)
    grid = sorted({x for xs, _ in curves for x in xs if lo <= x <= hi})
    values = np.array([np.interp(grid, xs, ys) for xs, ys in curves])
    return grid, list(values.mean(0)), list(values.min(0)), list(values.max(0))


def draw_variant(ax: Any, curves: list[tuple[list[float], list[float]]], color: str, label: str) -> None:
    """One variant's seeds on `ax`: their mean with a min-max band where the seeds' x ranges overlap, else each
    seed's points (a run under a time budget evaluates once, at a step count its own speed chose)."""
    x, mid, low, high = mean_band(curves)
    if not x:
        ax.scatter([a for xs, _ in curves for a in xs], [b for _, ys in curves for b in ys], color=color,
                   label=label)
        return
    ax.plot(x, mid, color=color, marker="." if len(x) < 30 else None, label=label)
    if len(curves) > 1:
        ax.fill_between(x, low, high, color=color, alpha=0.2)


def plot_curves(plan: Plan, results: list[RunResult], path: Path) -> bool:
    """Val bits/byte against step and against wall seconds, per variant (draw_variant). Skipped (False) when
    matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    timed = False
    for i, v in enumerate(plan.variants):
        runs = [r.curve for r in results if r.variant == v.name and r.curve]
        for ax, column in zip(axes, (0, 1), strict=True):
            curves = [([p[column] for p in c], [p[2] for p in c]) for c in runs if all(p[column] is not None
                                                                                       for p in c)]
            if not curves:
                continue
            timed |= column == 1
            draw_variant(ax, curves, f"C{i % 10}", f"{v.name} (n={len(curves)})")
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("wall seconds since the run began")
    if not timed:
        axes[1].text(0.5, 0.5, "no time_s in the metrics", ha="center", va="center", transform=axes[1].transAxes)
    for ax in axes:
        ax.set_ylabel("val bits/byte")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle(f"{plan.name}: mean over seeds with a min-max band (one point per seed where seeds share no step)")
    fig.tight_layout()
    save_figure(plt, fig, path, "curves")
    return True


def unevaluated_note(run: Run) -> str:
    return (f"{run.label} (its final evaluation is missing from {run.metrics}, torn or deleted; the checkpoint "
            f"is kept: delete {run.folder} to train it again)")


def write_report(plan: Plan, folder: Path, states: list[tuple[Run, str]]) -> str:
    """report.md, results.csv and curves.png in `folder`, from its finished runs (states: each run and what
    the runner found of it: new, partial, finished, unevaluated, diverged or other plan); returns the markdown."""
    results, missing, diverged = [], [], []
    for run, state in states:
        result = read_result(run) if state == "finished" else None
        if result is not None and math.isfinite(result.val_loss):
            results.append(result)
        elif result is not None or state == "diverged":  # a run that ended non-finite is diverged, not a score
            diverged.append(run.label)
        else:
            missing.append(unevaluated_note(run) if state == "unevaluated" else run.label)
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(results, folder / "results.csv")
    has_png = plot_curves(plan, results, folder / "curves.png")
    if not has_png:
        print("matplotlib is not installed: no curves.png (pip install matplotlib)")
    benchmark = blimp_section(plan, blimp_scores(plan, [run for run, state in states if state == "finished"]))
    text = report_markdown(plan, summarise(plan, results), missing, has_png, diverged, benchmark)
    atomic_write_text(folder / "report.md", text, "report")
    return text


def blimp_scores(plan: Plan, runs: list[Run]) -> dict[tuple[str, int], float]:
    """(variant, seed) -> the run's BLiMP score (mean over paradigms), scored once per checkpoint and kept in
    the run's folder as blimp.json; nothing when the plan names no benchmark."""
    if "blimp" not in plan.benchmark:
        return {}
    return {(run.variant.name, run.seed): blimp.score_checkpoint(run.checkpoint, plan.benchmark["blimp"],
                                                                 run.folder / "blimp.json")["overall"]
            for run in runs}


def blimp_section(plan: Plan, scores: dict[tuple[str, int], float]) -> list[str]:
    """The report's BLiMP table: per variant the mean over seeds with its 95% interval, and the difference to
    the baseline paired by seed with its interval and p (as for bits/byte)."""
    if not scores:
        return []
    lines = [f"## BLiMP ({plan.benchmark['blimp']})", "",
             "| variant | n | BLiMP accuracy | 95% CI | Δ vs baseline | 95% CI of Δ | p |",
             "|---|---|---|---|---|---|---|"]
    base = {seed: x for (v, seed), x in scores.items() if v == plan.baseline}
    for v in plan.variants:
        mine = {seed: x for (name, seed), x in scores.items() if name == v.name}
        if not mine:
            continue
        diff = ["baseline", "", ""]
        pairs = [(x, base[seed]) for seed, x in mine.items() if seed in base]
        if v.name != plan.baseline and pairs:
            d, low, high, p = stats.paired_t_test([a for a, _ in pairs], [b for _, b in pairs])
            diff = [f"{d:+.4f} (n={len(pairs)})", _interval((low, high)), _number(p, 3)]
        lines.append(f"| {v.name} | {len(mine)} | {stats.mean(list(mine.values())):.4f} | "
                     f"{_interval(stats.confidence_interval(list(mine.values())))} | {' | '.join(diff)} |")
    return lines + ["", "Higher is better; chance is 0.5. A run's score is the mean over paradigms of the fraction of "
                    "pairs whose good sentence it finds more likely (a tie counts wrong; gptlab/blimp.py). "
                    "Intervals and p as above, over seeds.", ""]
