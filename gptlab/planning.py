"""An experiment's plan, from its spec: the variants x seeds, the budget, the seeds and the benchmark, each part
checked before anything runs (experiment.py checks the variants' settings against playground.py). The report of
a plan's runs is gptlab/report.py's job."""


import itertools
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gptlab import blimp
from gptlab.data import prepared_folder, read_token_folder
from gptlab.errors import UsageError
from gptlab.metrics import METRICS, run_file
from gptlab.tokenizer import Tokenizer, corpus_files

BASE_SEED = 1337
PLAN_NAME = "experiment.json"  # the resolved spec, saved so that --report DIR needs nothing else
CHECKPOINT_NAME = "ckpt.tar"
METRICS_NAME = run_file(CHECKPOINT_NAME, METRICS).name  # beside the checkpoint (--out_dir is the run's folder too)
RESERVED_NAMES = (PLAN_NAME, "report.md", "results.csv", "curves.png")  # the runner's files beside variants
COUNTED_BYTES = 1 << 20  # validation text up to this size is tokenized before any run, to count its tokens
BUDGETS = {"max_iters": "equal steps", "tokens": "equal tokens", "time_budget": "equal wall time (seconds)"}
MAX_RUNS = 10_000  # variants x seeds: more is no experiment one machine finishes (at 60 s a run: a week)


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
    benchmark: dict[str, str] = field(default_factory=dict)  # {"blimp": DIR}: scored after training, or nothing


def plan_from_dict(d: Any) -> Plan:
    """A plan read back from its JSON file, checked field by field (a hand edit or a torn file may hold
    anything): ValueError says what is wrong."""
    if not isinstance(d, dict) or set(d) - {"benchmark"} != {f.name for f in fields(Plan)} - {"benchmark"}:
        raise ValueError(f"it must hold exactly {', '.join(f.name for f in fields(Plan))}")
    variant_keys = {f.name for f in fields(Variant)}
    if not isinstance(d["variants"], list) or not all(isinstance(v, dict) and set(v) == variant_keys
                                                      for v in d["variants"]) or not d["variants"]:
        raise ValueError(f"variants must be a list of {{{', '.join(sorted(variant_keys))}}}")
    plan = Plan(**{**d, "variants": [Variant(**v) for v in d["variants"]]})
    for v in plan.variants:
        variant_name(v.name)
        if not (isinstance(v.overrides, dict) and isinstance(v.settings, dict)
                and (v.max_iters is None or type(v.max_iters) is int)):
            raise ValueError(f"variant {v.name!r} is not a variant")
    if not isinstance(plan.name, str) or not isinstance(plan.folder, str) or \
            plan.baseline not in [v.name for v in plan.variants]:
        raise ValueError("its name, folder or baseline is wrong")
    parse_seeds(plan.seeds)
    parse_budget(plan.budget)
    if plan.benchmark:
        parse_benchmark(plan.benchmark, check_data=False)  # the data may have moved: --report says so if used
    return plan


def show(value: Any) -> str:
    """A setting's value as typed on a command line or in a variant name."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------- the spec's parts

def variant_overrides(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Variant name -> its overrides, from `variants:` as written or from every combination of `grid:`."""
    if ("variants" in spec) == ("grid" in spec):
        raise UsageError("give exactly one of variants: (name -> overrides) or grid: (setting -> list of values)")
    if "variants" in spec:
        variants = mapping(spec["variants"], "variants")
        if not variants:
            raise UsageError("variants: is empty")
        return {variant_name(name): mapping(changes, f"variant '{name}'")
                for name, changes in variants.items()}
    grid = mapping(spec["grid"], "grid")
    if not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise UsageError("grid: must map each setting to a non-empty list of values, e.g. lr: [1.0e-3, 2.0e-3]")
    combos = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    named = {}
    for combo in combos:
        name = ",".join(f"{k}={show(v)}".replace("/", "_") for k, v in combo.items())
        if name in named:  # e.g. lr: [0.001, 1.0e-3]: one value written twice, which one folder cannot hold
            raise UsageError(f"grid values print alike: {name} twice (give each setting's values once)")
        named[name] = combo
    return named


