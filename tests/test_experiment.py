"""experiment.py: a tiny sweep end to end (report numbers are the runs' metrics, a rerun trains nothing, an
interrupted run is resumed), failing runs, and spec mistakes refused before any run starts."""

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import experiment
from gptlab import blimp, planning, report
from gptlab.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from gptlab.errors import UsageError, run_cli
from gptlab.metrics import read_metrics
from gptlab.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parent.parent
TINY = {"embedding_dim": 32, "num_of_layers": 1, "num_of_heads": 2, "block_size": 16, "batch_size": 4,
        "eval_interval": 2, "eval_iters": 2, "warmup_iters": 1, "device": "cpu"}
RUNS = [("a", 1337), ("a", 1338), ("b", 1337), ("b", 1338)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """20 kB of the bundled corpus and a 300-token tokenizer trained on it."""
    folder = tmp_path_factory.mktemp("data")
    text = (REPO / "data" / "shakespeare.txt").read_text(encoding="utf-8")[:20_000]
    corpus = folder / "corpus.txt"
    corpus.write_text(text[: text.rindex("\n") + 1], encoding="utf-8")
    train_tokenizer([corpus], "bbpe", 300, show_progress=False).save(folder / "tokenizer.json")
    return {"corpus": str(corpus), "tokenizer": str(folder / "tokenizer.json")}


def write_spec(folder: Path, data: dict[str, str], name: str = "sweep", **spec) -> Path:
    spec = {"out_dir": str(folder / "out"), "base": {**data, **TINY}, "variants": {"a": {}, "b": {"lr": 3e-3,
            "bias": False}}, "seeds": 2, "budget": {"max_iters": 4}, **spec}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_folder(sweep: Path, variant: str, seed: int) -> Path:
    return sweep / variant / f"seed{seed}"


def stamps(sweep: Path) -> dict[str, tuple[int, int]]:
    """(mtime, size) of every file a run leaves, so that any training or rewriting shows."""
    return {str(p.relative_to(sweep)): (p.stat().st_mtime_ns, p.stat().st_size)
            for v, s in RUNS for p in run_folder(sweep, v, s).iterdir() if p.is_file()}


def metrics_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, data) -> tuple[Path, Path]:
    """2 variants x 2 seeds, 4 steps each, trained two at a time: (spec path, experiment folder)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    folder = tmp_path_factory.mktemp("exp")
    spec = write_spec(folder, data)
    experiment.main([str(spec), "--jobs", "2"])
    return spec, folder / "out" / "sweep"


def test_sweep_writes_report_whose_numbers_are_the_runs_metrics(sweep):
    _, out = sweep
    assert (out / "report.md").exists() and (out / "curves.png").stat().st_size > 0
    with open(out / "results.csv") as f:
        rows = {(r["variant"], int(r["seed"])): r for r in csv.DictReader(f)}
    assert set(rows) == set(RUNS)
    for variant, seed in RUNS:
        folder = run_folder(out, variant, seed)
        lines = metrics_rows(folder / "ckpt.metrics.jsonl")
        final = [r for r in lines if "val_loss" in r][-1]
        speeds = [r["tokens_per_s"] for r in lines if "tokens_per_s" in r]
        times = [r["time_s"] for r in lines if "time_s" in r]
        wall = times[-1] if times else json.loads((folder / "result.json").read_text())["wall_s"]
        row = rows[(variant, seed)]
        assert int(row["steps"]) == final["step"] == 4
        assert float(row["val_bpb"]) == pytest.approx(final["val_bpb"], rel=1e-12)
        assert float(row["val_loss"]) == pytest.approx(final["val_loss"], rel=1e-12)
        assert float(row["tokens_per_s"]) == pytest.approx(sum(speeds) / len(speeds), rel=1e-12)
        assert float(row["wall_s"]) == pytest.approx(wall, rel=1e-12)
        # Non-embedding parameters, by hand (vocab 300, width 32, one block, MLP 4x): token embedding 9600,
        # block 2*64 (LayerNorms) + 3168 (qkv) + 1056 (proj) + 4224 (fc) + 4128 (proj) = 12704, final norm 64.
        # Without biases: minus 96 + 32 + 128 + 32 (linear) and 3 * 32 (LayerNorm) = 384.
        assert int(row["parameters"]) == (22368 if variant == "a" else 22368 - 384)
    # The run really got its variant's flags and the runner's per-run ones.
    command = (run_folder(out, "b", 1338) / "run.log").read_text().splitlines()[0]
    for flag in ("--lr 0.003", "--no-bias", "--seed 1338", "--max_iters 4", "--sample_tokens 0",
                 f"--checkpoint {run_folder(out, 'b', 1338) / 'ckpt.tar'}"):
        assert flag in command
    assert "--resume" not in command


def test_report_table_agrees_with_the_statistics(sweep):
    _, out = sweep
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    bpb = {(r["variant"], int(r["seed"])): float(r["val_bpb"]) for r in rows}
    diffs = [bpb[("b", s)] - bpb[("a", s)] for s in (1337, 1338)]
    # Two pairs: mean difference d, s = |d1 - d2| / sqrt(2), t = d / (s / sqrt(2)), and df = 1 (Cauchy),
    # so p = 1 - 2 atan(|t|) / pi.
    d = sum(diffs) / 2
    t = d / (abs(diffs[0] - diffs[1]) / math.sqrt(2) / math.sqrt(2))
    p = 1 - 2 * math.atan(abs(t)) / math.pi
    line = next(x for x in (out / "report.md").read_text().splitlines() if x.startswith("| b |"))
    assert f"{d:+.4f} (n=2)" in line
    assert line.rstrip(" |").endswith(f"{p:.3f}")
    baseline_line = next(x for x in (out / "report.md").read_text().splitlines() if x.startswith("| a |"))
    assert baseline_line.startswith("| a | 2 |") and "| baseline |" in baseline_line


def test_rerun_trains_nothing_and_report_rebuilds_from_the_folder(sweep, capsys):
    spec, out = sweep
    before = stamps(out)
    csv_before = (out / "results.csv").read_text()
    experiment.main([str(spec)])
    assert stamps(out) == before  # no checkpoint, metrics file or log touched
    assert "4 finished, 0 to resume, 0 to start" in capsys.readouterr().out
    for name in ("report.md", "results.csv", "curves.png"):
        (out / name).unlink()
    experiment.main(["--report", str(out)])  # the plan saved in the folder; no spec needed
    assert (out / "results.csv").read_text() == csv_before and (out / "curves.png").exists()
    assert stamps(out) == before


def test_interrupted_run_is_resumed_and_finished_runs_are_left_alone(sweep, capsys):
    spec, out = sweep
    # Leave b/seed1338 as a kill after its step-2 checkpoint would: a checkpoint at iteration 2, metrics up to
    # step 2, and the step-4 training line (killed while evaluating at step 4; resuming writes it again).
    folder = run_folder(out, "b", 1338)
    ckpt = load_checkpoint(folder / "ckpt.tar")
    save_checkpoint({**ckpt, "iteration": 2}, folder / "ckpt.tar")
    metrics = folder / "ckpt.metrics.jsonl"
    kept = [line for line in metrics.read_text().splitlines()
            if json.loads(line)["step"] <= 2 or "val_loss" not in json.loads(line)]
    metrics.write_text("\n".join(kept) + "\n")
    others = {k: v for k, v in stamps(out).items() if not k.startswith("b/seed1338")}
    experiment.main([str(spec)])
    assert "3 finished, 1 to resume, 0 to start" in capsys.readouterr().out
    assert {k: v for k, v in stamps(out).items() if not k.startswith("b/seed1338")} == others
    assert load_checkpoint(folder / "ckpt.tar")["iteration"] == 4
    commands = [line for line in (folder / "run.log").read_text().splitlines() if line.startswith("$ ")]
    assert len(commands) == 2 and commands[-1].endswith("--resume")
    rows = read_metrics(metrics)
    assert [(r["step"], "val_loss" in r) for r in rows] == [(2, False), (2, True), (4, False), (4, True)]
    final = rows[-1]
    with open(out / "results.csv") as f:
        row = next(r for r in csv.DictReader(f) if (r["variant"], r["seed"]) == ("b", "1338"))
    assert float(row["val_bpb"]) == pytest.approx(final["val_bpb"], rel=1e-12)


@pytest.mark.parametrize("steps", [3, 5])
def test_runs_of_another_budget_are_refused_by_name_before_anything_runs(sweep, steps):
    """Finished 4-step runs are neither reported as 3-step ones nor resumed into 5-step ones (their schedule
    decayed over 4 steps): the runner names them and trains nothing."""
    spec, out = sweep
    before = stamps(out)
    edited = spec.parent / "edited.yaml"  # the same experiment (name and folder) with another budget
    edited.write_text(spec.read_text().replace("max_iters: 4", f"max_iters: {steps}") + "name: sweep\n")
    with pytest.raises(UsageError, match=rf"4 run\(s\) were trained to another budget than this spec's max_iters "
                                         rf"{steps}: a/seed1337 \(max_iters 4\), b/seed1337 \(max_iters 4\)"):
        experiment.main([str(edited)])
    assert stamps(out) == before


def test_failing_run_is_reported_and_the_others_go_on(tmp_path, data, monkeypatch, capsys):
    # A stand-in for playground.py that fails for seed 1337 only: what matters here is the runner's handling.
    fake = tmp_path / "fake_playground.py"
    fake.write_text("import sys\nif '1337' in sys.argv:\n    sys.exit('error: the corpus is on fire')\n")
    monkeypatch.setattr(experiment, "PLAYGROUND", fake)
    spec = write_spec(tmp_path, data, variants={"a": {}})
    with pytest.raises(SystemExit) as e:
        experiment.main([str(spec)])
    assert e.value.code == 1
    out = tmp_path / "out" / "sweep" / "a"
    assert "error: the corpus is on fire" in (out / "seed1337" / "run.log").read_text()
    assert json.loads((out / "seed1337" / "result.json").read_text())["returncode"] == 1
    assert json.loads((out / "seed1338" / "result.json").read_text())["returncode"] == 0  # it still ran
    err = capsys.readouterr().err
    assert "run a/seed1337 failed" in err and "the corpus is on fire" in err


@pytest.mark.parametrize("change, message", [
    ({"colour": "blue"}, "unknown experiment spec key(s): colour"),
    ({"variants": {"a": {}, "b": {"num_of_wings": 2}}}, "variant 'b': 'num_of_wings' is not a playground.py"),
    ({"variants": {"a": {"seed": 3}}}, "'seed' is set by the runner"),
    ({"variants": {"a": {"dropout": 1.5}}}, "variant 'a': --dropout must be in [0, 1)"),
    ({"seeds": 0}, "seeds must be a positive number"),
    ({"budget": None}, "budget must be exactly one of"),
    ({"budget": {"max_iters": 4, "tokens": 1000}}, "budget must be exactly one of"),
    ({"base": {"corpus": "no/such.txt"}}, "corpus not found: no/such.txt"),
    ({"baseline": "c"}, "baseline 'c' is not one of the variants"),
    ({"seeds": 1_000_000_000}, "the spec asks for 2,000,000,000 runs (2 variant(s) x 1,000,000,000 seed(s)), "
                               "8,000,000,000 training steps in all: more than the 10,000"),
    ({"variants": None, "grid": {"lr": [i / 1e4 for i in range(1, 101)], "dropout": [i / 1e3 for i in range(100)],
                                 "weight_decay": [i / 10 for i in range(10)]}, "budget": {"time_budget": 60}},
     "the spec asks for 200,000 runs (100,000 variant(s) x 2 seed(s)), 139 days of training at 60 s each"),
    ({"benchmark": {"blimp": "no/such/folder"}}, "BLiMP folder not found: no/such/folder"),
    ({"benchmark": {"hellaswag": "x"}}, "benchmark must be {blimp: DIR}"),
])
def test_bad_spec_is_one_error_line_and_starts_nothing(tmp_path, data, capsys, change, message):
    spec = write_spec(tmp_path, data, **change)
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: experiment.main([str(spec)]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "out").exists()


def test_a_diverged_run_is_reported_as_diverged_not_as_a_score_nor_retrained(tmp_path, data, monkeypatch, capsys):
    # A stand-in for playground.py: seed 1337 diverges (exit status 3); seed 1338 exits 0 having saved nothing.
    fake = tmp_path / "fake_playground.py"
    fake.write_text("import sys\nif '1337' in sys.argv:\n    print('stopped: the run diverged')\n    sys.exit(3)\n")
    monkeypatch.setattr(experiment, "PLAYGROUND", fake)
    spec = write_spec(tmp_path, data, variants={"a": {}})
    experiment.main([str(spec)])  # a diverged run is a result, not a failure: no exit status 1
    out = tmp_path / "out" / "sweep"
    report_text = (out / "report.md").read_text()
    assert "## Diverged (1)" in report_text and "- a/seed1337" in report_text and "| a | 0 |" in report_text
    assert "run a/seed1337 diverged" in capsys.readouterr().out
    experiment.main([str(spec)])
    assert "1 finished (1 diverged), 0 to resume, 1 to start" in capsys.readouterr().out
    assert (out / "a" / "seed1337" / "run.log").read_text().count("$ ") == 1  # not trained again


def test_a_finished_run_whose_final_loss_is_nan_is_reported_as_diverged(sweep, tmp_path):
    _, out = sweep
    copy = tmp_path / "sweep"
    shutil.copytree(out, copy)
    metrics = run_folder(copy, "b", 1338) / "ckpt.metrics.jsonl"
    rows = read_metrics(metrics)
    rows[-1] |= {"val_loss": math.nan, "val_bpb": math.nan}  # as an older playground.py left it, exit status 0
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    experiment.main(["--report", str(copy)])
    text = (copy / "report.md").read_text()
    assert "## Diverged (1)" in text and "- b/seed1338" in text and "| b | 1 |" in text
    assert "b,1338" not in (copy / "results.csv").read_text()


def test_grid_names_variants_by_their_settings_and_the_first_is_the_baseline():
    options = experiment.playground_options()
    plan = experiment.make_plan({"grid": {"lr": [1e-3, 2e-3], "bias": [True, False]}, "seeds": [5, 7],
                                 "budget": {"max_iters": 10}}, "g", options)
    assert [v.name for v in plan.variants] == ["lr=0.001,bias=true", "lr=0.001,bias=false",
                                               "lr=0.002,bias=true", "lr=0.002,bias=false"]
    assert plan.baseline == "lr=0.001,bias=true" and plan.seeds == [5, 7]
    assert plan.folder == str(Path("runs/experiments/g"))


def test_runs_train_seed_by_seed_so_each_pair_meets_the_same_machine():
    """A time-budgeted pair compares variants only if both ran while the machine ran at one speed: the runs of a
    seed are neighbours in the training order, not a variant's seeds."""
    plan = experiment.make_plan({"grid": {"lr": [1e-3, 2e-3, 3e-3]}, "seeds": [5, 7],
                                 "budget": {"max_iters": 10}}, "g", experiment.playground_options())
    order = [(run.seed, run.variant.name) for run in report.plan_runs(plan, Path("out"))]
    assert order == [(5, "lr=0.001"), (5, "lr=0.002"), (5, "lr=0.003"), (7, "lr=0.001"), (7, "lr=0.002"),
                     (7, "lr=0.003")]


