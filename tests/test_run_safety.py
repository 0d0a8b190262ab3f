"""playground.py keeps earlier work safe and its runs honest: a fresh run never replaces a checkpoint, a second
run on a checkpoint in use is refused, Ctrl-C saves the step it stopped at, resume cuts the metrics back to the
checkpoint and refuses what would silently do nothing or mix tokenizers, --time_budget fits its budget, and a
model that cannot fit is refused before it is allocated."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import corpus_slice

import playground
from config import parse_settings
from gptlab import pacing
from gptlab.checkpoint import load_checkpoint
from gptlab.errors import UsageError, run_cli
from gptlab.fileio import RunLock
from gptlab.tokenizer import corpus_files, iter_corpus, train_tokenizer

REPO = Path(__file__).resolve().parent.parent
TINY = ["--embedding_dim", "32", "--num_of_layers", "1", "--num_of_heads", "2", "--block_size", "16",
        "--batch_size", "4", "--eval_iters", "1", "--log_interval", "1", "--warmup_iters", "2", "--lr", "3e-3",
        "--sample_tokens", "0", "--dropout", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return corpus_slice(tmp_path_factory.mktemp("corpus"), 30_000)


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(corpus_files([corpus]), "bbpe", 300, show_progress=False).save(path)
    return path


def args(tmp_path: Path, corpus: Path, tokenizer: Path, *extra: str) -> list[str]:
    return [str(corpus), "--tokenizer", str(tokenizer), "--out_dir", str(tmp_path / "runs"),
            "--checkpoint", str(tmp_path / "ckpt.tar"), *TINY, *extra]


def train(argv: list[str]) -> dict[str, float]:
    c, set_by_flags, in_yaml = parse_settings(argv)
    return playground.train(c, set_by_flags, in_yaml=in_yaml)


def metric_steps(tmp_path: Path) -> list[int]:
    rows = (tmp_path / "ckpt.metrics.jsonl").read_text().splitlines()
    return [json.loads(r)["step"] for r in rows if '"loss"' in r]


def test_a_fresh_run_never_replaces_a_checkpoint(tmp_path, corpus, tokenizer):
    train(args(tmp_path, corpus, tokenizer, "--max_iters", "4", "--eval_interval", "4"))
    before = (tmp_path / "ckpt.tar").read_bytes()
    with pytest.raises(UsageError, match="already exists: continue it with --resume"):
        train(args(tmp_path, corpus, tokenizer, "--max_iters", "2"))
    assert (tmp_path / "ckpt.tar").read_bytes() == before
    assert metric_steps(tmp_path) == [1, 2, 3, 4]  # the earlier run's metrics are kept too
    train(args(tmp_path, corpus, tokenizer, "--max_iters", "2", "--eval_interval", "2", "--overwrite"))
    saved = load_checkpoint(tmp_path / "ckpt.tar")
    assert saved["iteration"] == 2
    assert "scaler" in saved  # the loss scaler's state (float16 runs; empty when the scaler is off)
    assert len(saved["rng"]["torch"]) == 1  # one process: its dropout RNG


def test_tokens_per_second_leaves_out_checkpoint_writes(tmp_path, corpus, tokenizer, monkeypatch):
    # Each save moves the throughput meter's clock on by 1000 s (a real sleep would make the test as slow, and
    # a loaded machine's slow steps could pass for it).
    offset = [0.0]
    monkeypatch.setattr(pacing, "time", SimpleNamespace(perf_counter=lambda: time.perf_counter() + offset[0]))
    real_save = playground.save_checkpoint
    monkeypatch.setattr(playground, "save_checkpoint", lambda *a: (offset.__setitem__(0, offset[0] + 1000),
                                                                  real_save(*a)))
    train(args(tmp_path, corpus, tokenizer, "--max_iters", "8", "--checkpoint_interval", "2", "--eval_interval",
               "100"))
    rows = [json.loads(r) for r in (tmp_path / "ckpt.metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    # A save counted in an interval of 64-token steps would show as under 1 token/s; a step taking 64 s would too.
    assert len(rates) >= 4 and min(rates) > 1.0, rates


def test_resume_refuses_what_would_do_nothing_or_change_the_tokenizer(tmp_path, corpus, tokenizer):
    train(args(tmp_path, corpus, tokenizer, "--max_iters", "3", "--eval_interval", "3"))
    ckpt = str(tmp_path / "ckpt.tar")
    with pytest.raises(UsageError, match="already at step 3: give a --max_iters above it"):
        train(["--resume", "--checkpoint", ckpt, "--max_iters", "2"])
    other = tmp_path / "other.json"
    train_tokenizer(corpus_files([corpus]), "bpe", 200, show_progress=False).save(other)
    with pytest.raises(UsageError, match="is not the tokenizer"):
        train(["--resume", "--checkpoint", ckpt, "--max_iters", "5", "--tokenizer", str(other)])
    with pytest.raises(UsageError, match="--optimizer muon differs from the checkpoint's adamw"):
        train(["--resume", "--checkpoint", ckpt, "--max_iters", "5", "--optimizer", "muon"])
    # A flag typed on resume is applied or refused, never dropped (a budget counts the whole run: spent already).
    with pytest.raises(UsageError, match=r"--time_budget 0.001 counts the whole run's wall time, and .* has trained "
                                         r"[\d.]+s already"):
        train(["--resume", "--checkpoint", ckpt, "--max_iters", "100000", "--time_budget", "0.001"])
    with pytest.raises(UsageError, match="--init_from starts a fresh run"):
        train(["--resume", "--checkpoint", ckpt, "--max_iters", "5", "--init_from", str(tmp_path)])


def test_resume_applies_or_refuses_a_config_file_as_it_does_flags(tmp_path, corpus, tokenizer, capsys):
    """`--config x.yaml --resume`: the file's settings are applied where a resume may change them, and refused,
    naming the setting, where they would change the model; never silently dropped."""
    train(args(tmp_path, corpus, tokenizer, "--max_iters", "2", "--eval_interval", "2"))
    ckpt = tmp_path / "ckpt.tar"
    before = ckpt.read_bytes()
    wider = tmp_path / "wider.yaml"
    wider.write_text("embedding_dim: 64\nmax_iters: 3\n")
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: playground.main(["--config", str(wider), "--resume", "--checkpoint", str(ckpt)]))
    assert e.value.code == 2 and ckpt.read_bytes() == before
    assert capsys.readouterr().err == ("error: --embedding_dim (from --config) 64 differs from the checkpoint's 32: a "
                                       "checkpoint resumes only with the model and optimizer it was trained with\n")
    longer = tmp_path / "longer.yaml"
    longer.write_text("embedding_dim: 32\nmax_iters: 3\neval_interval: 3\n")  # the same model, trained longer
    train(["--config", str(longer), "--resume", "--checkpoint", str(ckpt)])
    assert load_checkpoint(ckpt)["iteration"] == 3


def test_a_second_run_on_a_checkpoint_in_use_is_refused(tmp_path, corpus, tokenizer):
    with RunLock(tmp_path / "ckpt.tar"):  # another live run holds it
        with pytest.raises(UsageError, match="another run is using"):
            train(args(tmp_path, corpus, tokenizer, "--max_iters", "2"))
    assert not (tmp_path / "ckpt.tar").exists()
    train(args(tmp_path, corpus, tokenizer, "--max_iters", "2", "--eval_interval", "2"))  # free again


def test_resume_after_a_kill_logs_each_step_once(tmp_path, corpus, tokenizer):
    """A run killed after its step-4 checkpoint had logged steps 5 and 6 (and half of 7): on resume those lines
    are cut, and the steps are logged again as they are redone."""
    train(args(tmp_path, corpus, tokenizer, "--max_iters", "4", "--eval_interval", "4"))
    metrics = tmp_path / "ckpt.metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 5, "loss": 1.0}\n{"step": 6, "loss": 1.0}\n{"step": 7, "lo')
    train(["--resume", "--checkpoint", str(tmp_path / "ckpt.tar"), "--max_iters", "8"])
    assert metric_steps(tmp_path) == list(range(1, 9))


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_save_the_step_they_stopped_at(tmp_path, corpus, tokenizer, sig, status):
    """SIGTERM (timeout, docker, Kubernetes, SLURM) is a Ctrl-C: save at the end of the step, free the lock,
    exit 128 + 15."""
    cmd = [sys.executable, str(REPO / "playground.py"),
           *args(tmp_path, corpus, tokenizer, "--max_iters", "100000", "--checkpoint_interval", "100000",
                 "--eval_interval", "100000")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = tmp_path / "ckpt.metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    assert not (tmp_path / "ckpt.tar.lock").exists()
    saved = load_checkpoint(tmp_path / "ckpt.tar")
    assert 3 <= saved["iteration"] < 100000
    assert f"stopped at step {saved['iteration']}" in err and "Traceback" not in err
    assert max(metric_steps(tmp_path)) == saved["iteration"]



def test_ctrl_c_arriving_late_in_a_step_stops_after_the_next_saved_step(tmp_path, corpus, tokenizer, monkeypatch,
                                                                        capsys):
    """A Ctrl-C that lands after the loop decided whether this step saves (here: while step 2 is logged) must
    not stop the run at that step unsaved: it stops at the end of the next step, with that step saved."""
    log_step = playground.log_step

    def ctrl_c_while_logging(run, *rest):
        log_step(run, *rest)
        if run.iteration == 2:
            run.stop.requested = True  # what the SIGINT handler does

    monkeypatch.setattr(playground, "log_step", ctrl_c_while_logging)
    with pytest.raises(KeyboardInterrupt):
        train(args(tmp_path, corpus, tokenizer, "--max_iters", "100", "--checkpoint_interval", "100",
                   "--eval_interval", "100"))
    assert load_checkpoint(tmp_path / "ckpt.tar")["iteration"] == 3
    assert "stopped at step 3" in capsys.readouterr().err

def test_time_budget_fixes_max_iters_to_fit_and_lands_near_the_budget(tmp_path, corpus, tokenizer):
    # The machine measured first: the budget leaves room for the steps before the first plan however loaded it is.
    start = time.perf_counter()
    first_plan = pacing.UNTIMED_STEPS + pacing.TIMED_STEPS
    (tmp_path / "timing").mkdir()
    train(args(tmp_path / "timing", corpus, tokenizer, "--max_iters", str(first_plan), "--eval_interval", "50"))
    budget = max(12.0, 6 * (time.perf_counter() - start))
    start = time.perf_counter()
    train(args(tmp_path, corpus, tokenizer, "--time_budget", str(budget), "--eval_interval", "50"))
    seconds = time.perf_counter() - start
    rows = [json.loads(r) for r in (tmp_path / "ckpt.metrics.jsonl").read_text().splitlines()]
    plans = [(r["step"], r["planned_max_iters"]) for r in rows if "planned_max_iters" in r]
    saved = load_checkpoint(tmp_path / "ckpt.tar")
    # Planned first after the timed steps, then again at quarters of the steps left, until BUDGET_CHECKS plans or
    # too few steps left to time again: how many depends on the machine's speed (load), the rule does not.
    assert plans[0][0] == first_plan
    for (step, planned), (next_step, _) in zip(plans, plans[1:], strict=False):
        assert next_step == step + (planned - step) // 4 and planned - step >= 4 * pacing.TIMED_STEPS
    last_step, last_plan = plans[-1]
    assert len(plans) == pacing.BUDGET_CHECKS or last_plan - last_step < 4 * pacing.TIMED_STEPS
    assert saved["iteration"] == last_plan > pacing.UNTIMED_STEPS + pacing.TIMED_STEPS
    assert saved["config"]["max_iters"] == last_plan and saved["config"]["time_budget"] is None
    # Lands near the budget: the plans fit it at the speed measured. A machine whose load grows after the last plan
    # (3x slower for the steps left, at most a quarter of the run) overshoots by up to half of it, plus the save.
    assert budget * 0.5 < seconds < budget * 2, seconds
    assert 0 <= seconds - rows[-1]["time_s"] < budget * 0.5  # the last row is logged at the end, not the start


def test_a_time_budget_that_cannot_be_met_says_so_and_what_would_fit(tmp_path, corpus, tokenizer, capsys):
    train(args(tmp_path, corpus, tokenizer, "--time_budget", "0.01", "--eval_interval", "50"))
    said = [line for line in capsys.readouterr().out.splitlines() if "cannot be met" in line]
    first_plan = pacing.UNTIMED_STEPS + pacing.TIMED_STEPS
    assert len(said) == 1 and f"stops at step {first_plan}; --time_budget " in said[0], said
    assert load_checkpoint(tmp_path / "ckpt.tar")["iteration"] == first_plan


def test_a_time_budget_typed_on_resume_bounds_the_run_and_says_how_it_meets_max_iters(tmp_path, corpus, tokenizer,
                                                                                     capsys):
    train(args(tmp_path, corpus, tokenizer, "--time_budget", "0.01", "--eval_interval", "50"))  # planned at once
    ckpt = tmp_path / "ckpt.tar"
    first = load_checkpoint(ckpt)
    settings = tmp_path / "settings.yaml"
    settings.write_text("time_budget: 0.02\n")  # a budget counts the whole run's wall time: spent already
    with pytest.raises(UsageError, match=r"--time_budget \(from --config\) 0.02 counts the whole run's wall time"):
        train(["--config", str(settings), "--resume", "--checkpoint", str(ckpt), "--max_iters", "30"])
    # The budget it was planned from, with a far larger max_iters: it does not train on past its plan's end.
    with pytest.raises(UsageError, match=rf"already at step {first['iteration']}, the end its --time_budget 0.01 "
                                         rf"planned"):
        train(["--resume", "--checkpoint", str(ckpt), "--max_iters", "500000", "--time_budget", "0.01"])
    budget = first["seconds"] + 3
    capsys.readouterr()
    train(["--resume", "--checkpoint", str(ckpt), "--max_iters", "500000", "--time_budget", str(budget),
           "--eval_interval", "1000"])
    said = capsys.readouterr().out
    assert f"time budget {budget:g}s counts the whole run's wall time ({first['seconds']:.1f}s before this resume): " \
           f"max_iters is planned to fit, at most --max_iters 500000" in said
    saved = load_checkpoint(ckpt)
    plans = [json.loads(r).get("planned_max_iters") for r in (tmp_path / "ckpt.metrics.jsonl").open()]
    assert first["iteration"] < saved["iteration"] == [p for p in plans if p][-1] < 500000  # the budget's plan
    assert saved["planned_budget"] == budget


def test_a_model_that_cannot_fit_is_refused_before_allocation(tmp_path, corpus, tokenizer):
    with pytest.raises(UsageError, match=r"needs about [\d,.]+ TiB, but cpu has [\d,.]+ GiB"):
        train(args(tmp_path, corpus, tokenizer, "--max_iters", "1", "--num_of_layers", "100000",
                   "--embedding_dim", "8192", "--num_of_heads", "64"))
    assert not (tmp_path / "ckpt.tar").exists()


def test_muon_run_resumes_bit_exactly(tmp_path, corpus, tokenizer, capsys):
    common = ["--optimizer", "muon", "--eval_interval", "6", "--lr_schedule", "constant"]
    full = tmp_path / "full"
    train(args(full, corpus, tokenizer, *common, "--max_iters", "6"))
    part = tmp_path / "part"
    train(args(part, corpus, tokenizer, *common, "--max_iters", "3", "--checkpoint_interval", "3"))
    capsys.readouterr()
    train(["--resume", "--checkpoint", str(part / "ckpt.tar"), "--max_iters", "6"])
    assert f"resumed from step 3 of {part / 'ckpt.tar'}" in capsys.readouterr().out.splitlines()
    a, b = load_checkpoint(full / "ckpt.tar")["model"], load_checkpoint(part / "ckpt.tar")["model"]
    assert all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("earlier", ["ckpt.metrics.jsonl", "ckpt.loss.png"])
def test_a_fresh_run_never_replaces_an_earlier_runs_metrics_or_plot(tmp_path, corpus, tokenizer, earlier):
    """The checkpoint is gone (moved, or the run was killed before its first save), its metrics or plot stay."""
    (tmp_path / earlier).write_text("an earlier run's")
    with pytest.raises(UsageError, match=f"{earlier} already exists .*--overwrite"):
        train(args(tmp_path, corpus, tokenizer, "--max_iters", "2"))
    assert (tmp_path / earlier).read_text() == "an earlier run's"
    assert not (tmp_path / "ckpt.tar").exists()


def test_a_folder_as_checkpoint_is_refused_once_and_for_what_it_is(tmp_path, corpus, tokenizer):
    (tmp_path / "ckpt.tar").mkdir()
    for extra in ([], ["--overwrite"]):  # the first answer must not suggest what the second refuses
        with pytest.raises(UsageError, match="ckpt.tar is a folder; give a file name inside it"):
            train(args(tmp_path, corpus, tokenizer, "--max_iters", "2", *extra))


def test_a_text_of_blank_lines_is_named_for_what_it_holds(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n" * 8)
    with pytest.raises(UsageError, match=r"blank.txt holds only whitespace \(8 characters\)"):
        list(iter_corpus([blank]))


def test_a_max_iters_given_with_a_time_budget_is_the_most_it_plans():
    class Meter:  # 1 ms a step: a 100 s budget fits about 100,000 steps
        def step_seconds(self, step: int) -> float:
            return 1e-3

    def planned(cap: int | None) -> int:
        budget = pacing.TimeBudget(100.0, 1000, Meter(), lambda: 0.0, lambda: 0.0, lambda n: n, lambda _: None,
                                   lambda _: None, cap)
        return budget.plan(23)

    assert planned(None) > 90_000 and planned(500) == 500
