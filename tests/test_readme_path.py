"""The README is a path a newcomer can walk: its commands, run in README order in a fresh copy of the repository,
each exit with status 0 and leave the files they promise. Only budget flags are appended (fewer steps, smaller
models, fewer tokens), so the whole path takes seconds; a command this test has no budget for, or no reason not
to run, fails it, so a new README command is checked from the day it is added."""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = ["--embedding_dim", "32", "--num_of_layers", "1", "--num_of_heads", "2", "--block_size", "32"]
FEW_STEPS = ["--max_iters", "2", "--eval_interval", "2", "--eval_iters", "1", "--batch_size", "2",
             "--sample_tokens", "0"]
# A time budget plans its steps after 23 timed ones: 1 s (which cannot be met) stops the run there.
SHORT_BUDGET = ["--time_budget", "1", "--eval_iters", "1", "--batch_size", "2"]

# What is appended to each README command, found by the first of these strings it contains; None: not run here.
BUDGETS: list[tuple[str, list[str] | None]] = [
    ("bash tests/run.sh", None),  # the test suite itself (this test is in it)
    ("experiment.py", None),  # 48 runs of 60 s; its own tests (tests/test_experiment.py) run it small
    ("torchrun", None),  # 8 processes of a GPU config (GPT-2 small); tests/test_distributed.py runs torchrun
    ("configs/cpu_speedrun.yaml", [*SHORT_BUDGET, "--sample_tokens", "20"]),  # the quick start's model, whole
    ("--time_budget", [*TINY, "--vocab_size", "300", *SHORT_BUDGET, "--sample_tokens", "0"]),
    ("--resume", ["--max_iters", "4"]),
    ("configs/modern.yaml", FEW_STEPS),
    ("playground.py", [*TINY, *FEW_STEPS]),
    ("train_tokenizer.py", []),
    ("generate.py", ["--max_new_tokens", "20"]),
    ("evaluate.py", []),
    ("make_finetune_example.py", ["--per_play", "10"]),
    ("finetune.py", ["--epochs", "1"]),
    ("export.py", []),
    ("pip install", []),  # the environment running the suite has the packages: dropped by without_pip
]


def readme_commands() -> list[str]:
    """Each command of the README's ```bash blocks, in order: continuation lines joined, comments dropped."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()  # (no README command has a # inside quotes)
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def budget_for(command: str) -> list[str] | None:
    for key, flags in BUDGETS:
        if key in command:
            return flags
    raise AssertionError(f"README command without a budget here: {command!r}: add it to BUDGETS (flags that make "
                         f"it run in seconds, or None with the reason it cannot run in the suite)")


def without_pip(command: str) -> str:
    """The command without its `pip install ...` steps (the environment running the suite has the packages)."""
    return " && ".join(part for part in command.split(" && ") if not part.strip().startswith("pip "))


def promised_files(command: str) -> list[str]:
    """The files a command says it leaves: the checkpoint a training run writes, --out, --predictions."""
    args = shlex.split(command.split("|")[-1])
    named = {flag: args[i + 1] for i, flag in enumerate(args[:-1]) if flag.startswith("--")}
    files = [named[flag] for flag in ("--out", "--predictions") if flag in named]
    if "playground.py" in command:
        files.append(named.get("--checkpoint", "model_checkpoint.tar"))
    if "finetune.py" in command and "--predict" not in named:
        files.append(named.get("--out", "finetuned.tar"))
    return files


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory) -> Path:
    """The repository's tracked files, as a fresh clone has them."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: the tracked files are unknown")
    copy = tmp_path_factory.mktemp("clone")
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    return copy


@pytest.mark.slow
def test_every_readme_command_runs_as_written_in_readme_order(fresh_copy, monkeypatch):
    # The copy's own code, whatever the editable install points at (preprocessing/ imports the package).
    monkeypatch.setenv("PYTHONPATH", str(fresh_copy))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Tiny models gain nothing from a second thread, and on a busy CI machine spinning threads cost a lot.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    python = shlex.quote(sys.executable)
    ran = []
    for command in readme_commands():
        flags = budget_for(command)
        command = without_pip(command)
        if flags is None or not command:
            continue
        line = re.sub(r"(^|\| )python ", rf"\1{python} ", command) + " " + shlex.join(flags)
        done = subprocess.run(["bash", "-c", line], cwd=fresh_copy, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        missing = [f for f in promised_files(command) if not (fresh_copy / f).exists()]
        assert not missing, f"{command} left no {missing}"
        ran.append((command, done.stdout))
    outputs = dict(ran)
    quick_start = ran[0][0]
    assert "configs/cpu_speedrun.yaml" in quick_start
    # what the quick start says it leaves
    for name in ("model_checkpoint.metrics.jsonl", "model_checkpoint.loss.png"):
        assert (fresh_copy / "runs" / name).exists()
    assert list((fresh_copy / "runs").glob("tokenizer-bbpe2048-*.json"))
    resumed = next(out for command, out in ran if "--resume" in command)
    assert "resumed from step 2 of baseline.tar" in resumed
    assert (fresh_copy / "train.csv").exists() and (fresh_copy / "val.csv").exists()
    assert (fresh_copy / "my-gguf" / "Modelfile").exists() and (fresh_copy / "my-model" / "config.json").exists()
    assert "Qwen3ForCausalLM" in next(out for command, out in outputs.items() if "--out my-model" in command)
    assert len(ran) >= 14