def test_token_budget_gives_each_variant_the_steps_its_batch_needs():
    # cpu_quickstart.yaml: batch 16 x block 128 = 2048 tokens per step; 100000 tokens -> ceil(48.8) = 49 steps.
    spec = {"base": {"config": str(REPO / "configs" / "cpu_quickstart.yaml")}, "seeds": 1,
            "variants": {"base": {}, "half_batch": {"batch_size": 8}, "accum": {"grad_accum_steps": 3}},
            "budget": {"tokens": 100_000}}
    plan = experiment.make_plan(spec, "t", experiment.playground_options())
    # 8 x 128 = 1024 -> ceil(97.7) = 98; 16 x 128 x 3 = 6144 -> ceil(16.3) = 17.
    assert {v.name: v.max_iters for v in plan.variants} == {"base": 49, "half_batch": 98, "accum": 17}


def test_time_budget_command_passes_the_budget_and_no_step_count():
    variant = planning.Variant("v", {}, {"corpus": "c.txt", "bias": False}, None)
    plan = planning.Plan("p", "out/p", "v", [1], {"time_budget": 120}, [variant])
    run = experiment.Run(variant, 1, Path("out/p/v/seed1"))
    command = experiment.run_command(run, plan, {"bias": True}, resume=False)
    assert command[:3] == [sys.executable, str(experiment.PLAYGROUND), "c.txt"]
    assert command[3:] == ["--no-bias", "--seed", "1", "--out_dir", str(run.folder), "--checkpoint",
                           str(run.folder / "ckpt.tar"), "--sample_tokens", "0", "--time_budget", "120"]
    # Resumed, the same budget: the one the checkpoint holds, or its max_iters was planned from (a different one,
    # say from a --config file, would be refused).
    assert experiment.run_command(run, plan, {"bias": True}, resume=True)[-3:] == ["--time_budget", "120",
                                                                                  "--resume"]


