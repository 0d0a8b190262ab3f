"""A document's shell commands run as a reader runs them: in the document's order, in a fresh copy of the
repository, each with only budget flags appended (fewer steps, smaller models, fewer tokens), each checked for
exit status 0 and the files it says it leaves. Shared by test_readme_path.py (the README) and test_docs_path.py
(the docs' commands a user is most likely to copy)."""

import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = ["--embedding_dim", "32", "--num_of_layers", "1", "--num_of_heads", "2", "--block_size", "32"]
FEW_STEPS = ["--max_iters", "2", "--eval_interval", "2", "--eval_iters", "1", "--batch_size", "2",
             "--sample_tokens", "0"]
# A time budget plans its steps after 23 timed ones: 1 s (which cannot be met) stops the run there.
SHORT_BUDGET = ["--time_budget", "1", "--eval_iters", "1", "--batch_size", "2"]

# (a string a command contains, the flags appended to it); the first entry that matches decides, and None means
# the command is not run in the suite (a comment beside the entry says why).
Budgets = list[tuple[str, list[str] | None]]

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.S | re.M)


def commands_in(path: Path) -> list[str]:
    """Each command of a markdown file, in order: every line of its ```bash blocks, and each `$ ` line of its
    other blocks (a command shown with its output; one given earlier is that command's output shown, not a new
    step). Continuation lines are joined and comments dropped."""
    commands: list[str] = []
    for language, block in FENCE.findall(path.read_text(encoding="utf-8")):
        for line in block.replace("\\\n", " ").splitlines():
            if language != "bash":
                if not line.startswith("$ ") or line[2:].strip() in commands:
                    continue
                line = line[2:]
            line = re.sub(r"\s+#.*$", "", line).strip()  # (no documented command has a # inside quotes)
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def unmarked_commands(path: Path) -> list[str]:
    """Lines of blocks other than ```bash that start like a command but not with `$ `: commands_in misses them."""
    return [line for language, block in FENCE.findall(path.read_text(encoding="utf-8")) if language != "bash"
            for line in block.splitlines() if re.match(r"(python|bash|git|pip|torchrun|ollama) ", line)]


def budget_for(command: str, budgets: Budgets, where: str) -> list[str] | None:
    for key, flags in budgets:
        if key in command:
            return flags
    raise AssertionError(f"{where} command without a budget here: {command!r}: add it to BUDGETS (flags that make "
                         f"it run in seconds, or None with the reason it cannot run in the suite)")


def without_pip(command: str) -> str:
    """The command without its `pip install ...` steps (the environment running the suite has the packages)."""
    return " && ".join(part for part in command.split(" && ") if not part.strip().startswith("pip "))


def promised_files(command: str) -> list[str]:
    """The files a command's flags say it leaves: the checkpoint a training run writes, --out, --predictions,
    --out_dir."""
    args = shlex.split(command.split("|")[-1])
    named = {flag: args[i + 1] for i, flag in enumerate(args[:-1]) if flag.startswith("--")}
    files = [named[flag] for flag in ("--out", "--predictions", "--out_dir") if flag in named]
    if "playground.py" in command:
        files.append(named.get("--checkpoint", "model_checkpoint.tar"))
    if "finetune.py" in command:
        files.append(named.get("--predictions", "predictions.jsonl"))
        if "--predict" not in named:
            files.append(named.get("--out", "finetuned.tar"))
    return files


def tracked_copy(copy: Path) -> Path:
    """The repository's tracked files copied into `copy`, as a fresh clone has them."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: the tracked files are unknown")
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    return copy


def isolate(monkeypatch: pytest.MonkeyPatch, copy: Path) -> None:
    """The environment the commands run in: the copy's own code, whatever the editable install points at
    (preprocessing/ imports the package), and nothing that reaches the network."""
    monkeypatch.setenv("PYTHONPATH", str(copy))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Tiny models gain nothing from a second thread, and on a busy CI machine spinning threads cost a lot.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def run_checked(command: str, flags: list[str], copy: Path, leaves: Sequence[str] = ()) -> str:
    """Runs `command` + `flags` with bash in `copy` (`python` is this interpreter, also after `VAR=value`);
    asserts exit status 0 and that the files its flags name, and `leaves`, exist. Returns its stdout."""
    python = shlex.quote(sys.executable)
    line = re.sub(r"(^|[|&;(]\s*|\b[A-Z_][A-Z0-9_]*=\S*\s+)python(?=\s)", rf"\1{python}", command)
    done = subprocess.run(["bash", "-c", f"{line} {shlex.join(flags)}"], cwd=copy, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    missing = [f for f in [*promised_files(command), *leaves] if not (copy / f).exists()]
    assert not missing, f"{command} left no {missing}"
    return done.stdout