def check_size(spec: dict[str, Any], budget: dict[str, float]) -> None:
    """Refuse a spec of more than MAX_RUNS runs, counted before its grid's combinations or its seeds are listed
    (a billion seeds would fill the memory), saying how many and what they would take at the budget."""
    grid, variants, seeds = spec.get("grid"), spec.get("variants"), spec.get("seeds")
    if isinstance(grid, dict):
        combinations = math.prod(len(v) if isinstance(v, list) else 1 for v in grid.values())
    else:
        combinations = len(variants) if isinstance(variants, dict) else 1
    count = seeds if isinstance(seeds, int) else len(seeds) if isinstance(seeds, list) else 1
    runs = combinations * max(count, 1)
    if runs <= MAX_RUNS:
        return
    (kind, amount), = budget.items()
    cost = {"time_budget": f"{runs * amount / 86400:,.0f} days of training at {show(amount)} s each",
            "max_iters": f"{runs * amount:,} training steps in all",
            "tokens": f"{runs * amount:,} training tokens in all"}[kind]
    raise UsageError(f"the spec asks for {runs:,} runs ({combinations:,} variant(s) x {count:,} seed(s)), "
                     f"{cost}: more than the {MAX_RUNS:,} one experiment may hold; give fewer seeds or a "
                     f"smaller grid")


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


def parse_benchmark(value: Any, check_data: bool = True) -> dict[str, str]:
    """benchmark: {blimp: DIR} (BLiMP's paradigm files), or nothing; the folder is read now, before any run."""
    if value is None:
        return {}
    if not (isinstance(value, dict) and set(value) == {"blimp"} and isinstance(value["blimp"], str)):
        raise UsageError(f"benchmark must be {{blimp: DIR}} (a folder of BLiMP's paradigm .jsonl files), got {value!r}")
    if check_data:
        blimp.read_paradigms(value["blimp"])
    return {"blimp": value["blimp"]}


def mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError(f"{where} must be a mapping of key: value, got {value!r}")
    return value


def variant_name(value: Any) -> str:
    """A variant names a folder beside the runner's own files in the experiment's folder."""
    if value in RESERVED_NAMES:
        raise UsageError(f"variant '{value}': '{value}' is a name the runner uses for its own files "
                         f"({', '.join(RESERVED_NAMES)}): choose another")
    return folder_name(value, "variant name")


def folder_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or "/" in value or value.startswith("."):
        raise UsageError(f"{what} must be a non-empty name without '/' (it names a folder), got {value!r}")
    return value



def check_data(corpus: list[str], val_fraction: float, block_size: int, tokenizer: str | None) -> None:
    """What can be known of a run's data before it runs: its files exist and hold text, and its validation
    text holds block_size + 1 tokens: counted with the run's tokenizer when it names one (and the text is
    small), else bounded by its bytes (a token is at least one byte)."""
    prepared = prepared_folder(tuple(corpus))
    files = [] if prepared else corpus_files(corpus)
    val_bytes = int(sum(path.stat().st_size for path in files) * val_fraction)
    tokens, unit = val_bytes, "bytes: at most that many tokens"
    splits = read_token_folder(prepared) if prepared else None
    if splits is not None:  # a folder from prepare_data.py: its split is counted
        tokens, unit = splits["val"].num_tokens, "tokens"
    elif tokenizer is not None and val_bytes < COUNTED_BYTES:
        tokens, unit = len(Tokenizer.from_file(tokenizer).encode(tail_text(files, val_bytes))), "tokens"
    if tokens < block_size + 1:
        raise UsageError(f"its validation text (~{tokens:,} {unit}) is shorter than block_size + 1 = "
                         f"{block_size + 1}: use a longer corpus or a smaller block_size")


def tail_text(files: list[Path], n: int) -> str:
    """The corpus's last n bytes (its validation text, near enough: the split moves to a line start)."""
    parts: list[bytes] = []
    for path in reversed(files):
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - n))
            parts.append(f.read(n))
        n -= len(parts[-1])
        if n <= 0:
            break
    return b"".join(reversed(parts)).decode("utf-8", errors="replace")