def test_ablation_spec_parses(monkeypatch):
    monkeypatch.chdir(REPO)  # its config path is relative to the repository, where its command runs (reads only)
    spec = experiment.read_spec(str(REPO / "experiments" / "ablation.yaml"))
    plan = experiment.make_plan(spec, "ablation", experiment.playground_options())
    assert plan.baseline == "gpt2" and len(plan.seeds) == 3 and plan.budget == {"time_budget": 60}


def test_mean_band_uses_the_x_range_every_seed_covers():
    # Curve 1: y = x + 1 at x = 0, 1, 2; curve 2: y = 2 at x = 0.5, 1.5, 2.5. Common range [0.5, 2]: at
    # x = 0.5, 1, 1.5, 2 curve 1 is 1.5, 2, 2.5, 3 and curve 2 is 2 throughout.
    x, mid, low, high = report.mean_band([([0, 1, 2], [1, 2, 3]), ([0.5, 1.5, 2.5], [2, 2, 2])])
    assert x == [0.5, 1, 1.5, 2]
    assert mid == pytest.approx([1.75, 2, 2.25, 2.5])
    assert low == pytest.approx([1.5, 2, 2, 2]) and high == pytest.approx([2, 2, 2.5, 3])


def test_seeds_that_share_no_step_are_drawn_as_points():
    # Under a time budget each run evaluates once, at the step count its speed chose (here 759, 693, 792): no x
    # is inside every seed's range, so there is no mean curve to draw, and the chart shows every seed's point.
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [([759], [2.317]), ([693], [2.308]), ([792], [2.322])]
    assert report.mean_band(curves)[0] == []
    fig, ax = plt.subplots()
    report.draw_variant(ax, curves, "C0", "record (n=3)")
    assert [list(p) for p in ax.collections[0].get_offsets()] == [[759, 2.317], [693, 2.308], [792, 2.322]]
    assert ax.get_legend_handles_labels()[1] == ["record (n=3)"]
    plt.close(fig)


