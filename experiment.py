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
    search:                         # instead of variants/grid: Optuna proposes trials (see gptlab/search.py)
      trials: 20
      space: {lr: {low: 1.0e-4, high: 3.0e-2, log: true}, num_of_layers: [2, 4]}
    benchmark: {blimp: DIR}         # optional: each finished run's BLiMP score (DIR: its paradigm .jsonl files)

Every run is `python playground.py ...` in a subprocess, so it trains exactly what that command would; its
output goes to the run folder's run.log. A rerun skips finished runs and resumes interrupted ones; it never
deletes a checkpoint, and refuses one trained with other settings than its variant now has, or to another
budget. A run that diverged (exit status 3) is reported as such and not trained again.
"""

import argparse
import json
import math
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

from config import TrainConfig, build_parser, check_dependent_flags, fixed_on_resume, parse_config
from gptlab import planning, report, search
from gptlab.checkpoint import load_checkpoint
from gptlab.cli import read_yaml
from gptlab.errors import DIVERGED_EXIT, CliParser, UsageError, run_cli
from gptlab.fileio import atomic_write_text
from gptlab.metrics import read_metrics
from gptlab.planning import Plan, Variant
from gptlab.report import Run

PLAYGROUND = Path(__file__).resolve().parent / "playground.py"
SPEC_KEYS = ("name", "out_dir", "base", "variants", "grid", "baseline", "seeds", "budget", "benchmark", "search")
# Settings the runner decides for every run (per run, or from the budget), never the spec.
RUNNER_SETTINGS = ("seed", "out_dir", "checkpoint", "resume", "max_iters", "time_budget")


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
    name = planning.folder_name(spec.get("name", stem), "name")
    out_dir = spec.get("out_dir", "runs/experiments")
    if not isinstance(out_dir, str) or not out_dir:
        raise UsageError(f"out_dir must be a folder path, got {out_dir!r}")
    base = planning.mapping(spec.get("base"), "base")
    _check_keys(base, "base", options)
    budget = planning.parse_budget(spec.get("budget"))
    planning.check_size(spec, budget)  # before a grid's combinations or the seeds are listed
    overrides = planning.variant_overrides(spec)
    for variant_name, changes in overrides.items():
        _check_keys(changes, f"variant '{variant_name}'", options)
    baseline = spec.get("baseline", next(iter(overrides)))
    if baseline not in overrides:
        raise UsageError(f"baseline '{baseline}' is not one of the variants: {', '.join(overrides)}")
    seeds = planning.parse_seeds(spec.get("seeds"))
    benchmark = planning.parse_benchmark(spec.get("benchmark"))
    variants = [make_variant(v, changes, base, budget, options) for v, changes in overrides.items()]
    return Plan(name, str(Path(out_dir) / name), baseline, seeds, budget, variants, benchmark)


def make_variant(name: str, overrides: dict[str, Any], base: dict[str, Any], budget: dict[str, float],
                 options: dict[str, bool]) -> Variant:
    """Merge and check a variant's settings; playground's own parser and config checks see its command line."""
    settings = {**base, **overrides}
    _check_files(settings)
    argv = playground_args(settings, options)
    if "time_budget" in budget:
        argv += ["--time_budget", planning.show(budget["time_budget"])]
    try:
        c, given = parse_config(argv)
        check_dependent_flags(c, given)
        if c.time_budget is not None and "time_budget" not in budget:  # set by its --config file
            raise UsageError(f"its config sets time_budget {c.time_budget:g}, which would stop each run "
                             f"on time instead of at the budget's {next(iter(budget))}: use a config without "
                             f"time_budget")
        planning.check_data(list(c.corpus), c.val_fraction, c.model.block_size, c.tokenizer)
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
            args += [f"--{key}", planning.show(value)]
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
    for key in ("config", "tokenizer"):
        if key in settings and not Path(str(settings[key])).is_file():
            raise UsageError(f"{key} file not found: {settings[key]}")


def save_plan(plan: Plan, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / planning.PLAN_NAME, asdict(plan))


def load_plan(folder: Path) -> Plan:
    path = folder / planning.PLAN_NAME
    if not path.is_file():
        raise UsageError(f"{folder} holds no {planning.PLAN_NAME} (the runner writes it when it starts): give the spec "
                         f"file too, or check the folder")
    try:
        return planning.plan_from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, UsageError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UsageError(f"{path} is damaged ({str(e).splitlines()[0]}): run the spec file again to rewrite it "
                         f"(finished runs are kept)") from None


# ----------------------------------------------------------------------------- runs

def run_command(run: Run, plan: Plan, options: dict[str, bool], resume: bool) -> list[str]:
    args = playground_args(run.variant.settings, options)
    args += ["--seed", str(run.seed), "--out_dir", str(run.folder), "--checkpoint", str(run.checkpoint)]
    if "sample_tokens" not in run.variant.settings:
        args += ["--sample_tokens", "0"]
    if run.variant.max_iters is not None:
        args += ["--max_iters", str(run.variant.max_iters)]
    if "time_budget" in plan.budget:  # on resume, the budget the checkpoint holds or was planned from
        args += ["--time_budget", planning.show(plan.budget["time_budget"])]
    if resume:  # playground refuses to overwrite a checkpoint: an existing one is always continued
        args.append("--resume")
    return [sys.executable, str(PLAYGROUND), *args]


# Settings that locate a run or change only what it prints, not what it learns: a run trained with other
# values of these still counts as this variant's (the budget's max_iters and time_budget are checked apart).
NOT_COMPARED = ("resume", "overwrite", "max_iters", "time_budget", "out_dir", "checkpoint", "device",
                "sample_tokens", "log_interval", "wandb_project", "wandb_run_name")


def run_state(run: Run, plan: Plan, options: dict[str, bool]) -> str:
    """'new' (nothing saved), 'partial' (a checkpoint to resume), 'finished', 'unevaluated' (trained to its
    budget, but its metrics file lost the final evaluation: kept, never retrained, left out of the report),
    'diverged' (stopped by its health checks, exit status 3, with the command it would get now: not retrained),
    or 'other plan' (a checkpoint trained to another budget: its learning-rate schedule spans that one).
    A checkpoint trained with other settings than its variant's now is refused, naming them."""
    if diverged(run, plan, options):
        return "diverged"
    if not run.checkpoint.exists():
        return "new"
    ckpt = load_checkpoint(run.checkpoint)
    check_settings(run, plan, options, ckpt.get("config") or {})
    if trained_plan(ckpt, run, plan) is not None:
        return "other plan"
    iteration = ckpt["iteration"]
    final = report.final_eval(read_metrics(run.metrics))
    evaluated = final is not None and final["step"] == iteration
    max_iters = run.variant.max_iters
    if max_iters is None:  # time budget: playground decides when to stop; a clean exit says it has
        done = report.read_json(run.result).get("returncode") == 0
        return ("finished" if evaluated else "unevaluated") if done else "partial"
    if iteration < max_iters:
        return "partial"
    return "finished" if evaluated else "unevaluated"


