"""The README is a path a newcomer can walk: its commands, run in README order in a fresh copy of the repository,
each exit with status 0 and leave the files they promise. Only budget flags are appended (fewer steps, smaller
models, fewer tokens), so the whole path takes seconds; a command this test has no budget for, or no reason not
to run, fails it, so a new README command is checked from the day it is added."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from command_path import (
    FEW_STEPS,
    REPO,
    SHORT_BUDGET,
    TINY,
    Budgets,
    budget_for,
    commands_in,
    isolate,
    run_checked,
    tracked_copy,
    without_pip,
)

# What is appended to each README command, found by the first of these strings it contains; None: not run here.
BUDGETS: Budgets = [
    ("bash tests/run.sh", None),  # the test suite itself (this test is in it)
    ("experiment.py", None),  # 48 runs of 60 s; its own tests (tests/test_experiment.py) run it small
    ("torchrun", None),  # 8 processes of a GPU config (GPT-2 small); tests/test_distributed.py runs torchrun
    ("configs/cpu_speedrun.yaml", [*SHORT_BUDGET, "--sample_tokens", "20"]),  # the quick start's model, whole
    ("--time_budget", [*TINY, "--vocab_size", "300", *SHORT_BUDGET, "--sample_tokens", "0"]),
    ("--resume", ["--max_iters", "4"]),
    ("configs/modern.yaml", FEW_STEPS),
    ("playground.py", [*TINY, *FEW_STEPS]),
    ("train_tokenizer.py", []),
    ("prepare_data.py", []),
    ("generate.py", ["--max_new_tokens", "20"]),
    ("evaluate.py", []),
    ("make_finetune_example.py", ["--per_play", "10"]),
    ("finetune.py", ["--epochs", "1"]),
    ("export.py", []),
    ("pip install", []),  # the environment running the suite has the packages: dropped by without_pip
]


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory) -> Path:
    """The repository's tracked files, as a fresh clone has them."""
    return tracked_copy(tmp_path_factory.mktemp("clone"))


@pytest.mark.slow
def test_every_readme_command_runs_as_written_in_readme_order(fresh_copy, monkeypatch):
    isolate(monkeypatch, fresh_copy)
    # BLiMP is downloaded by the user (the README says from where); a few of its pairs stand in for it here.
    shutil.copytree(REPO / "tests" / "data" / "blimp_tiny", fresh_copy / "blimp" / "data")
    ran = []
    for command in commands_in(REPO / "README.md"):
        flags = budget_for(command, BUDGETS, "README")
        command = without_pip(command)
        if flags is None or not command:
            continue
        ran.append((command, run_checked(command, flags, fresh_copy)))
    outputs = dict(ran)
    quick_start = ran[0][0]
    assert "configs/cpu_speedrun.yaml" in quick_start
    # what the quick start says it leaves
    for name in ("model_checkpoint.metrics.jsonl", "model_checkpoint.loss.png"):
        assert (fresh_copy / name).exists()  # beside the checkpoint
    assert list((fresh_copy / "runs").glob("tokenizer-bbpe768-*.json"))
    resumed = next(out for command, out in ran if "--resume" in command)
    assert "resumed from step 2 of baseline.tar" in resumed
    assert (fresh_copy / "train.csv").exists() and (fresh_copy / "val.csv").exists()
    assert (fresh_copy / "my-gguf" / "Modelfile").exists() and (fresh_copy / "my-model" / "config.json").exists()
    assert "Qwen3ForCausalLM" in next(out for command, out in outputs.items() if "--out my-model" in command)
    assert len(ran) >= 14


@pytest.mark.slow
def test_the_suite_passes_where_the_quick_start_ran(tmp_path, monkeypatch):
    """A newcomer runs the README's two commands in order in one folder: the second (the suite) must not meet
    what the first left there (model_checkpoint.tar, runs/). The quick start runs with a budget flag, then the
    suite's smoke subset, whose tests use default output paths, runs in the same folder and passes."""
    copy = tracked_copy(tmp_path / "clone")
    isolate(monkeypatch, copy)
    quick_start = without_pip(next(c for c in commands_in(REPO / "README.md") if "playground.py" in c))
    run_checked(quick_start, budget_for(quick_start, BUDGETS, "README"), copy, leaves=["model_checkpoint.tar"])
    suite = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "smoke", "-p", "no:cacheprovider",
                            "--basetemp", str(tmp_path / "inner")], cwd=copy, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL)
    assert suite.returncode == 0, suite.stdout[-3000:]
    assert re.search(r"\b[1-9]\d* passed", suite.stdout) and "failed" not in suite.stdout, suite.stdout[-3000:]


def test_the_readme_is_a_front_page():
    """Issue 41: at most 200 lines, the CPU build of torch said before the quick start's first command, and the
    records' history and the correction of a leaking figure left to docs/speedrun.md."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    commands = commands_in(REPO / "README.md")
    cpu_torch = next(i for i, c in enumerate(commands) if "whl/cpu" in c)
    quick_start = next(i for i, c in enumerate(commands) if "playground.py" in c)
    assert cpu_torch < quick_start
    assert "leaking tokenizer" not in text and "| seed |" not in text
    assert "docs/speedrun.md" in text  # where the history and the correction went
