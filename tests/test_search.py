"""experiment.py search: trials proposed by Optuna write one row each, the best is confirmed by a paired test
against the base, pruning stops a trial clearly behind, a killed search resumes without retraining finished
trials, raising trials adds only new rows, and bad spaces are refused before any run.

The trials run a stand-in for playground.py (it writes a metrics file whose val bits/byte depend on --lr),
since what is tested is the search's handling; the confirmation's runs are real (the stand-in hands them to
playground.py), as the report reads their checkpoints."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import corpus_slice
from test_experiment import TINY

import experiment
from gptlab import search
from gptlab.errors import UsageError, run_cli
from gptlab.tokenizer import train_tokenizer

pytest.importorskip("optuna")

REPO = Path(__file__).resolve().parent.parent
# The stand-in: for a trial (its --out_dir holds /trials/), one evaluation every --eval_interval steps, val
# bits/byte 3 + |log10(lr) + 2.5| + 1/step (best at lr = 10^-2.5); from lr 0.5 up, or when the file `slow`
# in its folder names its trial, it waits after its first evaluation until a signal stops it. Every call is
# appended to calls.txt. Any other run is real.
FAKE = """import json, os, signal, sys, time
from pathlib import Path
here = Path(__file__).parent
argv = sys.argv[1:]
arg = lambda name, default=None: argv[argv.index(name) + 1] if name in argv else default
if "/trials/" not in arg("--out_dir"):
    os.execv(sys.executable, [sys.executable, REAL, *argv])
with open(here / "calls.txt", "a") as f:
    f.write(" ".join(argv) + "\\n")
def stop(signum, frame):
    print(f"got signal {signum}", flush=True)
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
import math
lr, every, steps = float(arg("--lr")), int(arg("--eval_interval")), int(arg("--max_iters"))
metrics = Path(arg("--out_dir")) / (Path(arg("--checkpoint")).stem + ".metrics.jsonl")
start = time.time()
print("training", flush=True)
for step in range(every, steps + 1, every):
    bpb = 3 + abs(math.log10(lr) + 2.5) + 1 / step
    with open(metrics, "a") as f:
        f.write(json.dumps({"step": step, "val_loss": bpb, "val_bpb": bpb, "time_s": time.time() - start}) + "\\n")
    if lr > 0.5 or (here / "slow").exists() and (here / "slow").read_text() in arg("--out_dir"):
        time.sleep(60)
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """20 kB of the bundled corpus and a 300-token tokenizer trained on it."""
    folder = tmp_path_factory.mktemp("data")
    corpus = corpus_slice(folder, 20_000)
    train_tokenizer([corpus], "bbpe", 300, show_progress=False).save(folder / "tokenizer.json")
    return {"corpus": str(corpus), "tokenizer": str(folder / "tokenizer.json")}


def fake_playground(folder: Path) -> Path:
    fake = folder / "fake_playground.py"
    fake.write_text(FAKE.replace("REAL", repr(str(REPO / "playground.py"))))
    return fake


