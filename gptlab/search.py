"""Automated search with honest confirmation: Optuna proposes settings (trials), each trained once as an ordinary
run at the spec's budget; an optional pruner stops trials clearly behind; then the best finished trials are
trained again with fresh seeds against the base, paired by seed, and only that confirmation is a result (a
trial's one-seed score ranks trials, and the best of many is lucky by selection).

experiment.py reads a spec with a `search:` section (in place of variants/grid) and calls main() here, lending
its spec checks and its runner through a Runner (the library never imports a script). The experiment's folder
holds the study (Optuna's journal file: rerunning continues it), search.json (the resolved search),
search.csv (one row per trial), trials/trial<N>/ (one run each), confirm/ (an ordinary experiment folder:
base and the top trials x seeds, its own report.md) and report.md (the search and its confirmation).
Optuna is imported only here, and only for a spec with `search:`.
"""

import csv
import io
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gptlab import planning, report
from gptlab.errors import UsageError
from gptlab.fileio import atomic_write_text
from gptlab.metrics import read_metrics
from gptlab.planning import Plan, Variant, show
from gptlab.report import Run

SEARCH_KEYS = ("trials", "space", "sampler", "prune", "confirm", "seed", "first")
# Optuna's samplers and pruners by the names a spec gives them; a spec may pass keyword arguments to each.
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "gp": "GPSampler", "cmaes": "CmaEsSampler",
            "qmc": "QMCSampler", "bruteforce": "BruteForceSampler"}
PRUNERS = {"median": "MedianPruner", "percentile": "PercentilePruner"}
# Intermediate values are keyed by the percent of the budget done (see Watcher): no pruning before 30% of it,
# where a higher learning rate is often still behind and later ahead.
PRUNE_DEFAULTS = {"n_warmup_steps": 30}
TENTHS = range(10, 100, 10)  # the percents of the budget at which a trial reports to the pruner
JOURNAL, SEARCH_PLAN, TRIALS_DIR, CONFIRM_DIR = "study.journal", "search.json", "trials", "confirm"
POLL_S = 0.5  # how often a trial's metrics file is read while it trains
CSV_TAIL = ("score", "steps", "seconds", "status")
STATUS = {"COMPLETE": "finished", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "interrupted"}


@dataclass(frozen=True)
class Runner:
    """What the search borrows from experiment.py, which knows playground.py's flags and runs it."""
    make_plan: Callable[[dict[str, Any], str], Plan]  # a variants spec, checked whole before any run
    make_variant: Callable[[str, dict[str, Any], dict[str, Any], dict[str, float]], Variant]
    check_keys: Callable[[dict[str, Any], str], None]  # settings' keys are playground flags
    run_state: Callable[[Run, Plan], str]  # new, partial, finished, unevaluated, diverged or other plan
    train: Callable[[Run, str, Plan, Callable[..., int]], int | None]  # one run, watched; exits on a signal
    run_plan: Callable[[Plan], list[Run]]  # train a plan's unfinished runs, write its report; the failed runs
    write_report: Callable[[Plan, Path], str]  # a plan's report from its finished runs


@dataclass(frozen=True)
class Search:
    name: str
    folder: str  # <out_dir>/<name>
    base: dict[str, Any]  # the base settings (corpus included): every trial starts from them
    budget: dict[str, float]
    trials: int
    space: dict[str, Any]  # flag -> {low, high, log, step} or a list of choices
    sampler: dict[str, dict[str, Any]]  # {name: keyword arguments}
    prune: dict[str, dict[str, Any]] | None
    confirm_top: int
    confirm_seeds: list[int]
    seed: int  # every trial's training seed, and the sampler's
    first: list[dict[str, Any]]  # trials to run first (e.g. today's settings), as {flag: value}

    def fixed(self) -> dict[str, Any]:
        """What a study's trials were trained with: a rerun may raise trials or change the confirmation, the
        sampler or the pruning, but not these."""
        return {k: v for k, v in asdict(self).items() if k in ("base", "budget", "space", "seed", "first")}