def diverged(run: Run, plan: Plan, options: dict[str, bool]) -> bool:
    """Whether the run's latest training stopped as diverged, given the command it would be given now (after an
    edit of its settings or budget it trains again)."""
    result = report.read_json(run.result)
    if result.get("returncode") != DIVERGED_EXIT:
        return False
    given = [arg for arg in result.get("command", [])[2:] if arg not in ("--resume", "--overwrite")]
    return given == run_command(run, plan, options, resume=False)[2:]


def trained_plan(ckpt: dict[str, Any], run: Run, plan: Plan) -> str | None:
    """The budget a checkpoint was trained to when it is not this plan's (None when it is): a run resumes only
    into its own plan, since its learning-rate schedule was laid out for that one."""
    planned, steps = ckpt.get("planned_budget"), (ckpt.get("config") or {}).get("max_iters")
    if run.variant.max_iters is None:
        same = planned == plan.budget["time_budget"]
    else:
        same = planned is None and steps == run.variant.max_iters
    return None if same else f"time_budget {planning.show(planned)}" if planned is not None else f"max_iters {steps}"


def check_settings(run: Run, plan: Plan, options: dict[str, bool], saved: dict[str, Any]) -> None:
    """The settings a checkpoint was trained with are those its variant has now (an edited spec would report,
    or resume, old runs under new settings)."""
    now = parse_config(run_command(run, plan, options, resume=False)[2:])[0].to_dict()
    saved = TrainConfig.from_dict({**now, **saved}).to_dict()  # older checkpoints lack newer settings
    ignored = set(NOT_COMPARED) | (set(fixed_on_resume()) if now["init_from"] else set())  # from the folder
    changed = [k for k in now if k not in ignored and saved[k] != now[k]]
    if changed:
        was = ", ".join(f"{k}={planning.show(saved[k])}" for k in changed)
        raise UsageError(f"{run.label} was trained with {was}, "
                         f"but variant '{run.variant.name}' now has "
                         f"{', '.join(f'{k}={planning.show(now[k])}' for k in changed)}: delete {run.folder} to train "
                         f"it again, or give the experiment another name")


