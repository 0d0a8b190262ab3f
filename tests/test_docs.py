"""The docs say what the code does: every flag of every command is in docs/reference.md and every flag
docs/reference.md names exists; the README's file table lists exactly the top-level files and folders."""

import contextlib
import dataclasses
import io
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from gpt import GPTConfig

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "docs" / "reference.md"

# Each command line a user types, as the script and the arguments before --help.
COMMANDS = [
    ("playground.py",), ("generate.py",), ("evaluate.py",), ("finetune.py",), ("export.py",), ("experiment.py",),
    ("gpu_check.py",), ("bench.py", "train"), ("bench.py", "attention"), ("bench.py", "generate"),
    ("bench.py", "peers"), ("preprocessing/train_tokenizer.py",), ("preprocessing/bench_tokenizer.py",),
    ("preprocessing/bench_encoding.py",),
    ("preprocessing/prepare_data.py",),
]


def help_flags(script: str, *args: str) -> set[str]:
    """The flags of `python SCRIPT ARGS --help`'s usage lines (not the help texts, which name other flags), run in
    this process (each script reads sys.argv)."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stdout(out):
        monkeypatch.setattr(sys, "argv", [str(REPO / script), *args, "--help"])
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(REPO / script), run_name="__main__")
    assert exit_.value.code == 0, out.getvalue()
    return flags_in(out.getvalue().split("\n\n", 1)[0])


def flags_in(text: str) -> set[str]:
    """`--name` words, with argparse's `--no-name` folded into `--name`."""
    return {f"--{name}" for name in re.findall(r"(?<![\w-])--(?:no-)?([a-z][a-z0-9_]*)", text)} - {"--help"}


@pytest.fixture(scope="module")
def every_flag() -> dict[str, set[str]]:
    return {" ".join(command): help_flags(*command) for command in COMMANDS}


def test_every_flag_of_every_command_is_in_the_reference(every_flag):
    documented = flags_in(REFERENCE.read_text(encoding="utf-8"))
    missing = {command: sorted(flags - documented) for command, flags in every_flag.items() if flags - documented}
    assert not missing, f"flags missing from docs/reference.md: {missing}"


def test_every_flag_the_reference_names_exists(every_flag):
    known = set().union(*every_flag.values())
    unknown = flags_in(REFERENCE.read_text(encoding="utf-8")) - known
    assert not unknown, f"docs/reference.md names flags no command has: {sorted(unknown)}"


def documented_flags() -> dict[str, set[str]]:
    """Each command's flags where docs/reference.md lists them: its row of a flags table, playground.py's table
    by group, generate.py's paragraph."""
    text = REFERENCE.read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `([^`]+)` \| (.*) \|$", text, re.M))
    training = text.split("## Training flags", 1)[1].split("\n## ", 1)[0]
    rows["playground.py"] = "\n".join(line for line in training.splitlines() if line.startswith("| "))
    rows["generate.py"] = text.split("Flags of `generate.py`:", 1)[1].split("\n\n", 1)[0]
    return {command: flags_in(row) for command, row in rows.items()}


def test_each_command_is_listed_with_exactly_its_flags(every_flag):
    documented = documented_flags()
    wrong = {command: {"missing": sorted(flags - documented.get(command, set())),
                       "extra": sorted(documented.get(command, set()) - flags)}
             for command, flags in every_flag.items() if documented.get(command) != flags}
    assert not wrong, f"docs/reference.md lists other flags than the parsers take: {wrong}"


def test_the_reference_names_every_gptconfig_setting():
    text = REFERENCE.read_text(encoding="utf-8")
    said = re.search(r"`GPTConfig`'s (\d+) settings \(([^)]*)\)", text)
    fields = [f.name for f in dataclasses.fields(GPTConfig)]
    assert said and int(said[1]) == len(fields) and re.findall(r"`(\w+)`", said[2]) == fields


def test_the_readme_file_table_lists_every_top_level_entry():
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=REPO, check=True).stdout.split()
    top = {name.split("/")[0] + ("/" if "/" in name else "") for name in tracked} - {".gitignore", ".ci/"}
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme.split("## The files", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([^`]+)`", table, re.M)) | set(re.findall(r", `([^`]+)` \|", table))
    assert listed == top, f"README's file table: missing {sorted(top - listed)}, extra {sorted(listed - top)}"