# ----------------------------------------------------------------------------- the spec

def is_search(spec: dict[str, Any] | None, report_dir: str | None) -> bool:
    if spec is not None:
        return "search" in spec
    return report_dir is not None and (Path(report_dir) / SEARCH_PLAN).is_file()


def parse_search(spec: dict[str, Any], stem: str, runner: Runner) -> Search:
    """Check the whole spec (base, budget, every dimension's values as a variant would be) before any run."""
    optuna = import_optuna()
    clash = sorted(set(spec) & {"variants", "grid", "baseline", "seeds"})
    if clash:
        raise UsageError(f"search: replaces {', '.join(clash)} (the trials are the variants; the confirmation's "
                         f"seeds are search: confirm: {{seeds: N}})")
    s = planning.mapping(spec["search"], "search")
    unknown = sorted(set(s) - set(SEARCH_KEYS))
    if unknown:
        raise UsageError(f"unknown search key(s): {', '.join(unknown)} (known: {', '.join(SEARCH_KEYS)})")
    seed = s.get("seed", planning.BASE_SEED)
    if not _whole(seed, 0):
        raise UsageError(f"search seed must be an integer >= 0, got {seed!r}")
    base = runner.make_plan({**{k: v for k, v in spec.items() if k != "search"}, "variants": {"base": {}},
                             "seeds": [seed]}, stem)
    trials = s.get("trials")
    if not _whole(trials, 1):
        raise UsageError(f"search trials must be a positive integer, got {trials!r}")
    settings = base.variants[0].settings
    space = parse_space(s.get("space"), settings, base.budget, runner)
    top, seeds = parse_confirm(s.get("confirm", {}), seed)
    search = Search(base.name, base.folder, settings, base.budget, trials, space,
                    named_option(s.get("sampler", "tpe"), "sampler", SAMPLERS),
                    named_option(s.get("prune"), "prune", PRUNERS), top, seeds, seed,
                    parse_first(s.get("first", []), space, trials))
    make_sampler(search, optuna), make_pruner(search, optuna)  # a bad keyword argument is refused now
    return search


def _whole(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def parse_space(value: Any, base: dict[str, Any], budget: dict[str, float], runner: Runner) -> dict[str, Any]:
    space = planning.mapping(value, "search space")
    if not space:
        raise UsageError("search space is empty: map each flag to {low: A, high: B} (log: true for a log scale) "
                         "or to a list of choices")
    runner.check_keys(space, "search space")
    if "corpus" in space:
        raise UsageError("search space: corpus cannot be searched (a score compares runs on one corpus)")
    optuna = import_optuna()
    for key, dimension in space.items():
        distribution(key, dimension, optuna)
        for v in values_to_check(dimension):  # each end of a range, each choice: as a variant would be checked
            try:
                runner.make_variant("search space", {key: v}, base, budget)
            except UsageError as e:
                raise UsageError(f"search space {key}={show(v)}: {str(e).split(': ', 1)[-1]}") from None
    return space


def distribution(key: str, dimension: Any, optuna: Any) -> Any:
    """A dimension as an Optuna distribution: {low, high, log?, step?} (integers if both ends are) or a list
    of choices."""
    d = optuna.distributions
    if isinstance(dimension, list):
        shown = [show(v) for v in dimension]
        if not dimension or not all(isinstance(v, bool | int | float | str) for v in dimension):
            raise UsageError(f"search space {key}: a list of choices needs one or more numbers, words or true/"
                             f"false, got {dimension!r}")
        if len(set(shown)) != len(shown):
            raise UsageError(f"search space {key}: a choice is listed twice in {dimension}")
        return d.CategoricalDistribution(dimension)
    r = planning.mapping(dimension, f"search space {key}")
    unknown = sorted(set(r) - {"low", "high", "log", "step"})
    ends = [r.get("low"), r.get("high")]
    if unknown or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in ends):
        raise UsageError(f"search space {key}: give {{low: A, high: B}} (numbers; log: true, step: S optional) or "
                         f"a list of choices, got {dimension!r}")
    if ends[0] >= ends[1]:
        raise UsageError(f"search space {key}: low {show(ends[0])} is {'above' if ends[0] > ends[1] else 'equal to'}"
                         f" high {show(ends[1])}: an empty range (a fixed value belongs in base:)")
    whole = all(isinstance(x, int) for x in ends)
    try:
        if whole:
            return d.IntDistribution(*ends, log=bool(r.get("log", False)), step=r.get("step", 1))
        return d.FloatDistribution(*ends, log=bool(r.get("log", False)), step=r.get("step"))
    except (ValueError, TypeError) as e:
        raise UsageError(f"search space {key}: {e}") from None