class Children:
    """The playground processes running now. Each runs in a session of its own, so a Ctrl-C typed in the
    terminal reaches the runner alone, which passes it on once (a second one would stop a run unsaved)."""

    def __init__(self) -> None:
        # Reentrant: a second signal may arrive while the handler of the first holds it.
        self.lock, self.running, self.stopped_by = threading.RLock(), set(), 0

    def start(self, command: list[str], log: Any) -> subprocess.Popen | None:
        with self.lock:  # a signal passed on now reaches every child started before it; none start after
            if self.stopped_by:
                return None
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
            self.running.add(child)
            return child

    def stop(self, signum: int, frame: Any) -> None:
        """A signal handler: each run saves at the end of its step and exits; no queued run starts."""
        if not self.stopped_by:
            print(f"\n{signal.Signals(signum).name}: stopping the running runs at the end of their step",
                  file=sys.stderr)
        self.stopped_by = signum
        with self.lock:
            for child in self.running:
                child.send_signal(signum)


def train_run(run: Run, state: str, plan: Plan, options: dict[str, bool], children: Children,
              watch: Callable[[subprocess.Popen, Children], int] | None = None) -> int | None:
    """One playground.py subprocess, its output appended to run.log; returns its exit status (None when the
    runner was stopped before it started). `watch`, when given, waits for the child in place of child.wait()
    (a search reads the metrics as they grow, and may stop the run early)."""
    if children.stopped_by:
        return None
    run.folder.mkdir(parents=True, exist_ok=True)
    resume = state == "partial"
    earlier_wall = report.read_json(run.result).get("wall_s", 0.0) if resume else 0.0
    command = run_command(run, plan, options, resume)
    if state == "new":  # no checkpoint: what a run killed before its first save left is replaced
        command.append("--overwrite")
    start = time.perf_counter()
    with open(run.log, "a", encoding="utf-8") as log:  # a log, appended to as the run goes: never atomic
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        child = children.start(command, log)
        if child is None:
            return None
        returncode = child.wait() if watch is None else watch(child, children)
    with children.lock:
        children.running.discard(child)
    _write_json(run.result, {"returncode": returncode, "wall_s": earlier_wall + time.perf_counter() - start,
                             "command": command})
    return returncode


def train_runs(todo: list[tuple[Run, str]], total: int, plan: Plan, options: dict[str, bool],
               jobs: int) -> list[Run]:
    """Train the runs, `jobs` at a time; a failure is reported and the others go on. Returns the failed runs.
    SIGTERM or Ctrl-C stops the running ones cleanly (saved, resumable) and exits 128 + the signal."""
    failed, children = [], Children()
    with stop_on_signals(children, plan.name), ThreadPoolExecutor(max_workers=jobs) as pool, tqdm(
            total=total, initial=total - len(todo), desc=f"{plan.name}: runs", unit="run", dynamic_ncols=True) as bar:
        futures = {pool.submit(train_run, run, state, plan, options, children): run for run, state in todo}
        for future in as_completed(futures):
            run, returncode = futures[future], future.result()
            bar.update(returncode is not None)
            if returncode == DIVERGED_EXIT:  # a result, not a failure: the report lists it as diverged
                bar.write(f"run {run.label} diverged; the end of {run.log}:\n{_tail(run.log, 3)}")
            elif returncode not in (0, None) and not children.stopped_by:
                failed.append(run)
                bar.write(f"run {run.label} failed (exit status {returncode}); the end of {run.log}:\n"
                          f"{_tail(run.log)}", file=sys.stderr)
    return failed


def train_watched(run: Run, state: str, plan: Plan, options: dict[str, bool],
                  watch: Callable[[subprocess.Popen, Children], int]) -> int | None:
    """One run, `watch` waiting on it (a search trial, which the search may prune); signals as for train_runs."""
    children = Children()
    with stop_on_signals(children, plan.name):
        return train_run(run, state, plan, options, children, watch)