def test_one_seed_shows_n_a_for_intervals_and_p():
    variants = [planning.Variant(n, {}, {}, 10) for n in ("base", "other")]
    plan = planning.Plan("p", "out/p", "base", [1], {"max_iters": 10}, variants)
    results = [report.RunResult(n, 1, 10, bpb, 1.0, 100.0, 5.0, 1000, []) for n, bpb in
               (("base", 2.0), ("other", 1.9))]
    rows = report.summarise(plan, results)
    assert rows[1]["diff"] == pytest.approx(-0.1) and math.isnan(rows[1]["p"])
    text = report.report_markdown(plan, rows, ["other/seed2"], has_png=False)
    other = next(line for line in text.splitlines() if line.startswith("| other |"))
    cells = [c.strip() for c in other.strip("|").split("|")]
    assert cells[:4] == ["other", "1", "1.9000", "n/a"] and cells[-3:] == ["-0.1000 (n=1)", "n/a", "n/a"]
    assert "- other/seed2" in text and "curves.png" not in text


def test_a_benchmark_in_the_spec_reports_each_variants_blimp_mean_and_paired_difference(sweep):
    spec, out = sweep
    blimp_data = REPO / "tests" / "data" / "blimp_tiny"
    with_blimp = spec.parent / "with_blimp.yaml"
    with_blimp.write_text(spec.read_text() + f"name: sweep\nbenchmark: {{blimp: {blimp_data}}}\n")
    experiment.main([str(with_blimp), "--report", str(out)])
    scores = {}
    for variant, seed in RUNS:
        model, tokenizer = model_from_checkpoint(load_checkpoint(run_folder(out, variant, seed) / "ckpt.tar"))
        results = blimp.score_paradigms(model, tokenizer, blimp.read_paradigms(blimp_data))
        scores[variant, seed] = blimp.summary(results)["overall"]
    saved = {run: (run_folder(out, *run) / "blimp.json").stat().st_mtime_ns for run in RUNS}
    text = (out / "report.md").read_text()
    section = text[text.index("## BLiMP"):text.index("## Variants")]
    a = next(line for line in section.splitlines() if line.startswith("| a |"))
    b = next(line for line in section.splitlines() if line.startswith("| b |"))
    assert a.startswith(f"| a | 2 | {(scores['a', 1337] + scores['a', 1338]) / 2:.4f} |") and "| baseline |" in a
    diff = (scores["b", 1337] - scores["a", 1337] + scores["b", 1338] - scores["a", 1338]) / 2
    assert f"| {diff:+.4f} (n=2) |" in b
    experiment.main([str(with_blimp), "--report", str(out)])  # scored once: kept beside each checkpoint
    assert {run: (run_folder(out, *run) / "blimp.json").stat().st_mtime_ns for run in RUNS} == saved
    for run in RUNS:
        (run_folder(out, *run) / "blimp.json").unlink()


