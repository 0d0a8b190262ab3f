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

from tqdm import tqdm

from config import build_parser, parse_config
from gptlab import stats
from gptlab.checkpoint import load_checkpoint, model_from_checkpoint
from gptlab.cli import read_yaml
from gptlab.errors import CliParser, UsageError, run_cli
from gptlab.metrics import read_metrics
from gptlab.report import (
    BUDGETS,
    Plan,
    RunResult,
    Variant,
    plot_curves,
    report_markdown,
    show,
    summarise,
    write_csv,
)

PLAYGROUND = Path(__file__).resolve().parent / "playground.py"
SPEC_KEYS = ("name", "out_dir", "base", "variants", "grid", "baseline", "seeds", "budget")
BASE_SEED = 1337
# Settings the runner decides for every run (per run, or from the budget), never the spec.
RUNNER_SETTINGS = ("seed", "out_dir", "checkpoint", "resume", "max_iters", "time_budget")
CHECKPOINT_NAME = "ckpt.tar"
METRICS_NAME = "ckpt.metrics.jsonl"  # playground writes <out_dir>/<checkpoint stem>.metrics.jsonl
PLAN_NAME = "experiment.json"  # the resolved spec, saved so that --report DIR needs nothing else


# ----------------------------------------------------------------------------- the plan

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
    spec = read_yaml(path, "experiment spec")
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
    return {",".join(f"{k}={show(v)}".replace("/", "_") for k, v in combo.items()): combo for combo in combos}


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
        argv += ["--time_budget", show(budget["time_budget"])]
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
            args += [f"--{key}", show(value)]
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
        args += ["--time_budget", show(plan.budget["time_budget"])]
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