@contextmanager
def stop_on_signals(children: Children, name: str) -> Iterator[None]:
    """SIGTERM or Ctrl-C stops the running runs cleanly (saved, resumable); then the runner exits 128 + the
    signal."""
    previous = {sig: signal.signal(sig, children.stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if children.stopped_by:
        print(f"stopped: the interrupted runs saved their last step; run {name}'s spec again to resume them",
              file=sys.stderr)
        raise SystemExit(128 + children.stopped_by)


# ----------------------------------------------------------------------------- results

def check_plan(states: list[tuple[Run, str]], plan: Plan) -> None:
    """Refuse, naming them, the runs trained to another budget: resumed to this one, they would be reported as
    runs of a plan they did not follow."""
    stale = [run for run, state in states if state == "other plan"]
    if stale:
        (kind, amount), = plan.budget.items()
        named = ", ".join(f"{run.label} ({trained_plan(load_checkpoint(run.checkpoint), run, plan)})"
                          for run in stale[:5]) + (f" and {len(stale) - 5} more" if len(stale) > 5 else "")
        raise UsageError(f"{len(stale)} run(s) were trained to another budget than this spec's {kind} "
                         f"{planning.show(amount)}: {named}. A run resumes only into the plan it started with (its "
                         f"learning-rate schedule spans it): delete their folders to train them again, or give the "
                         f"experiment another name")


def write_report(plan: Plan, folder: Path, options: dict[str, bool]) -> str:
    """report.md, results.csv and curves.png in `folder`, from its finished runs; returns the markdown."""
    return report.write_report(plan, folder, [(run, run_state(run, plan, options)) for run in report.plan_runs(
        plan, folder)])


# ----------------------------------------------------------------------------- helpers and CLI

def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n", path.name)


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
    spec = read_spec(args.spec) if args.spec else None
    if search.is_search(spec, args.report):  # trials proposed by Optuna, then an ordinary plan confirms the best
        search.main(spec, Path(args.spec).stem if args.spec else None, args.report, search_runner(options, args.jobs))
        return
    plan = make_plan(spec, Path(args.spec).stem, options) if spec else None
    if args.report is not None:
        folder = Path(args.report)
        print(write_report(plan or load_plan(folder), folder, options), end="")
        print(f"report: {folder / 'report.md'}")
        return
    failed = run_plan(plan, options, args.jobs)
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(r.label for r in failed)} (see their run.log)",
              file=sys.stderr)
        sys.exit(1)


def run_plan(plan: Plan, options: dict[str, bool], jobs: int) -> list[Run]:
    """Train a plan's runs not finished yet, then write its report; returns the failed runs."""
    folder = Path(plan.folder)
    runs = report.plan_runs(plan, folder)
    # Before any training: may refuse (runs of another budget, or trained with other settings).
    states = [(run, run_state(run, plan, options)) for run in runs]
    check_plan(states, plan)
    todo = [(run, state) for run, state in states if state in ("new", "partial")]
    save_plan(plan, folder)
    count = {state: sum(s == state for _, s in states) for state in ("partial", "new", "diverged")}
    diverged_runs = f" ({count['diverged']} diverged)" if count["diverged"] else ""
    print(f"{plan.name}: {len(plan.variants)} variant(s) x {len(plan.seeds)} seed(s); {len(runs) - len(todo)} "
          f"finished{diverged_runs}, {count['partial']} to resume, {count['new']} to start; logs in "
          f"{folder}/<variant>/seed<S>/run.log")
    for run, state in states:
        if state == "unevaluated":
            print(f"note: {report.unevaluated_note(run)}")
    if jobs > 1 and "time_budget" in plan.budget:
        print("note: under a time budget, runs side by side share the machine and each gets fewer steps")
    failed = train_runs(todo, len(runs), plan, options, jobs)
    print(write_report(plan, folder, options), end="")
    print(f"report: {folder / 'report.md'}")
    return failed


def search_runner(options: dict[str, bool], jobs: int) -> search.Runner:
    """What gptlab/search.py borrows from this script (the library never imports a script)."""
    return search.Runner(make_plan=partial(make_plan, options=options),
                         make_variant=partial(make_variant, options=options),
                         check_keys=partial(_check_keys, options=options),
                         run_state=partial(run_state, options=options),
                         train=partial(train_watched, options=options),
                         run_plan=partial(run_plan, options=options, jobs=jobs),
                         write_report=partial(write_report, options=options))


if __name__ == "__main__":
    run_cli(main)