# ----------------------------------------------------------------------------- reruns keep what they made

def test_a_finished_run_whose_metrics_are_gone_or_torn_is_kept_not_retrained(sweep, capsys):
    spec, out = sweep
    torn, gone = run_folder(out, "a", 1337), run_folder(out, "a", 1338)
    lines = (torn / "ckpt.metrics.jsonl").read_text().splitlines()
    (torn / "ckpt.metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10])
    saved = (gone / "ckpt.metrics.jsonl").read_text()
    (gone / "ckpt.metrics.jsonl").unlink()
    before = {k: v for k, v in stamps(out).items() if "ckpt.tar" in k}
    experiment.main([str(spec)])
    assert {k: v for k, v in stamps(out).items() if "ckpt.tar" in k} == before  # no checkpoint retrained
    text = capsys.readouterr().out
    assert "4 finished" in text and "a/seed1337 (its final evaluation is missing" in text
    (gone / "ckpt.metrics.jsonl").write_text(saved)
    (torn / "ckpt.metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_a_run_trained_with_other_settings_than_its_variant_now_has_is_refused(sweep):
    spec, out = sweep
    before = stamps(out)
    edited = spec.parent / "edited.yaml"
    edited.write_text(spec.read_text().replace("lr: 0.003", "lr: 0.001") + "name: sweep\n")
    with pytest.raises(UsageError, match=r"b/seed1337 was trained with lr=0.003, but variant 'b' now has "
                                         r"lr=0.001"):
        experiment.main([str(edited)])
    assert stamps(out) == before


def test_duplicate_keys_in_the_spec_are_refused(tmp_path, data):
    spec = write_spec(tmp_path, data)
    spec.write_text(spec.read_text().replace("variants:\n", "variants:\n  b: {}\n"))
    with pytest.raises(UsageError, match="duplicate key 'b'"):
        experiment.main([str(spec)])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    ({"grid": {"lr": [0.001, 1.0e-3]}, "variants": None}, "grid values print alike: lr=0.001 twice"),
    ({"variants": {"a": {}, "report.md": {}}}, "'report.md' is a name the runner uses for its own files"),
    ({"variants": {"a": {}, "b": {"corpus": "EMPTY"}}}, "variant 'b': no .txt files in"),
    ({"variants": {"a": {}, "b": {"block_size": 4096}}}, "variant 'b': its validation text"),
    ({"variants": {"a": {}, "b": {"block_size": 1800}}}, "tokens) is shorter than block_size + 1 = 1801"),
])
def test_every_variant_is_checked_before_the_first_run(tmp_path, data, capsys, change, message):
    (tmp_path / "empty").mkdir()
    change = json.loads(json.dumps(change).replace("EMPTY", str(tmp_path / "empty")))
    spec = write_spec(tmp_path, data, **change)
    if change.get("variants", ...) is None:
        spec.write_text("\n".join(line for line in spec.read_text().splitlines() if "variants" not in line))
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: experiment.main([str(spec)]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ['{"name": "sweep", "fold', "[]", '{"name": "sweep"}',
                                     '{"name": "s", "folder": "f", "baseline": "a", "seeds": "3", "budget": {}, '
                                     '"variants": [{"name": "a"}]}'])