def values_to_check(dimension: Any) -> list[Any]:
    return list(dimension) if isinstance(dimension, list) else [dimension["low"], dimension["high"]]


def named_option(value: Any, what: str, known: dict[str, str]) -> dict[str, dict[str, Any]] | None:
    """`name` or {name: {keyword: value}} -> {name: keywords}; None (or 'none') for no pruning."""
    if value is None or (what == "prune" and value == "none"):
        return None
    if isinstance(value, str):
        value = {value: {}}
    if not isinstance(value, dict) or len(value) != 1:
        raise UsageError(f"{what} must be a name or {{name: {{keyword: value}}}}; names: {', '.join(known)}")
    (name, keywords), = value.items()
    if name not in known:
        raise UsageError(f"unknown {what} '{name}': use one of {', '.join(known)}")
    return {name: planning.mapping(keywords, f"{what} {name}")}


def parse_confirm(value: Any, seed: int) -> tuple[int, list[int]]:
    """(how many of the best trials, the seeds): seeds: N are the N seeds after the search's own, so no trial's
    luck on its seed counts in the confirmation."""
    confirm = planning.mapping(value, "confirm")
    unknown = sorted(set(confirm) - {"top", "seeds"})
    top, seeds = confirm.get("top", 1), confirm.get("seeds", 5)
    if unknown or not _whole(top, 0):
        raise UsageError(f"confirm must be {{top: N (0: none), seeds: N or a list}}, got {value!r}")
    if _whole(seeds, 1):
        return top, [seed + 1 + i for i in range(seeds)]
    seeds = planning.parse_seeds(seeds)
    if seed in seeds:
        raise UsageError(f"confirm seeds include the search's seed {seed}: the confirmation needs seeds no trial "
                         f"was chosen on")
    return top, seeds


def parse_first(value: Any, space: dict[str, Any], trials: int) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(p, dict) for p in value):
        raise UsageError(f"search first must be a list of {{flag: value}} (trials to run first), got {value!r}")
    if len(value) > trials:
        raise UsageError(f"search first lists {len(value)} trials, more than trials: {trials}")
    for params in value:
        for key, v in params.items():
            if key not in space:
                raise UsageError(f"search first: '{key}' is not in the search space ({', '.join(space)})")
            if not inside(v, space[key]):
                raise UsageError(f"search first: {key}={v!r} is outside the search space's {space[key]!r}")
    return value


def inside(value: Any, dimension: Any) -> bool:
    if isinstance(dimension, list):
        return show(value) in [show(v) for v in dimension]
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and dimension["low"] <= value <= dimension["high"]


# ----------------------------------------------------------------------------- Optuna

def import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise UsageError("a search: spec needs Optuna: pip install optuna") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the runner prints its own line per trial
    return optuna


def make_sampler(search: Search, optuna: Any, trials_so_far: int = 0) -> Any:
    """Seeded from the search's seed and the number of trials the study holds: made afresh for each trial, it
    proposes after a rerun what an uninterrupted search would have (a sampler seeded once per process would
    replay, after each rerun, the proposals it made first)."""
    (name, keywords), = search.sampler.items()
    return _construct(getattr(optuna.samplers, SAMPLERS[name]), {"seed": search.seed + trials_so_far, **keywords},
                      "sampler", name)


