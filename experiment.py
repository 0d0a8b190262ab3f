"""Run an experiment: variants of one training setup, each trained with several seeds under one budget, and a
report that says which differences stand out from the seed-to-seed noise.

    python experiment.py experiments/NAME.yaml [--jobs N]     # train the runs not finished yet, then report
    python experiment.py experiments/NAME.yaml --report DIR   # rebuild the report in DIR from finished runs
    python experiment.py --report DIR                         # the same, with the plan saved in DIR

The spec (YAML; unknown keys are errors; paths are relative to the current folder, as for playground.py):

    name: ablation                  # default: the spec file's stem
    out_dir: runs/experiments       # run folders: <out_dir>/<name>/<variant>/seed<S>/
    base:                           # settings every run shares
      config: configs/cpu_quickstart.yaml   # a playground config file (passed as --config)
      corpus: data/shakespeare.txt          # a path or a list of paths
      tokenizer: tokenizer.json             # optional; without it each run trains its own
      embedding_dim: 64                     # any playground.py option, named as its flag
    variants:                       # name -> the settings it changes; the first is the baseline ...
      gpt2: {}
      wsd: {lr_schedule: wsd}
    grid:                           # ... or, instead of variants, every combination ("lr=0.001,dropout=0.1")
      lr: [1.0e-3, 2.0e-3]
    baseline: gpt2                  # optional: the variant the others are compared with
    seeds: 3                        # seeds 1337, 1338, 1339; or a list of seeds: [1, 2, 3]
    budget: {max_iters: 1000}       # equal steps; or {tokens: N}: equal tokens; or {time_budget: SECONDS}

Every run is `python playground.py ...` in a subprocess, so it trains exactly what that command would; its
output goes to the run folder's run.log. A rerun skips finished runs and resumes interrupted ones.
"""

import argparse
import csv
import itertools
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from config import build_parser, parse_config
from gptlab import stats
from gptlab.checkpoint import load_checkpoint, model_from_checkpoint
from gptlab.errors import CliParser, UsageError, run_cli

PLAYGROUND = Path(__file__).resolve().parent / "playground.py"
SPEC_KEYS = ("name", "out_dir", "base", "variants", "grid", "baseline", "seeds", "budget")
BUDGETS = {"max_iters": "equal steps", "tokens": "equal tokens", "time_budget": "equal wall time (seconds)"}
BASE_SEED = 1337
# Settings the runner decides for every run (per run, or from the budget), never the spec.
RUNNER_SETTINGS = ("seed", "out_dir", "checkpoint", "resume", "max_iters", "time_budget")
CHECKPOINT_NAME = "ckpt.tar"
METRICS_NAME = "ckpt.metrics.jsonl"  # playground writes <out_dir>/<checkpoint stem>.metrics.jsonl
PLAN_NAME = "experiment.json"  # the resolved spec, saved so that --report DIR needs nothing else


# ----------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, Any]  # what it changes relative to the base (shown in the report)
    settings: dict[str, Any]  # base updated with the overrides: playground options, plus corpus
    max_iters: int | None  # from the budget; None under a time budget, where playground stops on time


@dataclass(frozen=True)
class Plan:
    name: str
    folder: str  # <out_dir>/<name>
    baseline: str
    seeds: list[int]
    budget: dict[str, float]  # exactly one of BUDGETS -> its amount
    variants: list[Variant]


def playground_options() -> dict[str, bool]:
    """Every option playground.py accepts, read from its own parser (so a new flag works here at once),
    mapped to whether it is an on/off switch (--flag / --no-flag)."""
    options = {}
    for action in build_parser()._actions:  # argparse lists its options only in this private attribute
        long = [s for s in action.option_strings if s.startswith("--")]
        if long and not isinstance(action, argparse._HelpAction):
            options[long[0].removeprefix("--")] = isinstance(action, argparse.BooleanOptionalAction)
    return options