def write_spec(folder: Path, data: dict[str, str], name: str = "hunt", **search_keys) -> Path:
    spec = {"out_dir": str(folder / "out"), "base": {**data, **TINY}, "budget": {"max_iters": 4},
            "search": {"trials": 3, "space": {"lr": {"low": 1e-4, "high": 3e-2, "log": True}},
                       "confirm": {"top": 1, "seeds": 2}, **search_keys}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def rows(out: Path) -> list[dict[str, str]]:
    with open(out / "search.csv") as f:
        return list(csv.DictReader(f))


def stamps(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")
            if p.is_file() and p.parent.name != "__pycache__"}


@pytest.fixture(scope="module")
def hunt(tmp_path_factory, data) -> tuple[Path, Path]:
    """3 stand-in trials, then the best one and the base with 2 real seeds each: (spec, experiment folder)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    folder = tmp_path_factory.mktemp("search")
    spec = write_spec(folder, data)
    previous, experiment.PLAYGROUND = experiment.PLAYGROUND, fake_playground(folder)
    try:
        experiment.main([str(spec), "--jobs", "2"])  # the confirmation's 4 runs, two at a time
    finally:
        experiment.PLAYGROUND = previous
    return spec, folder / "out" / "hunt"


def test_each_trial_is_one_row_whose_score_is_its_runs_final_evaluation(hunt):
    _, out = hunt
    table = rows(out)
    assert list(table[0]) == ["trial", "lr", "score", "steps", "seconds", "status"]
    assert [r["trial"] for r in table] == ["0", "1", "2"] and {r["status"] for r in table} == {"finished"}
    for r in table:
        lines = (out / "trials" / f"trial{r['trial']}" / "ckpt.metrics.jsonl").read_text().splitlines()
        final = json.loads(lines[-1])
        assert float(r["score"]) == final["val_bpb"] and int(r["steps"]) == final["step"] == 4
        command = (out / "trials" / f"trial{r['trial']}" / "run.log").read_text().splitlines()[0]
        assert f"--lr {r['lr']}" in command and "--seed 1337" in command and "--max_iters 4" in command
        assert 1e-4 <= float(r["lr"]) <= 3e-2 and float(r["seconds"]) > 0


def test_the_best_trial_is_confirmed_against_the_base_on_fresh_seeds(hunt):
    _, out = hunt
    best = min(rows(out), key=lambda r: float(r["score"]))
    name = f"trial{best['trial']}"
    with open(out / "confirm" / "results.csv") as f:
        confirmed = {(r["variant"], int(r["seed"])): float(r["val_bpb"]) for r in csv.DictReader(f)}
    assert set(confirmed) == {(v, s) for v in ("base", name) for s in (1338, 1339)}  # not the search's 1337
    command = (out / "confirm" / name / "seed1338" / "run.log").read_text().splitlines()[0]
    assert f"--lr {best['lr']}" in command
    text = (out / "report.md").read_text()
    diff = sum(confirmed[(name, s)] - confirmed[("base", s)] for s in (1338, 1339)) / 2
    line = next(x for x in text.splitlines() if x.startswith(f"- {name} "))
    assert f"Δ {diff:+.4f} bits/byte" in line and "p = " in line and "n = 2" in line
    assert f"| {name} | 2 |" in text  # the standard table, with intervals and the paired p
    assert "3 finished, 0 pruned, 0 failed" in text and "is not a result" in text
    assert best["score"] not in text  # a trial's one-seed score is not reported as a result


def test_a_rerun_trains_nothing_and_the_report_rebuilds_from_the_folder(hunt, capsys):
    spec, out = hunt
    before, csv_before = stamps(out), (out / "search.csv").read_text()
    experiment.main([str(spec)])
    after = stamps(out)
    assert {k: v for k, v in after.items() if "trials/" in k or "/seed" in k} == \
           {k: v for k, v in before.items() if "trials/" in k or "/seed" in k}
    assert "3 of 3 trial(s) ended" in capsys.readouterr().out
    (out / "report.md").unlink()
    experiment.main(["--report", str(out)])
    assert (out / "search.csv").read_text() == csv_before and "## Confirmation" in (out / "report.md").read_text()


def test_raising_trials_adds_only_new_rows(hunt, monkeypatch):
    spec, out = hunt
    before = (out / "search.csv").read_text().splitlines()
    raised = spec.parent / "raised.yaml"  # one more trial; no confirmation (so no real run here)
    raised.write_text(spec.read_text().replace("trials: 3", "trials: 4").replace("top: 1", "top: 0")
                      + "name: hunt\n")
    monkeypatch.setattr(experiment, "PLAYGROUND", spec.parent / "fake_playground.py")
    experiment.main([str(raised)])
    after = (out / "search.csv").read_text().splitlines()
    assert after[:4] == before and len(after) == 5 and after[4].startswith("3,")
    assert (spec.parent / "calls.txt").read_text().count("\n") == 4  # 3 earlier trials, 1 new
    assert "this search is a screening, not a result" in (out / "report.md").read_text()


def test_a_changed_space_is_refused_for_an_existing_study(hunt):
    spec, out = hunt
    edited = spec.parent / "edited.yaml"
    edited.write_text(spec.read_text().replace("high: 0.03", "high: 0.05") + "name: hunt\n")
    before = stamps(out)
    with pytest.raises(UsageError, match="study was made with other space"):
        experiment.main([str(edited)])
    assert stamps(out) == before


def test_a_trial_clearly_behind_is_pruned_and_stopped_cleanly(tmp_path, data, monkeypatch, capsys):
    # Two good trials first; the third (lr 0.9: the stand-in waits after its first evaluation) is behind them.
    monkeypatch.setattr(experiment, "PLAYGROUND", fake_playground(tmp_path))
    spec = write_spec(tmp_path, data, space={"lr": {"low": 1e-4, "high": 1.0, "log": True}},
                      first=[{"lr": 3e-3}, {"lr": 4e-3}, {"lr": 0.9}], confirm={"top": 0},
                      prune={"median": {"n_startup_trials": 2, "n_warmup_steps": 0}})
    experiment.main([str(spec)])
    out = tmp_path / "out" / "hunt"
    assert [r["status"] for r in rows(out)] == ["finished", "finished", "pruned"]
    pruned = out / "trials" / "trial2"
    assert "got signal 15" in (pruned / "run.log").read_text()
    assert json.loads((pruned / "result.json").read_text())["returncode"] == 143
    assert rows(out)[2]["steps"] == "2"
    assert "2 finished, 1 pruned, 0 failed" in (out / "report.md").read_text()


def test_the_confirmation_takes_the_best_finished_trials_that_differ_from_the_base():
    def trial(number, state, value, lr):
        return SimpleNamespace(number=number, state=SimpleNamespace(name=state), value=value, params={"lr": lr})

    study = SimpleNamespace(get_trials=lambda deepcopy: [
        trial(0, "COMPLETE", 2.0, 2e-3),  # the best, but the base's own settings
        trial(1, "PRUNED", None, 1e-3), trial(2, "COMPLETE", 2.3, 5e-3), trial(3, "COMPLETE", 2.1, 4e-3)])
    runner = SimpleNamespace(make_plan=lambda spec, stem: spec)
    hunt = search.Search("s", "out/s", {"lr": 0.002}, {"max_iters": 4}, 4, {}, {"tpe": {}}, None, 2, [1338], 1337,
                         [])
    assert search.confirmation_plan(hunt, study, runner)["variants"] == {"base": {}, "trial3": {"lr": 4e-3},
                                                                         "trial2": {"lr": 5e-3}}


def test_under_a_time_budget_trials_report_at_tenths_of_its_seconds_not_of_steps(monkeypatch):
    class Trial:
        def __init__(self):
            self.reported = []

        def report(self, value, step):
            self.reported.append((step, value))

    variant = search.Variant("trial0", {}, {}, None)
    run = search.Run(variant, 1, Path("nowhere"))
    trial = Trial()
    watcher = search.Watcher(trial, run, {"time_budget": 100}, set())
    rows_ = [{"step": 1000, "val_bpb": 4.0, "time_s": 25.0}, {"step": 2000, "val_bpb": 3.0, "time_s": 41.0}]
    monkeypatch.setattr(search, "read_metrics", lambda path: rows_)
    assert watcher.report_new() and not watcher.report_new()  # nothing new the second time
    assert trial.reported == [(10, 4.0), (20, 4.0), (30, 3.0), (40, 3.0)]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_killed_search_resumes_its_trial_and_keeps_finished_ones(tmp_path, data):
    fake = fake_playground(tmp_path)
    spec = write_spec(tmp_path, data, first=[{"lr": 3e-3}], confirm={"top": 0})
    runner = (f"import experiment; from pathlib import Path; from gptlab.errors import run_cli; "
              f"experiment.PLAYGROUND = Path({str(fake)!r}); run_cli(lambda: experiment.main([{str(spec)!r}]))")
    out = tmp_path / "out" / "hunt"
    log = out / "trials" / "trial1" / "run.log"
    # Trial 0 runs at full speed; trial 1 waits after its first evaluation, and the runner is stopped then.
    (tmp_path / "slow").write_text("trial1")
    proc = subprocess.Popen([sys.executable, "-c", runner], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = log.with_name("ckpt.metrics.jsonl")
    deadline = time.time() + 60
    while not metrics.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert "got signal 15" in log.read_text()
    assert [r["status"] for r in rows(out)] == ["finished"]  # trial 1 has not ended
    lr = (tmp_path / "calls.txt").read_text().splitlines()[1].split("--lr ")[1].split()[0]
    finished = stamps(out / "trials" / "trial0")
    (tmp_path / "slow").unlink()
    experiment.PLAYGROUND, previous = fake, experiment.PLAYGROUND
    try:
        experiment.main([str(spec)])
    finally:
        experiment.PLAYGROUND = previous
    assert stamps(out / "trials" / "trial0") == finished  # not retrained
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert len(calls) == 4 and f"--lr {lr} " in calls[2]  # trial 1 again, with its settings; then trial 2
    assert f"--lr {lr} " not in calls[3]  # a new proposal, not the rerun's sampler replaying trial 1's
    assert [r["status"] for r in rows(out)] == ["finished"] * 3
    assert json.loads(log.with_name("result.json").read_text())["returncode"] == 0


@pytest.mark.parametrize("change, message", [
    ({"space": {"num_of_wings": [2, 4]}}, "search space: 'num_of_wings' is not a playground.py option"),
    ({"space": {"lr": {"low": 1e-3, "high": 1e-3}}}, "low 0.001 is equal to high 0.001: an empty range"),
    ({"space": {"lr": {"low": 1e-2, "high": 1e-3}}}, "low 0.01 is above high 0.001"),
    ({"space": {"num_of_layers": [1, 2, 1]}}, "num_of_layers: a choice is listed twice"),
    ({"space": {"num_of_layers": []}}, "num_of_layers: a list of choices needs one or more"),
    ({"space": {}}, "search space is empty"),
    ({"space": {"dropout": {"low": 0.0, "high": 1.5}}}, "search space dropout=1.5: --dropout must be in [0, 1)"),
    ({"space": {"lr": {"low": 0.0, "high": 1.0, "log": True}}}, "search space lr:"),
    ({"space": {"seed": [1, 2]}}, "'seed' is set by the runner"),
    ({"trials": 0}, "search trials must be a positive integer"),
    ({"sampler": "annealing"}, "unknown sampler 'annealing'"),
    ({"sampler": {"tpe": {"n_startup_trails": 3}}}, "sampler tpe:"),
    ({"prune": "mean"}, "unknown prune 'mean'"),
    ({"confirm": {"top": 1, "seeds": [1337, 1338]}}, "confirm seeds include the search's seed 1337"),
    ({"first": [{"lr": 0.5}]}, "search first: lr=0.5 is outside"),
    ({"colour": "blue"}, "unknown search key(s): colour"),
])
def test_a_bad_search_is_one_error_line_and_starts_nothing(tmp_path, data, capsys, change, message):
    spec = write_spec(tmp_path, data, **change)
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: experiment.main([str(spec)]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_search_with_variants_is_refused(tmp_path, data, capsys):
    spec = write_spec(tmp_path, data)
    spec.write_text(spec.read_text() + "variants: {a: {}}\nseeds: 2\n")
    with pytest.raises(SystemExit):
        run_cli(lambda: experiment.main([str(spec)]))
    assert "search: replaces seeds, variants" in capsys.readouterr().err


def test_a_configs_time_budget_under_a_steps_budget_is_refused(data):
    """A --config file's time_budget would stop each run (trial or variant) on time, not at the budget's steps."""
    spec = {"base": {**data, "config": str(REPO / "configs" / "cpu_speedrun.yaml")}, "variants": {"a": {}},
            "seeds": 1, "budget": {"max_iters": 250}}
    with pytest.raises(UsageError, match="its config sets time_budget 117, which would stop each run on time "
                                         "instead of at the budget's max_iters"):
        experiment.make_plan(spec, "s", experiment.playground_options())
    experiment.make_plan({**spec, "budget": {"time_budget": 117}}, "s", experiment.playground_options())