def make_pruner(search: Search, optuna: Any) -> Any:
    if search.prune is None:
        return optuna.pruners.NopPruner()
    (name, keywords), = search.prune.items()
    return _construct(getattr(optuna.pruners, PRUNERS[name]), {**PRUNE_DEFAULTS, **keywords}, "prune", name)


def _construct(cls: type, keywords: dict[str, Any], what: str, name: str) -> Any:
    try:
        return cls(**keywords)
    except (TypeError, ValueError, ImportError) as e:
        raise UsageError(f"{what} {name}: {e}") from None


def open_study(search: Search, folder: Path, optuna: Any) -> Any:
    """The study in the folder's journal file, made (with the `first` trials queued) when there is none."""
    study = optuna.create_study(study_name=search.name, storage=_storage(folder), sampler=make_sampler(search, optuna),
                                pruner=make_pruner(search, optuna), direction="minimize", load_if_exists=True)
    if not study.get_trials(deepcopy=False):
        for params in search.first:
            study.enqueue_trial(params)
    return study


def load_search(folder: Path) -> Search:
    try:
        return Search(**json.loads((folder / SEARCH_PLAN).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"{folder / SEARCH_PLAN} is damaged or missing ({e}): run the spec file again") from None


def check_saved(search: Search, folder: Path) -> None:
    """A rerun continues the study only with the settings its trials were trained with."""
    if not (folder / SEARCH_PLAN).is_file():
        return
    saved = load_search(folder).fixed()
    changed = [k for k, v in search.fixed().items() if json.dumps(v) != json.dumps(saved[k])]
    if changed:
        raise UsageError(f"{folder}'s study was made with other {', '.join(changed)} than the spec now gives: "
                         f"raise trials or change confirm/sampler/prune only, or give the search another name")


# ----------------------------------------------------------------------------- trials

class Watcher:
    """Waits for a trial's run in place of child.wait(), reading its metrics file as it grows. At each tenth of
    the budget (of its steps; of its seconds under a time budget, so trials are compared at equal wall time,
    not at equal steps) it reports the newest val bits/byte to Optuna, keyed by the percent done; when the
    pruner finds the trial clearly behind the finished ones there, it sends SIGTERM: the run saves its step
    and exits 143, and the trial is pruned."""

    def __init__(self, trial: Any, run: Run, budget: dict[str, float], reported: set[int]) -> None:
        self.trial, self.run, self.budget, self.reported, self.pruned = trial, run, budget, reported, False

    def percent(self, row: dict[str, Any]) -> float:
        if self.run.variant.max_iters is not None:
            return 100 * row["step"] / self.run.variant.max_iters
        return 100 * row.get("time_s", 0.0) / self.budget["time_budget"]

    def report_new(self) -> bool:
        """Report every tenth reached since the last call: the first evaluation at or past it. True if any."""
        new = False
        for row in read_metrics(self.run.metrics):
            if "val_bpb" not in row:
                continue
            for tenth in TENTHS:
                if tenth not in self.reported and tenth <= self.percent(row):
                    self.trial.report(row["val_bpb"], tenth)
                    self.reported.add(tenth)
                    new = True
        return new

    def __call__(self, child: subprocess.Popen, children: Any) -> int:
        try:
            return self.wait(child, children)
        except BaseException:  # an error of the search's own: never leave its run training unwatched
            child.terminate()
            child.wait()
            raise

    def wait(self, child: subprocess.Popen, children: Any) -> int:
        while True:
            try:
                returncode = child.wait(timeout=POLL_S)
                self.report_new()  # the tenths after the last poll: the pruner compares later trials with them
                return returncode
            except subprocess.TimeoutExpired:
                pass
            if self.report_new() and self.trial.should_prune():
                with children.lock:  # a Ctrl-C already passed on must not be followed by a second signal
                    if not children.stopped_by:
                        self.pruned = True
                        child.send_signal(signal.SIGTERM)
                return child.wait()


def run_trials(search: Search, study: Any, runner: Runner, optuna: Any) -> None:
    """Resume the trial a kill interrupted, then ask Optuna for new ones until `trials` have ended; search.csv
    grows by a row as each ends."""
    table = Path(search.folder) / "search.csv"
    for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        # Optuna has no public way back to a running trial; its id names it in the storage.
        run_trial(search, study, optuna.Trial(study, frozen._trial_id), set(frozen.intermediate_values), runner)
        write_csv(search, study, table)
    while len(ended(study)) < search.trials:
        study.sampler = make_sampler(search, optuna, len(study.get_trials(deepcopy=False)))
        run_trial(search, study, study.ask(), set(), runner)
        write_csv(search, study, table)


def suggest(trial: Any, space: dict[str, Any]) -> dict[str, Any]:
    """The trial's settings: sampled now, or (a resumed or queued trial) those it already has."""
    params = {}
    for key, d in space.items():
        if isinstance(d, list):
            params[key] = trial.suggest_categorical(key, d)
        elif isinstance(d["low"], int) and isinstance(d["high"], int):
            params[key] = trial.suggest_int(key, d["low"], d["high"], step=d.get("step", 1), log=d.get("log", False))
        else:
            params[key] = trial.suggest_float(key, d["low"], d["high"], step=d.get("step"), log=d.get("log", False))
    return params


def trial_run(search: Search, variant: Variant) -> tuple[Run, Plan]:
    plan = Plan(search.name, search.folder, variant.name, [search.seed], search.budget, [variant])
    return Run(variant, search.seed, Path(search.folder) / TRIALS_DIR / variant.name), plan


def run_trial(search: Search, study: Any, trial: Any, reported: set[int], runner: Runner) -> None:
    """Train one trial (or finish it) and tell Optuna how it ended; a signal exits with the trial unfinished."""
    optuna = import_optuna()
    params = suggest(trial, search.space)
    name = f"trial{trial.number}"
    try:
        variant = runner.make_variant(name, params, search.base, search.budget)
    except UsageError as e:  # a combination playground refuses (e.g. heads that do not divide the width)
        print(f"{name}: failed: {e}")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return
    run, plan = trial_run(search, variant)
    state = runner.run_state(run, plan)
    watcher = Watcher(trial, run, search.budget, reported)
    returncode = runner.train(run, state, plan, watch=watcher) if state in ("new", "partial") else 0
    final = report.final_eval(read_metrics(run.metrics))
    trial.set_user_attr("steps", final["step"] if final else None)
    trial.set_user_attr("seconds", report.read_json(run.result).get("wall_s"))
    if watcher.pruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    elif returncode == 0 and state not in ("unevaluated", "diverged") and final is not None and "val_bpb" in final:
        study.tell(trial, final["val_bpb"])
    else:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    print(f"{name} ({describe(params)}): {trial_line(study.trials[trial.number], run)}")


def describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={show(v)}" for k, v in params.items())


def trial_line(frozen: Any, run: Run) -> str:
    status = STATUS.get(frozen.state.name, frozen.state.name.lower())
    score = trial_score(frozen)
    where = f" at step {frozen.user_attrs.get('steps')}" if status == "pruned" else ""
    shown = f"val bits/byte {score:.4f} (one seed: a screening score){where}, " if score is not None else ""
    return f"{shown}{status}" + ("" if status != "failed" else f" (see {run.log})")


def trial_score(frozen: Any) -> float | None:
    """A finished trial's value; a pruned trial's last reported one (how far behind it was when stopped)."""
    if frozen.value is not None:
        return frozen.value
    values = frozen.intermediate_values
    return values[max(values)] if values else None


# ----------------------------------------------------------------------------- confirmation and report

def ended(study: Any) -> list[Any]:
    return [t for t in study.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED", "FAIL")]


def confirmation_plan(search: Search, study: Any, runner: Runner) -> Plan | None:
    """The base and the `top` best finished trials, as variants trained on the confirmation's seeds. A trial
    with the base's own settings (say, today's, queued by `first`) is the base: the next one is confirmed."""
    finished = sorted((t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE" and
                       any(k not in search.base or show(search.base[k]) != show(v) for k, v in t.params.items())),
                      key=lambda t: (t.value, t.number))
    best = finished[:search.confirm_top]
    if not best:
        return None
    variants = {"base": {}} | {f"trial{t.number}": dict(t.params) for t in best}
    return runner.make_plan({"name": CONFIRM_DIR, "out_dir": search.folder, "base": search.base,
                             "variants": variants, "seeds": search.confirm_seeds, "budget": search.budget},
                            CONFIRM_DIR)


def write_csv(search: Search, study: Any, path: Path) -> None:
    """One row per trial that has begun, in trial order: a row never changes once its trial has ended."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["trial", *search.space, *CSV_TAIL])
    for t in study.get_trials(deepcopy=False):
        if t.state.name == "WAITING":
            continue
        score = trial_score(t)
        writer.writerow([t.number, *[show(t.params[k]) if k in t.params else "" for k in search.space],
                         "" if score is None else repr(score), _blank(t.user_attrs.get("steps")),
                         _blank(t.user_attrs.get("seconds")), STATUS.get(t.state.name, t.state.name.lower())])
    atomic_write_text(path, text.getvalue(), "search table")


def _blank(value: Any) -> str:
    return "" if value is None else str(value)


def verdict(row: dict[str, Any]) -> str:
    """What the confirmation says of one trial against the base, from its paired difference."""
    if "diff" not in row:
        return row.get("diff_note", "no pairs with the base finished yet")
    low, high = row["diff_ci"]
    numbers = (f"Δ {row['diff']:+.4f} bits/byte, 95% CI [{low:.4f}, {high:.4f}], p = {row['p']:.3f}, "
               f"n = {row['pairs']}")
    if row["pairs"] < 2:
        return f"one pair, no interval: not confirmed ({numbers})"
    if high < 0:
        return f"**beats the base by {-row['diff']:.4f} bits/byte** ({numbers})"
    if low > 0:
        return f"worse than the base by {row['diff']:.4f} bits/byte ({numbers})"
    return f"no difference from the base that stands out from the seed noise ({numbers})"


def space_text(space: dict[str, Any]) -> str:
    def one(key: str, d: Any) -> str:
        if isinstance(d, list):
            return f"{key} in [{', '.join(show(v) for v in d)}]"
        return f"{key} from {show(d['low'])} to {show(d['high'])}{' (log scale)' if d.get('log') else ''}"
    return "; ".join(one(k, d) for k, d in space.items())


def report_markdown(search: Search, study: Any, confirm: Plan | None, rows: list[dict[str, Any]],
                    confirm_text: str) -> str:
    counts = {s: sum(STATUS.get(t.state.name) == s for t in ended(study)) for s in ("finished", "pruned", "failed")}
    (kind, amount), = search.budget.items()
    prune = "none" if search.prune is None else describe_option(search.prune)
    lines = [f"# Search {search.name}", "",
             f"Budget: {kind} {show(amount)} ({planning.BUDGETS[kind]}). Trials: {len(ended(study))} of "
             f"{search.trials} ended: {counts['finished']} finished, {counts['pruned']} pruned, {counts['failed']} "
             f"failed. Sampler: {describe_option(search.sampler)} (seed {search.seed}). Pruning: {prune}.", "",
             f"Space: {space_text(search.space)}.", "",
             f"Each trial trained once, with seed {search.seed} (search.csv). A trial's score is one seed's, and "
             f"the best of many is lucky by selection: it ranks the trials for the confirmation, and is not a "
             f"result.", "", "## Confirmation", ""]
    if confirm is None:
        lines.append("None (confirm: {top: 0}, or no trial finished): this search is a screening, not a result.")
        return "\n".join(lines) + "\n"
    lines += [f"The {len(confirm.variants) - 1} best finished trial(s), trained again with seeds "
              f"{', '.join(map(str, confirm.seeds))} (none the search trained with) beside the base, paired by "
              f"seed ([confirm/report.md](confirm/report.md)):", ""]
    lines += [line for line in confirm_text.splitlines() if line.startswith("|")] + [""]
    for row, v in zip(rows[1:], confirm.variants[1:], strict=True):
        lines.append(f"- {v.name} ({describe(v.overrides)}): {verdict(row)}")
    return "\n".join(lines) + "\n"


def describe_option(option: dict[str, dict[str, Any]]) -> str:
    (name, keywords), = option.items()
    return name + (f" ({describe(keywords)})" if keywords else "")


def confirmation_rows(plan: Plan, runner: Runner) -> list[dict[str, Any]]:
    runs = report.plan_runs(plan, Path(plan.folder))
    results = [report.read_result(run) for run in runs if runner.run_state(run, plan) == "finished"]
    return report.summarise(plan, results)


def write_report(search: Search, study: Any, confirm: Plan | None, confirm_text: str, runner: Runner) -> str:
    folder = Path(search.folder)
    write_csv(search, study, folder / "search.csv")
    rows = confirmation_rows(confirm, runner) if confirm is not None else []
    text = report_markdown(search, study, confirm, rows, confirm_text)
    atomic_write_text(folder / "report.md", text, "report")
    return text


# ----------------------------------------------------------------------------- the command

def main(spec: dict[str, Any] | None, stem: str | None, report_dir: str | None, runner: Runner) -> None:
    """Run (or continue) the search and its confirmation, then write the report; with report_dir alone,
    rebuild the report from what the folder holds."""
    optuna = import_optuna()
    if spec is None or report_dir is not None:
        folder = Path(report_dir)
        search = load_search(folder)
        if not (folder / JOURNAL).is_file():
            raise UsageError(f"{folder} holds no {JOURNAL}: run the spec file to start the search")
        study = optuna.load_study(study_name=search.name, storage=_storage(folder))
        confirm = _saved_confirmation(folder)
        text = runner.write_report(confirm, Path(confirm.folder)) if confirm is not None else ""
        print(write_report(search, study, confirm, text, runner), end="")
        print(f"report: {folder / 'report.md'}")
        return
    search = parse_search(spec, stem, runner)
    folder = Path(search.folder)
    check_saved(search, folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / SEARCH_PLAN, json.dumps(asdict(search), indent=1) + "\n", "search plan")
    study = open_study(search, folder, optuna)
    done = len(ended(study))
    print(f"{search.name}: {done} of {search.trials} trial(s) ended; logs in {folder / TRIALS_DIR}/trial<N>/run.log")
    run_trials(search, study, runner, optuna)
    confirm = confirmation_plan(search, study, runner)
    failed = runner.run_plan(confirm) if confirm is not None else []
    text = (folder / CONFIRM_DIR / "report.md").read_text(encoding="utf-8") if confirm is not None else ""
    print(write_report(search, study, confirm, text, runner), end="")
    print(f"report: {folder / 'report.md'}")
    if failed:
        print(f"{len(failed)} confirmation run(s) failed: {', '.join(r.label for r in failed)} (see their run.log)",
              file=sys.stderr)
        sys.exit(1)


def _storage(folder: Path) -> Any:
    """Optuna's file storage: an append-only journal a kill cannot leave half-written (it locks the file)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(folder / JOURNAL)))


def _saved_confirmation(folder: Path) -> Plan | None:
    path = folder / CONFIRM_DIR / planning.PLAN_NAME
    if not path.is_file():
        return None
    try:
        return planning.plan_from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, UsageError) as e:
        raise UsageError(f"{path} is damaged ({e}): run the spec file again to rewrite it") from None