def test_report_on_a_damaged_plan_file_is_one_error_line(tmp_path, capsys, content):
    (tmp_path / "experiment.json").write_text(content)
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: experiment.main(["--report", str(tmp_path)]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "experiment.json is damaged" in err[0], err


def test_a_masked_lm_variant_is_not_compared_with_a_causal_baseline():
    variants = [planning.Variant(n, {}, {}, 10) for n in ("gpt", "bert")]
    plan = planning.Plan("p", "out/p", "gpt", [1, 2], {"max_iters": 10}, variants)
    results = [report.RunResult("gpt", s, 10, 2.0 + s / 10, 1.0, 100.0, 5.0, 1000, [], "clm") for s in (1, 2)] + \
              [report.RunResult("bert", s, 10, math.nan, 1.0, 100.0, 5.0, 1000, [], "mlm") for s in (1, 2)]
    text = report.report_markdown(plan, report.summarise(plan, results), [], has_png=False)
    bert = next(line for line in text.splitlines() if line.startswith("| bert |"))
    assert "nan" not in bert and "not comparable (mlm vs the baseline's clm)" in bert


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_runner_stops_its_run_cleanly(tmp_path, data, sig):
    """SIGTERM or SIGINT sent to experiment.py alone reaches the run it trains (once), which saves and exits;
    the runner records it, starts no other run and exits 128 + the signal."""
    fake = tmp_path / "fake_playground.py"
    fake.write_text("import signal, sys, time\n"
                    "def stop(signum, frame):\n"
                    "    print(f'got signal {signum}', flush=True)\n"
                    "    sys.exit(128 + signum)\n"
                    "signal.signal(signal.SIGTERM, stop)\nsignal.signal(signal.SIGINT, stop)\n"
                    "print('training', flush=True)\ntime.sleep(60)\n")
    spec = write_spec(tmp_path, data, variants={"a": {}})
    runner = (f"import sys; sys.path.insert(0, {str(REPO)!r}); import experiment; from pathlib import Path; "
              f"from gptlab.errors import run_cli; "
              f"experiment.PLAYGROUND = Path({str(fake)!r}); run_cli(lambda: experiment.main([{str(spec)!r}]))")
    proc = subprocess.Popen([sys.executable, "-c", runner], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = tmp_path / "out" / "sweep" / "a" / "seed1337" / "run.log"
    deadline = time.time() + 60
    while not (log.exists() and "training" in log.read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "no start"
        time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig, err
    assert log.read_text().count(f"got signal {int(sig)}") == 1
    result = json.loads((log.parent / "result.json").read_text())
    assert result["returncode"] == 128 + sig
    assert not (log.parent.parent / "seed1338").exists()  # the queued run never started
    assert "Traceback" not in err