def read_spec(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            spec = yaml.safe_load(f)
    except OSError as e:
        raise UsageError(f"cannot read experiment spec {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"experiment spec {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(spec, dict):
        raise UsageError(f"experiment spec {path} must hold a mapping (name:, base:, variants:, seeds:, budget:)")
    return spec


def make_plan(spec: dict[str, Any], stem: str, options: dict[str, bool]) -> Plan:
    """Check the whole spec, every variant's settings included, before anything runs."""
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise UsageError(f"unknown experiment spec key(s): {', '.join(unknown)} (known: {', '.join(SPEC_KEYS)})")
    name = _folder_name(spec.get("name", stem), "name")
    out_dir = spec.get("out_dir", "runs/experiments")
    if not isinstance(out_dir, str) or not out_dir:
        raise UsageError(f"out_dir must be a folder path, got {out_dir!r}")
    base = _mapping(spec.get("base"), "base")
    _check_keys(base, "base", options)
    overrides = variant_overrides(spec)
    for variant_name, changes in overrides.items():
        _check_keys(changes, f"variant '{variant_name}'", options)
    baseline = spec.get("baseline", next(iter(overrides)))
    if baseline not in overrides:
        raise UsageError(f"baseline '{baseline}' is not one of the variants: {', '.join(overrides)}")
    seeds = parse_seeds(spec.get("seeds"))
    budget = parse_budget(spec.get("budget"))
    if "time_budget" in budget and "time_budget" not in options:
        raise UsageError("budget time_budget needs playground.py's --time_budget flag, which this playground.py "
                         "does not have yet")
    variants = [make_variant(v, changes, base, budget, options) for v, changes in overrides.items()]
    return Plan(name, str(Path(out_dir) / name), baseline, seeds, budget, variants)


def variant_overrides(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Variant name -> its overrides, from `variants:` as written or from every combination of `grid:`."""
    if ("variants" in spec) == ("grid" in spec):
        raise UsageError("give exactly one of variants: (name -> overrides) or grid: (setting -> list of values)")
    if "variants" in spec:
        variants = _mapping(spec["variants"], "variants")
        if not variants:
            raise UsageError("variants: is empty")
        return {_folder_name(name, "variant name"): _mapping(changes, f"variant '{name}'")
                for name, changes in variants.items()}
    grid = _mapping(spec["grid"], "grid")
    if not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise UsageError("grid: must map each setting to a non-empty list of values, e.g. lr: [1.0e-3, 2.0e-3]")
    combos = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    return {",".join(f"{k}={_show(v)}".replace("/", "_") for k, v in combo.items()): combo for combo in combos}


def parse_seeds(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise UsageError(f"seeds must be a positive number of seeds or a list of seeds, got {value}")
        return [BASE_SEED + i for i in range(value)]
    if (isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) for s in value)
            and min(value) >= 0):
        if len(set(value)) != len(value):
            raise UsageError(f"seeds lists a seed twice: {value}")
        return list(value)
    raise UsageError(f"seeds must be a positive number of seeds (e.g. seeds: 3) or a list of seeds >= 0, "
                     f"got {value!r}")


def parse_budget(value: Any) -> dict[str, float]:
    choices = "; ".join(f"{{{k}: N}} ({why})" for k, why in BUDGETS.items())
    if not isinstance(value, dict) or len(value) != 1:
        raise UsageError(f"budget must be exactly one of {choices}; got {value!r}")
    (kind, amount), = value.items()
    if kind not in BUDGETS:
        raise UsageError(f"unknown budget '{kind}': use one of {choices}")
    whole = kind != "time_budget"
    if isinstance(amount, bool) or not isinstance(amount, int if whole else int | float) or amount <= 0:
        raise UsageError(f"budget {kind} must be a positive {'integer' if whole else 'number'}, got {amount!r}")
    return {kind: amount}


def make_variant(name: str, overrides: dict[str, Any], base: dict[str, Any], budget: dict[str, float],
                 options: dict[str, bool]) -> Variant:
    """Merge and check a variant's settings; playground's own parser and config checks see its command line."""
    settings = {**base, **overrides}
    _check_files(settings)
    argv = playground_args(settings, options)
    if "time_budget" in budget:
        argv += ["--time_budget", _show(budget["time_budget"])]
    try:
        c, _ = parse_config(argv)
    except UsageError as e:
        raise UsageError(f"variant '{name}': {e}") from None
    if "max_iters" in budget:
        max_iters = int(budget["max_iters"])
    elif "tokens" in budget:  # equal tokens: each variant takes the steps its batch needs
        max_iters = math.ceil(budget["tokens"] / (c.batch_size * c.model.block_size * c.grad_accum_steps))
    else:
        max_iters = None
    return Variant(name, overrides, settings, max_iters)


def playground_args(settings: dict[str, Any], options: dict[str, bool]) -> list[str]:
    """The settings as playground.py's command line: corpus paths first, then --key value or --flag/--no-flag."""
    corpus = settings.get("corpus")
    args = [corpus] if isinstance(corpus, str) else list(corpus or [])
    for key, value in settings.items():
        if key == "corpus":
            continue
        if options[key]:
            if not isinstance(value, bool):
                raise UsageError(f"{key} is an on/off switch: give true or false, got {value!r}")
            args.append(f"--{key}" if value else f"--no-{key}")
        elif isinstance(value, bool) or not isinstance(value, int | float | str):
            raise UsageError(f"{key} needs a single number or word, got {value!r}")
        else:
            args += [f"--{key}", _show(value)]
    return args


def _check_keys(settings: dict[str, Any], where: str, options: dict[str, bool]) -> None:
    for key in settings:
        if key in RUNNER_SETTINGS:
            raise UsageError(f"{where}: '{key}' is set by the runner (seed, out_dir, checkpoint and resume per "
                             f"run; max_iters and time_budget through budget:)")
        if key != "corpus" and key not in options:
            raise UsageError(f"{where}: '{key}' is not a playground.py option (see python playground.py --help)")
    corpus = settings.get("corpus")
    if corpus is not None and not (isinstance(corpus, str) or
                                   isinstance(corpus, list) and corpus and all(isinstance(p, str) for p in corpus)):
        raise UsageError(f"{where}: corpus must be a path or a list of paths, got {corpus!r}")


def _check_files(settings: dict[str, Any]) -> None:
    corpus = settings.get("corpus") or []
    for path in [corpus] if isinstance(corpus, str) else corpus:
        if not Path(path).exists():
            raise UsageError(f"corpus not found: {path}")
    for key in ("config", "tokenizer"):
        if key in settings and not Path(str(settings[key])).is_file():
            raise UsageError(f"{key} file not found: {settings[key]}")


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError(f"{where} must be a mapping of key: value, got {value!r}")
    return value


def _folder_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or "/" in value or value.startswith("."):
        raise UsageError(f"{what} must be a non-empty name without '/' (it names a folder), got {value!r}")
    return value


def _show(value: Any) -> str:
    """A setting's value as typed on a command line or in a variant name."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def save_plan(plan: Plan, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / PLAN_NAME, asdict(plan))


def load_plan(folder: Path) -> Plan:
    path = folder / PLAN_NAME
    if not path.is_file():
        raise UsageError(f"{folder} holds no {PLAN_NAME} (the runner writes it when it starts): give the spec "
                         f"file too, or check the folder")
    d = json.loads(path.read_text())
    return Plan(**{**d, "variants": [Variant(**v) for v in d["variants"]]})


# ----------------------------------------------------------------------------- runs

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
    return [Run(v, seed, folder / v.name / f"seed{seed}") for v in plan.variants for seed in plan.seeds]


def run_command(run: Run, plan: Plan, options: dict[str, bool], resume: bool) -> list[str]:
    args = playground_args(run.variant.settings, options)
    args += ["--seed", str(run.seed), "--out_dir", str(run.folder), "--checkpoint", str(run.checkpoint)]
    if "sample_tokens" not in run.variant.settings:
        args += ["--sample_tokens", "0"]
    if run.variant.max_iters is not None:
        args += ["--max_iters", str(run.variant.max_iters)]
    if "time_budget" in plan.budget:
        args += ["--time_budget", _show(plan.budget["time_budget"])]
    if resume:  # playground refuses to overwrite a checkpoint: an existing one is always continued
        args.append("--resume")
    return [sys.executable, str(PLAYGROUND), *args]


def run_state(run: Run) -> str:
    """'new' (nothing saved), 'partial' (a checkpoint to resume), 'finished', or 'stale' (a checkpoint at the
    last step but no final evaluation in the metrics, which resuming cannot add: train it again)."""
    if not run.checkpoint.exists():
        return "new"
    iteration = load_checkpoint(run.checkpoint)["iteration"]
    final = final_eval(read_metrics(run.metrics))
    evaluated = final is not None and final["step"] == iteration
    max_iters = run.variant.max_iters
    if max_iters is None:  # time budget: playground decides when to stop; a clean exit says it has
        done = _read_json(run.result).get("returncode") == 0
        return "finished" if evaluated and done else "partial"
    if iteration > max_iters:
        raise UsageError(f"{run.checkpoint} has trained {iteration} steps, past this budget's {max_iters}: "
                         f"delete {run.folder} or change the budget")
    if iteration < max_iters:
        return "partial"
    return "finished" if evaluated else "stale"


def train_run(run: Run, state: str, plan: Plan, options: dict[str, bool]) -> int:
    """One playground.py subprocess, its output appended to run.log; returns its exit status."""
    run.folder.mkdir(parents=True, exist_ok=True)
    if state == "stale":
        run.checkpoint.unlink()
        run.metrics.unlink(missing_ok=True)
    resume = state == "partial"
    earlier_wall = _read_json(run.result).get("wall_s", 0.0) if resume else 0.0
    command = run_command(run, plan, options, resume)
    start = time.perf_counter()
    with open(run.log, "a", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    _write_json(run.result, {"returncode": returncode, "wall_s": earlier_wall + time.perf_counter() - start,
                             "command": command})
    return returncode


def train_runs(todo: list[tuple[Run, str]], total: int, plan: Plan, options: dict[str, bool],
               jobs: int) -> list[Run]:
    """Train the runs, `jobs` at a time; a failure is reported and the others go on. Returns the failed runs."""
    failed = []
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        with tqdm(total=total, initial=total - len(todo), desc=f"{plan.name}: runs", unit="run",
                  dynamic_ncols=True) as bar:
            futures = {pool.submit(train_run, run, state, plan, options): run for run, state in todo}
            for future in as_completed(futures):
                run, returncode = futures[future], future.result()
                bar.update(1)
                if returncode != 0:
                    failed.append(run)
                    bar.write(f"run {run.label} failed (exit status {returncode}); the end of {run.log}:\n"
                              f"{_tail(run.log)}", file=sys.stderr)
    finally:  # on Ctrl-C the running subprocesses got it too; start no queued ones
        pool.shutdown(wait=True, cancel_futures=True)
    return failed


# ----------------------------------------------------------------------------- results

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


CSV_COLUMNS = ("variant", "seed", "steps", "val_bpb", "val_loss", "tokens_per_s", "wall_s", "parameters")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The metrics lines in step order, keeping the last one written for each step and kind: a resumed run
    writes again the steps after its last checkpoint. A line torn by a kill is skipped."""
    if not path.exists():
        return []
    rows: dict[tuple[int, bool], dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows[(row["step"], "val_loss" in row)] = row
    return [rows[key] for key in sorted(rows)]


def final_eval(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    evals = [r for r in rows if "val_loss" in r]
    return evals[-1] if evals else None


def read_result(run: Run) -> RunResult:
    """A finished run's numbers: its metrics file, its checkpoint (parameters) and the runner's result.json."""
    rows = read_metrics(run.metrics)
    final = final_eval(rows)
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    times = [r["time_s"] for r in rows if "time_s" in r]
    wall_s = times[-1] if times else _read_json(run.result).get("wall_s", math.nan)
    model, _ = model_from_checkpoint(load_checkpoint(run.checkpoint))
    curve = [(r["step"], r.get("time_s"), r.get("val_bpb", math.nan)) for r in rows if "val_loss" in r]
    return RunResult(run.variant.name, run.seed, final["step"], final.get("val_bpb", math.nan), final["val_loss"],
                     stats.mean(speeds) if speeds else math.nan, wall_s, model.num_parameters(), curve)


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
        pairs = [(r.val_bpb, baseline[r.seed]) for r in mine if r.seed in baseline]
        if v.name != plan.baseline and pairs:
            diff, low, high, p = stats.paired_t_test([a for a, _ in pairs], [b for _, b in pairs])
            row |= {"diff": diff, "diff_ci": (low, high), "p": p, "pairs": len(pairs)}
        rows.append(row)
    return rows


def _number(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def _interval(ci: tuple[float, float] | None) -> str:
    return "n/a" if ci is None or math.isnan(ci[0]) else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def report_markdown(plan: Plan, rows: list[dict[str, Any]], missing: list[str], has_png: bool) -> str:
    (kind, amount), = plan.budget.items()
    lines = [f"# Experiment {plan.name}", "",
             f"Budget: {kind} {_show(amount)} ({BUDGETS[kind]}). Seeds: {', '.join(map(str, plan.seeds))}. "
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
            else ("n/a", "n/a", "n/a"))
        lines.append(f"| {r['variant']} | {r['n']} | {_number(r['bpb_mean'])} | {_interval(r['bpb_ci'])} | "
                     f"{_number(r['bpb_min'])} | {_number(r['bpb_max'])} | {_number(r['loss_mean'])} | "
                     f"{_number(r['tokens_per_s'], 0)} | {_number(r['wall_s'], 1)} | {r['parameters']:,} | "
                     f"{diff[0]} | {diff[1]} | {diff[2]} |")
    lines += ["", "Lower bits/byte is better. 95% CI: Student t interval of the mean over seeds (n/a with one "
              "seed). Δ = variant − baseline, paired by seed (only seeds both finished), with its 95% CI and the "
              "two-sided paired t-test's p. tokens/s and wall s: means over seeds. Parameters: non-embedding "
              "count, as playground.py prints it.", "", "## Variants", ""]
    for v in plan.variants:
        changes = ", ".join(f"{k}={_show(x) if not isinstance(x, list) else x}" for k, x in v.overrides.items())
        steps = f"; max_iters {v.max_iters}" if v.max_iters is not None else ""
        lines.append(f"- **{v.name}**: {changes or 'the base settings'}{steps}")
    if missing:
        lines += ["", f"## Not finished ({len(missing)})", "", *[f"- {m}" for m in missing]]
    if has_png:
        lines += ["", "## Curves", "", "![val bits/byte vs step and vs wall time](curves.png)"]
    return "\n".join(lines) + "\n"


def write_csv(results: list[RunResult], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for r in results:
            writer.writerow([getattr(r, column) for column in CSV_COLUMNS])


def mean_band(curves: list[tuple[list[float], list[float]]]) -> tuple[list[float], list[float], list[float],
                                                                       list[float]]:
    """Seeds' curves on common x values (those inside every curve's range, linearly interpolated): the x
    values, and the mean, minimum and maximum across seeds at each."""
    import numpy as np

    lo, hi = max(xs[0] for xs, _ in curves), min(xs[-1] for xs, _ in curves)
    grid = sorted({x for xs, _ in curves for x in xs if lo <= x <= hi})
    values = np.array([np.interp(grid, xs, ys) for xs, ys in curves])
    return grid, list(values.mean(0)), list(values.min(0)), list(values.max(0))


def plot_curves(plan: Plan, results: list[RunResult], path: Path) -> bool:
    """Val bits/byte against step and against wall seconds: the mean over seeds and a min-max band per
    variant. Skipped (False) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
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
            x, mid, low, high = mean_band(curves)
            ax.plot(x, mid, color=f"C{i % 10}", marker="." if len(x) < 30 else None,
                    label=f"{v.name} (n={len(curves)})")
            if len(curves) > 1:
                ax.fill_between(x, low, high, color=f"C{i % 10}", alpha=0.2)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("wall seconds since the run began")
    if not timed:
        axes[1].text(0.5, 0.5, "no time_s in the metrics", ha="center", va="center", transform=axes[1].transAxes)
    for ax in axes:
        ax.set_ylabel("val bits/byte")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle(f"{plan.name}: mean over seeds, band from min to max")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(plan: Plan, folder: Path) -> str:
    """report.md, results.csv and curves.png in `folder`, from its finished runs; returns the markdown."""
    results, missing = [], []
    for run in plan_runs(plan, folder):
        if run_state(run) == "finished":
            results.append(read_result(run))
        else:
            missing.append(run.label)
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(results, folder / "results.csv")
    has_png = plot_curves(plan, results, folder / "curves.png")
    if not has_png:
        print("matplotlib is not installed: no curves.png (pip install matplotlib)")
    text = report_markdown(plan, summarise(plan, results), missing, has_png)
    (folder / "report.md").write_text(text, encoding="utf-8")
    return text


# ----------------------------------------------------------------------------- helpers and CLI

def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write beside the target, then rename: a kill never leaves half a file."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    return "\n".join("    " + line for line in text.replace("\r", "\n").splitlines()[-lines:])


def main(argv: list[str] | None = None) -> None:
    parser = CliParser(prog="experiment.py", description="Train variants x seeds of a playground.py setup under "
                       "one budget (see experiments/*.yaml) and report means, 95% CIs and paired differences.")
    parser.add_argument("spec", nargs="?", help="experiment spec YAML (its keys: see the top of experiment.py)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (default 1; keep 1 for "
                        "time budgets: runs side by side slow each other)")
    parser.add_argument("--report", metavar="DIR", help="rebuild report.md, results.csv and curves.png in DIR "
                        "(an experiment's folder) from its finished runs, without training")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {args.jobs}")
    if args.spec is None and args.report is None:
        raise UsageError("give an experiment spec (e.g. experiments/ablation.yaml), or --report DIR")
    options = playground_options()
    plan = make_plan(read_spec(args.spec), Path(args.spec).stem, options) if args.spec else None
    if args.report is not None:
        folder = Path(args.report)
        print(write_report(plan or load_plan(folder), folder), end="")
        print(f"report: {folder / 'report.md'}")
        return
    folder = Path(plan.folder)
    runs = plan_runs(plan, folder)
    states = [(run, run_state(run)) for run in runs]  # may refuse (a run past its budget) before any training
    todo = [(run, state) for run, state in states if state != "finished"]
    save_plan(plan, folder)
    print(f"{plan.name}: {len(plan.variants)} variant(s) x {len(plan.seeds)} seed(s); {len(runs) - len(todo)} "
          f"finished, {sum(s == 'partial' for _, s in todo)} to resume, "
          f"{sum(s != 'partial' for _, s in todo)} to start; logs in {folder}/<variant>/seed<S>/run.log")
    if args.jobs > 1 and "time_budget" in plan.budget:
        print("note: under a time budget, runs side by side share the machine and each gets fewer steps")
    failed = train_runs(todo, len(runs), plan, options, args.jobs)
    print(write_report(plan, folder), end="")
    print(f"report: {folder / 'report.md'}")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(r.label for r in failed)} (see their run.log)",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
