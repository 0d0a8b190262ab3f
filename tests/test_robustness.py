"""The README's promise, tested for classes of inputs and faults rather than for examples.

1. A generated sweep: every flag of every CLI, read from the parser the CLI itself builds (a new flag is
   covered without editing this file), gets hostile values chosen by its type. Each run ends in success or in
   exit 2 with one `error:` line (the last line on stderr), never a traceback, and no input file changes.
   The CLIs run in-process (importing torch once), with a tiny model, so the sweep takes seconds.
2. Fault injection: a full disk, a read-only file system, a kill in the middle of a save, two processes at once.
"""

import argparse
import csv
import dataclasses
import errno
import hashlib
import io
import json
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from tqdm import tqdm

import bench
import config
import evaluate
import finetune
import generate
import playground
from gpt import GPT, GPTConfig
from gptlab import checkpoint, cli, data, errors, speed
from gptlab.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from gptlab.errors import UsageError
from gptlab.fileio import RunLock, atomic_files, atomic_write_text, check_output, check_output_dir
from gptlab.tokenizer import Tokenizer, train_tokenizer
from preprocessing import train_tokenizer as train_tokenizer_cli

REPO = Path(__file__).resolve().parent.parent
HUGE = 2 ** 40  # in range for every integer type, yet far beyond any sane size or count


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Everything a CLI reads, in one folder whose files must never change: a corpus, a tokenizer, a tiny
    pretrained checkpoint, labelled CSV data and a fine-tuned checkpoint."""
    folder = tmp_path_factory.mktemp("inputs")
    corpus = folder / "corpus.txt"
    corpus.write_text((REPO / "data" / "shakespeare.txt").read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    tok = train_tokenizer([corpus], "bbpe", 300, show_progress=False, bert_tokens=True)
    tok.save(folder / "tok.json")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, embedding_dim=32, num_of_layers=1,
                          num_of_heads=2, dropout=0.0))
    ckpt = folder / "ck.tar"
    save_checkpoint({"model_config": dataclasses.asdict(model.config), "model": model.state_dict(),
                     "tokenizer": tok.to_json()}, ckpt)
    rows = [{"text": f"{w} {w}", "label": label} for w, label in
            (("cat", "animal"), ("saw", "tool"), ("dog", "animal"), ("axe", "tool"))] * 2
    for name in ("train.csv", "val.csv"):
        with open(folder / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(rows)
    finetune.fine_tune(finetune.FinetuneConfig(checkpoint=str(ckpt), train=str(folder / "train.csv"),
                                               val=str(folder / "val.csv"), out=str(folder / "ft.tar"),
                                               predictions=str(tmp_path_factory.mktemp("p") / "p.jsonl"),
                                               epochs=1, batch_size=4, device="cpu"))
    return {"folder": folder, "corpus": corpus, "tok": folder / "tok.json", "ckpt": ckpt,
            "train": folder / "train.csv", "val": folder / "val.csv", "ft": folder / "ft.tar"}


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def read_only_target() -> Path | None:
    """A path no one may create, root included (sysfs refuses new files); None where there is none."""
    if os.geteuid() != 0:
        return Path("/") / "gpt_experiments_robustness" / "out.tar"
    if Path("/sys").is_dir():
        return Path("/sys") / "gpt_experiments_robustness.tar"
    return None


# ---------------------------------------------------------------------------------------------- running a CLI

class Expired(BaseException):
    """Raised by the alarm in `invoke`: not an Exception, so no CLI's handler can swallow it."""


def invoke(main: Callable[[list[str]], None], argv: list[str], seconds: int = 300) -> tuple[int, str]:
    """Run main(argv) as its script does (inside errors.run_cli), in this process; (exit status, stderr).
    A traceback is written to the returned stderr as Python would print it. `seconds` only catches a hang: each
    command takes seconds on an idle machine, and a loaded one may be many times slower."""
    out, err = io.StringIO(), io.StringIO()

    def expire(*_: object) -> None:
        raise Expired(f"still running after {seconds}s: {argv}")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                errors.run_cli(lambda: main(argv))
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except Exception:
                traceback.print_exc(file=err)
                code = 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, err.getvalue()


def assert_clean(code: int, stderr: str, argv: list[str]) -> None:
    assert "Traceback" not in stderr, (argv, stderr)
    # 0: it ran; 2: a mistake, one error line; 3: training went bad (--lr=1e30 diverges), one `stopped:` line.
    assert code in (0, 2, 3), f"exit {code} for {shlex.join(argv[-6:])}: {stderr}"
    lines = [line for line in stderr.splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("error:")]
    if code == 2:
        assert len(error_lines) == 1 and lines[-1] == error_lines[0], (argv, stderr)
    else:
        assert not error_lines, (argv, stderr)
    if code == 3:
        assert lines[-1].startswith("stopped: ") and sum(line.startswith("stopped:") for line in lines) == 1, stderr


@dataclasses.dataclass
class Flag:
    name: str
    kind: type  # int, float, bool or str
    positional: bool


def flags_of(parser: argparse.ArgumentParser) -> list[Flag]:
    """Every setting a parser takes, with the type its text converts to."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            kind: type = bool
        else:
            kind = {"int": int, "float": float}.get(getattr(action.type, "__name__", ""), str)
        found.append(Flag(action.dest, kind, not action.option_strings))
    return found


def dataclass_parser(cls: type, positional: str | None = None) -> argparse.ArgumentParser:
    """The parser cli.parse_dataclass builds for `cls`."""
    parser = errors.CliParser(argument_default=argparse.SUPPRESS)
    cli.add_flags(parser, cls, positional)
    return parser


def hostile_values(flag: Flag, folder: Path) -> list[list[str]]:
    """Command-line words for one flag: what a careless or adversarial user might type."""
    if flag.kind is bool:
        return [[f"--{flag.name}"], [f"--no-{flag.name}"]]
    if flag.kind is int:
        texts = ["0", "-1", str(10 ** 30), str(HUGE), "abc", "2.5"]
    elif flag.kind is float:
        texts = ["0", "-1", "nan", "inf", "-inf", "1e30", "abc"]
    else:
        read_only = read_only_target()
        texts = ["", str(folder), "abc"] + ([str(read_only)] if read_only else [])
    return [[t] if flag.positional else [f"--{flag.name}={t}"] for t in texts]  # "=": so "-1" is not a flag


def with_flag(argv: list[str], flag: Flag, words: list[str]) -> list[str]:
    """argv without any setting of the option `flag`, then `words` appended."""
    out, skip_value = [], False
    for word in argv:
        if skip_value:
            skip_value = False
            if not word.startswith("--"):
                continue
        if word in (f"--{flag.name}", f"--no-{flag.name}") or word.startswith(f"--{flag.name}="):
            skip_value = flag.kind is not bool
            continue
        out.append(word)
    return out + words


@dataclasses.dataclass
class Sweep:
    """One CLI: its parser, its main, a fast valid command line, and the flags whose huge values would
    legitimately start a long job: a HUGE count, or a switch like --compile (minutes of C++ compilation on a
    CPU). For those only the parse is checked."""

    parser: argparse.ArgumentParser
    main: Callable[[list[str]], None]
    argv: Callable[[int], list[str]]  # the i-th run's valid command line (fresh outputs each run)
    positional: list[str] = dataclasses.field(default_factory=list)  # valid words for POSITIONAL in argv
    long_jobs: tuple[str, ...] = ()
    parse: Callable[[list[str]], object] | None = None

    def commands(self, folder: Path) -> list[tuple[list[str], bool]]:
        """(argv, run it?) for every hostile value of every flag."""
        out = []
        for flag in flags_of(self.parser):
            for words in hostile_values(flag, folder):
                argv = self.argv(len(out))
                if flag.positional:  # the hostile word first, then the rest of a valid positional list
                    argv = [w for x in argv for w in ([*words, *self.positional[1:]] if x == POSITIONAL else [x])]
                else:
                    argv = with_flag([w for x in argv for w in (self.positional if x == POSITIONAL else [x])],
                                     flag, words)
                long = flag.name in self.long_jobs and words[-1] in (f"--{flag.name}={HUGE}", f"--{flag.name}")
                out.append((argv, not long))
        return out


POSITIONAL = "{positional}"


def run_sweep(name: str, sweep: Sweep, inputs: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # a relative output (--out abc) lands here
    folder = tmp_path / "a_folder"
    folder.mkdir()
    before = snapshot(inputs["folder"])
    valid = [w for x in sweep.argv(-1) for w in (sweep.positional if x == POSITIONAL else [x])]
    assert invoke(sweep.main, valid) == (0, ""), "the sweep's own command line must succeed"
    codes = []
    for argv, run in sweep.commands(folder):
        if run:
            code, stderr = invoke(sweep.main, argv)
        else:  # only the parse: the job itself would run for hours
            assert sweep.parse is not None
            code, stderr = invoke(lambda a: (sweep.parse(a), None)[1], argv)
        assert_clean(code, stderr, argv)
        codes.append(code)
        if os.environ.get("SWEEP_LOG"):
            print(code, argv[-2:], stderr.strip().splitlines()[-1:] if stderr.strip() else "")
    assert snapshot(inputs["folder"]) == before, f"{name} changed an input file"
    assert codes.count(2) >= 10, codes


# ---------------------------------------------------------------------------------------------- the sweeps

def sweeps(inputs: dict[str, Path], out: Path) -> dict[str, Sweep]:
    ck, tok, corpus = str(inputs["ckpt"]), str(inputs["tok"]), str(inputs["corpus"])
    tiny = ["--embedding_dim", "32", "--num_of_layers", "1", "--num_of_heads", "2", "--block_size", "16",
            "--device", "cpu"]

    def bench_sweep(what: str, cls: type, argv: list[str], long_jobs: tuple[str, ...]) -> Sweep:
        return Sweep(dataclass_parser(cls), lambda a: bench.main([what, *a]), lambda i: argv, long_jobs=long_jobs,
                     parse=lambda a: cli.parse_dataclass(cls, "", a))

    return {
        "generate": Sweep(
            dataclass_parser(generate.GenerateArgs), generate.main,
            lambda i: ["--checkpoint", ck, "--prompt", "To be", "--max_new_tokens", "3", "--device", "cpu"],
            long_jobs=("max_new_tokens", "num_samples"), parse=generate.parse_args),
        "evaluate": Sweep(
            dataclass_parser(evaluate.EvaluateArgs, "files"), evaluate.main,
            lambda i: [POSITIONAL, "--checkpoint", ck, "--device", "cpu"], [corpus]),
        "finetune": Sweep(
            dataclass_parser(finetune.FinetuneConfig), finetune.main,
            lambda i: ["--checkpoint", ck, "--train", str(inputs["train"]), "--val", str(inputs["val"]),
                       "--out", str(out / f"ft{i}.tar"), "--predictions", str(out / f"p{i}.jsonl"),
                       "--epochs", "1", "--batch_size", "4", "--device", "cpu"],
            long_jobs=("epochs",), parse=finetune.parse_args),
        "finetune --predict": Sweep(
            dataclass_parser(finetune.FinetuneConfig), finetune.main,
            lambda i: ["--checkpoint", str(inputs["ft"]), "--predict", str(inputs["val"]),
                       "--predictions", str(out / f"q{i}.jsonl"), "--device", "cpu"]),
        "bench train": bench_sweep("train", bench.TrainBench, [
            *tiny, "--batch_size", "2", "--vocab_size", "64", "--warmup", "0", "--iters", "1"],
            ("iters", "warmup", "compile")),
        "bench attention": bench_sweep("attention", bench.AttentionBench, [
            "--sizes", "16,1,32,2", "--vocab_size", "64", "--warmup", "0", "--iters", "1", "--device", "cpu"],
            ("iters", "warmup")),
        "bench generate": bench_sweep("generate", bench.GenerateBench, [
            *tiny, "--vocab_size", "64", "--new_tokens", "2", "--repeats", "1"], ("new_tokens", "repeats")),
        "bench peers": bench_sweep("peers", bench.PeersBench, [
            "--corpus", corpus, "--short", "1", "--long", "2", "--rounds", "1"], ("long", "rounds")),
        "train_tokenizer": Sweep(
            dataclass_parser(train_tokenizer_cli.TokenizerArgs, "corpus"), train_tokenizer_cli.main,
            lambda i: [POSITIONAL, "--vocab_size", "280", "--out", str(out / f"tok{i}.json")], [corpus, "bbpe"]),
        "playground": Sweep(
            config.build_parser(), playground.main,
            lambda i: [POSITIONAL, "--tokenizer", tok, "--out_dir", str(out / "runs"), "--checkpoint",
                       str(out / f"ck{i}.tar"), "--max_iters", "1", "--eval_iters", "1", "--eval_interval", "1",
                       "--warmup_iters", "0", "--sample_tokens", "0", "--batch_size", "2", *tiny], [corpus],
            long_jobs=("max_iters", "sample_tokens", "eval_iters", "grad_accum_steps", "warmup_iters", "compile"),
            parse=config.parse_config),
    }


@pytest.mark.parametrize("name", ["generate", "evaluate", "finetune", "finetune --predict", "bench train",
                                  "bench attention", "bench generate", "bench peers", "train_tokenizer"])
def test_every_flag_of_every_cli_fails_cleanly_or_succeeds(name, inputs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    run_sweep(name, sweeps(inputs, out)[name], inputs, tmp_path, monkeypatch)


def test_every_flag_of_playground(inputs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    run_sweep("playground", sweeps(inputs, out)["playground"], inputs, tmp_path, monkeypatch)


def test_the_sweep_covers_every_flag_and_type():
    """The sweep reads the flags from the parsers: a flag added to a CLI is swept without editing this file."""
    names = {f.name for f in flags_of(dataclass_parser(finetune.FinetuneConfig))}
    assert {"lr", "predict", "predictions", "dtype", "seed"} <= names
    kinds = {f.name: f.kind for f in flags_of(dataclass_parser(generate.GenerateArgs))}
    assert (kinds["seed"], kinds["temperature"], kinds["prompt"], kinds["no_cache"]) == (int, float, str, bool)
    assert [f.name for f in flags_of(dataclass_parser(evaluate.EvaluateArgs, "files")) if f.positional] == ["files"]


# ---------------------------------------------------------------------------------------------- checkpoints



# ---------------------------------------------------------------------------------------------- checkpoints

@pytest.fixture
def good(inputs, tmp_path) -> tuple[Path, dict]:
    """A checkpoint on disk and what it holds: the 'last good checkpoint' every fault must leave alone."""
    path = tmp_path / "ck.tar"
    shutil.copy(inputs["ckpt"], path)
    return path, load_checkpoint(path)


def assert_survived(path: Path, before: dict) -> None:
    after = load_checkpoint(path)
    assert after.keys() == before.keys()
    for name, tensor in before["model"].items():
        assert torch.equal(after["model"][name], tensor)
    assert [p.name for p in path.parent.iterdir() if ".tmp" in p.name] == []  # no temp file left behind


def half_then(error: BaseException) -> Callable:
    """A torch.save that writes part of a file, then fails."""
    def save(obj: object, f) -> None:
        f.write(b"PK\x03\x04 half of a checkpoint")
        raise error
    return save


@pytest.mark.parametrize("error, reason", [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 6784 vs 6672"), "disk full"),
    (OSError(errno.EROFS, "Read-only file system"), "Read-only file system"),
    (OSError(errno.EACCES, "Permission denied"), "Permission denied"),
])
def test_a_failed_save_is_one_usage_error_and_the_last_good_checkpoint_survives(good, monkeypatch, error, reason):
    path, before = good
    monkeypatch.setattr(checkpoint.torch, "save", half_then(error))
    with pytest.raises(UsageError, match=rf"cannot write checkpoint {path}: .*{reason}"):
        save_checkpoint({"model": {}}, path)
    monkeypatch.undo()
    assert_survived(path, before)


def test_a_failing_cleanup_never_hides_the_real_error(good, monkeypatch):
    """On a read-only file system the temp file's removal fails too: the error shown is the write's."""
    path, before = good
    monkeypatch.setattr(checkpoint.torch, "save", half_then(OSError(errno.ENOSPC, "No space left on device")))

    def unlink(self: Path, missing_ok: bool = False) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(UsageError, match="No space left on device"):
        save_checkpoint({"model": {}}, path)
    monkeypatch.undo()
    for tmp in path.parent.glob("*.tmp*"):
        tmp.unlink()  # what the failed cleanup left
    assert_survived(path, before)


def test_an_interrupted_save_keeps_the_old_checkpoint(good, monkeypatch):
    """Ctrl-C (or any exception) in the middle of the write: the interruption goes on, the old file stays."""
    path, before = good
    monkeypatch.setattr(checkpoint.torch, "save", half_then(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {}}, path)
    monkeypatch.undo()
    assert_survived(path, before)


def test_a_save_on_a_read_only_file_system_names_the_file():
    target = read_only_target()
    if target is None:
        pytest.skip("no read-only location on this machine")
    with pytest.raises(UsageError, match=f"cannot write checkpoint {target}"):
        save_checkpoint({"model": {}}, target)


def test_kill_9_during_a_save_leaves_a_temp_that_the_next_save_removes(good):
    """A killed save leaves `<name>.tmp<pid>`; the next save of the same file removes those of dead processes
    (and never one of a live process: another run may be writing it)."""
    path, before = good
    code = (f"import os, sys; sys.path.insert(0, {str(REPO)!r})\nfrom gptlab import checkpoint\n"
            f"def killed_mid_write(obj, f):\n    f.write(b'x' * 100_000); f.flush(); os.kill(os.getpid(), 9)\n"
            f"checkpoint.torch.save = killed_mid_write\n"
            f"checkpoint.save_checkpoint({{'model': {{}}}}, {str(path)!r})\n")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == -signal.SIGKILL
    dead = list(path.parent.glob("ck.tar.tmp*"))
    assert len(dead) == 1 and dead[0].stat().st_size == 100_000
    live = path.with_name(f"ck.tar.tmp{os.getppid()}")  # a running process's temp file
    live.write_bytes(b"being written")
    save_checkpoint(before, path)
    assert not dead[0].exists() and live.exists()
    live.unlink()
    assert_survived(path, before)


@pytest.mark.parametrize("content", ["random", "pickle", "not a dict", "no model", "truncated"])
def test_a_file_that_is_not_a_checkpoint_is_one_line_without_unsafe_advice(good, tmp_path, content):
    path, _ = good
    bad = tmp_path / "bad.tar"
    if content == "random":
        bad.write_bytes(os.urandom(5000))
    elif content == "pickle":
        bad.write_bytes(pickle.dumps({"model": [1, 2, 3]}))
    elif content == "not a dict":
        torch.save([1, 2, 3], bad)
    elif content == "no model":
        torch.save({"version": 2}, bad)
    else:
        bad.write_bytes(path.read_bytes()[:3000])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UsageError) as e:
            load_checkpoint(bad)
    message = str(e.value)
    what = "a readable checkpoint" if content == "truncated" else "a GPT-experiments checkpoint"
    assert message.startswith(f"{bad} is not {what} (") and "\n" not in message
    assert "weights_only" not in message and len(message) < 200
    assert caught == []


def corrupt_config(ckpt: dict, case: str) -> dict:
    ckpt = {**ckpt, "model_config": dict(ckpt["model_config"])}
    if case == "unknown key":
        ckpt["model_config"]["flash"] = True
    elif case == "missing key":
        del ckpt["model_config"]["vocab_size"]
    elif case == "wider than its weights":
        ckpt["model_config"]["embedding_dim"] = 64
    elif case == "absurd size":
        ckpt["model_config"]["num_of_layers"] = 10 ** 9
    elif case == "wrong type":
        ckpt["model_config"]["block_size"] = "long"
    return ckpt


@pytest.mark.parametrize("case", ["unknown key", "missing key", "wider than its weights", "absurd size",
                                  "wrong type"])
def test_a_checkpoint_whose_config_disagrees_is_one_usage_error_naming_it(good, case):
    path, ckpt = good
    with pytest.raises(UsageError, match=f"^{path}: "):
        model_from_checkpoint(corrupt_config(ckpt, case), "cpu", str(path))


def test_a_checkpoint_from_before_a_new_config_field_still_loads(good):
    """A GPTConfig field with a default that an older checkpoint lacks takes its default."""
    _, ckpt = good
    old = {**ckpt, "model_config": {k: v for k, v in ckpt["model_config"].items() if k != "init"}}
    model, _ = model_from_checkpoint(old)
    assert model.config.init == GPTConfig.__dataclass_fields__["init"].default


def test_the_device_is_checked_before_the_checkpoint(inputs):
    """--device mps without MPS blames the device, even when the checkpoint is missing too."""
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    code, stderr = invoke(generate.main, ["--checkpoint", "missing.tar", "--device", "mps", "--prompt", "x"])
    assert code == 2 and "MPS" in stderr and "missing.tar" not in stderr


def test_generate_evaluate_and_finetune_keep_the_optimizer_state_off_the_device(good, tmp_path, monkeypatch):
    """The checkpoint is read on the CPU; only the model moves (a GPU must not hold AdamW's moments)."""
    path, ckpt = good
    with_optimizer = tmp_path / "run.tar"
    save_checkpoint({**ckpt, "optimizer": {"state": {"w": torch.zeros(3)}}}, with_optimizer)
    seen = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("map_location")) or real_load(*a, **k))
    assert invoke(generate.main, ["--checkpoint", str(with_optimizer), "--prompt", "a", "--max_new_tokens", "2",
                                  "--device", "cpu"])[0] == 0
    assert seen == ["cpu"]


# ---------------------------------------------------------------------------------------------- output paths

def test_an_output_may_not_be_an_input_or_another_output(tmp_path):
    data_file = tmp_path / "train.csv"
    data_file.write_text("text,label\n")
    os.link(data_file, tmp_path / "hardlink.csv")
    (tmp_path / "symlink.csv").symlink_to(data_file)
    for same in (data_file, tmp_path / "hardlink.csv", tmp_path / "symlink.csv", tmp_path / "." / "train.csv"):
        with pytest.raises(UsageError, match="is the input --train"):
            check_output(same, "--predictions", inputs=[("--train", data_file), ("--val", None)])
    with pytest.raises(UsageError, match="--predictions .* is also --out"):
        check_output(tmp_path / "x", "--predictions", other_outputs=[("--out", tmp_path / "x")])
    assert data_file.read_text() == "text,label\n"


def test_output_folders_are_created_and_impossible_ones_refused(tmp_path):
    check_output(tmp_path / "new" / "deeper" / "ck.tar", "--checkpoint")
    assert (tmp_path / "new" / "deeper").is_dir() and not (tmp_path / "new" / "deeper" / "ck.tar").exists()
    assert list((tmp_path / "new" / "deeper").iterdir()) == []  # the write probe is gone
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        check_output(tmp_path / "file" / "ck.tar", "--checkpoint")
    with pytest.raises(UsageError, match="is a folder"):
        check_output(tmp_path / "new", "--checkpoint")
    with pytest.raises(UsageError, match="--out_dir .* is a file, not a folder"):
        check_output_dir(tmp_path / "file", "--out_dir")
    check_output_dir(tmp_path / "runs" / "a", "--out_dir")
    assert (tmp_path / "runs" / "a").is_dir()
    target = read_only_target()
    if target is not None:
        for check in (lambda: check_output(target, "--out"), lambda: check_output_dir(target, "--out_dir")):
            with pytest.raises(UsageError, match="cannot"):
                check()


def test_finetune_refuses_to_overwrite_any_input(inputs, tmp_path):
    before = snapshot(inputs["folder"])
    base = ["--checkpoint", str(inputs["ckpt"]), "--train", str(inputs["train"]), "--val", str(inputs["val"]),
            "--out", str(tmp_path / "ft.tar"), "--predictions", str(tmp_path / "p.jsonl"), "--device", "cpu"]
    for flag, target in (("--predictions", inputs["ckpt"]), ("--predictions", inputs["val"]),
                         ("--predictions", tmp_path / "ft.tar"), ("--out", inputs["train"])):
        code, stderr = invoke(finetune.main, [*base, flag, str(target)])
        assert code == 2 and "choose another file" in stderr, stderr
    code, stderr = invoke(finetune.main, ["--checkpoint", str(inputs["ft"]), "--predict", str(inputs["val"]),
                                          "--predictions", str(inputs["val"]), "--device", "cpu"])
    assert code == 2 and "is the input --predict" in stderr
    assert snapshot(inputs["folder"]) == before


# ---------------------------------------------------------------------------------------------- token cache

def test_a_torn_token_cache_is_rebuilt(inputs, tmp_path):
    tok = Tokenizer.from_file(inputs["tok"])
    files = [inputs["corpus"]]
    whole = data.build_token_cache(files, tok, tmp_path, 0.1)
    folder = whole["train"].paths[0].parent
    reference = {p.name: p.read_bytes() for p in folder.iterdir()}
    tears = [lambda: (folder / "meta.json").write_text(""), lambda: (folder / "meta.json").write_text("{\"dty"),
             lambda: (folder / "train-00000.bin").write_bytes(b""), lambda: (folder / "val-00000.bin").unlink(),
             lambda: (folder / "train-00000.bin").write_bytes(reference["train-00000.bin"][:-2])]
    for tear in tears:
        tear()
        assert data.build_token_cache(files, tok, tmp_path, 0.1) == whole
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == reference


def test_a_full_disk_while_building_the_token_cache_is_one_usage_error(inputs, tmp_path, monkeypatch):
    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data, "_pieces", full)
    with pytest.raises(UsageError, match="cannot write the token cache in .*: No space left on device"):
        data.build_token_cache([inputs["corpus"]], Tokenizer.from_file(inputs["tok"]), tmp_path, 0.1)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


def test_processes_building_the_same_token_cache_at_once_all_succeed(inputs, tmp_path):
    start = time.time() + 8  # every process has imported torch by then: they tokenize at the same moment
    code = (f"import sys, time; sys.path.insert(0, {str(REPO)!r})\n"
            f"from pathlib import Path\nfrom gptlab import data\nfrom gptlab.tokenizer import Tokenizer\n"
            f"tok = Tokenizer.from_file({str(inputs['tok'])!r})\n"
            f"time.sleep(max(0, {start} - time.time()))\n"
            f"s = data.build_token_cache([Path({str(inputs['corpus'])!r})], tok, Path({str(tmp_path)!r}), 0.1)\n"
            f"print(s['train'].num_tokens, s['val'].num_tokens)\n")
    runs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(3)]
    results = [r.communicate(timeout=120) for r in runs]
    assert [r.returncode for r in runs] == [0, 0, 0], results
    assert len({out.splitlines()[-1] for out, _ in results}) == 1  # the same token counts (the log's times vary)
    alone = data.build_token_cache([inputs["corpus"]], Tokenizer.from_file(inputs["tok"]), tmp_path / "alone", 0.1)
    shared = data.build_token_cache([inputs["corpus"]], Tokenizer.from_file(inputs["tok"]), tmp_path, 0.1)
    assert shared["train"].tokens().tobytes() == alone["train"].tokens().tobytes()
    assert [p.name for p in shared["train"].paths[0].parent.iterdir() if ".tmp" in p.name] == []


# ---------------------------------------------------------------------------------------------- the run lock

def test_a_second_holder_is_refused_and_a_killed_holder_frees_the_lock(tmp_path):
    path = tmp_path / "ck.tar"
    code = (f"import sys, time; sys.path.insert(0, {str(REPO)!r})\nfrom gptlab.fileio import RunLock\n"
            f"with RunLock({str(path)!r}):\n    print('locked', flush=True)\n    time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError, match=rf"another run is using {path} .*held by pid {holder.pid}\)"):
            with RunLock(path):
                pass
    finally:
        holder.kill()  # kill -9: no cleanup runs in the holder
        holder.wait()
    with RunLock(path):  # the OS released the dead holder's lock
        with pytest.raises(UsageError, match=f"held by pid {os.getpid()}"):
            with RunLock(path):  # a second holder in the same process is refused too
                pass
    assert not (tmp_path / "ck.tar.lock").exists()


# ---------------------------------------------------------------------------------------------- messages

def test_an_error_under_a_progress_bar_starts_on_its_own_line():
    def main(argv: list[str]) -> None:
        bar = tqdm(total=10, disable=False, file=sys.stderr)
        bar.update(3)
        raise UsageError("something is wrong")

    code, stderr = invoke(main, [])
    assert code == 2 and "\nerror: something is wrong\n" in stderr


def test_an_os_error_no_check_caught_is_still_one_line_naming_the_file():
    def main(argv: list[str]) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/data/run/metrics.jsonl")

    assert invoke(main, []) == (2, "error: cannot access /data/run/metrics.jsonl: No space left on device\n")


def test_atomic_text_files_are_replaced_whole(tmp_path):
    path = tmp_path / "meta.json"
    atomic_write_text(path, "old", "index")
    atomic_write_text(path, "new", "index")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_atomic_files_are_renamed_only_when_the_block_ends_well(tmp_path):
    paths = [tmp_path / "train.bin", tmp_path / "val.bin"]
    for path in paths:
        path.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_files(paths, "the token cache") as files:
            files[0].write(b"new")
            raise KeyboardInterrupt  # a Ctrl-C halfway: both old files stay, no temporary file is left
    assert [p.read_bytes() for p in paths] == [b"old", b"old"] and len(list(tmp_path.iterdir())) == 2
    with atomic_files(paths, "the token cache") as files:
        for f in files:
            f.write(b"new")
    assert [p.read_bytes() for p in paths] == [b"new", b"new"] and len(list(tmp_path.iterdir())) == 2


# ---------------------------------------------------------------------------------------------- data files

def test_finetune_reads_a_bom_csv_long_fields_and_refuses_empty_texts(tmp_path):
    long_text = "word " * 40_000  # 200,000 characters: over csv's default field limit
    bom = tmp_path / "bom.csv"
    bom.write_text(f"text,label\n\"{long_text}\",a\nshort,b\n", encoding="utf-8-sig")
    examples, task = finetune.read_examples(str(bom), None)
    assert task == "single" and examples[0].text_a == long_text and examples[1].label == "b"
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\nfine,a\n  ,b\n")
    with pytest.raises(UsageError, match="line 3: text is empty"):
        finetune.read_examples(str(empty), None)


def test_bench_token_files_fit_large_vocabularies(tmp_path):
    split = speed.random_tokens(tmp_path, 70_000, 16)
    tokens = torch.from_numpy(np.memmap(split.paths[0], dtype=split.dtype, mode="r").astype("int64"))
    assert split.dtype == "uint32" and int(tokens.max()) >= 65_536 and int(tokens.max()) < 70_000


# ---------------------------------------------------------------------------------------------- outputs

def test_every_output_a_cli_declares_is_kept_when_it_exists(inputs, tmp_path):
    """Generated from the declarations (setting(..., output=True)): for every file a CLI writes, an earlier
    one in its place is refused before any work (exit 2, one error line) and left as it was."""
    import export
    corpus, tok, ck = str(inputs["corpus"]), str(inputs["tok"]), str(inputs["ckpt"])
    out = tmp_path / "out"
    out.mkdir()
    clis = {  # the dataclass that declares a CLI's flags, its main, and a command that would succeed
        "train_tokenizer": (train_tokenizer_cli.TokenizerArgs, train_tokenizer_cli.main,
                            [corpus, "bbpe", "--vocab_size", "280"]),
        "finetune": (finetune.FinetuneConfig, finetune.main,
                     ["--checkpoint", ck, "--train", str(inputs["train"]), "--val", str(inputs["val"]),
                      "--epochs", "1", "--device", "cpu"]),
        "export": (export.ExportArgs, export.main, ["--checkpoint", ck]),
        "playground": (config.TrainConfig, playground.main,
                       [corpus, "--tokenizer", tok, "--out_dir", str(out / "runs"), "--max_iters", "1",
                        "--embedding_dim", "32", "--num_of_layers", "1", "--num_of_heads", "2", "--block_size",
                        "16", "--device", "cpu"]),
    }
    checked = []
    for name, (cls, main, argv) in clis.items():
        outputs = [f.name for f in cli.flag_fields(cls) if f.metadata["output"]]
        for flag in outputs:  # each output in turn already exists; the others are new
            paths = {other: out / f"{name}-{other}-{flag}" for other in outputs}
            paths[flag].write_text("an earlier run's")
            command = argv + [a for other in outputs for a in (f"--{other}", str(paths[other]))]
            code, stderr = invoke(main, command)
            lines = stderr.strip().splitlines()
            assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, flag, stderr)
            assert paths[flag].read_text() == "an earlier run's", (name, flag)
            checked.append(f"{name} --{flag}")
    assert {"train_tokenizer --out", "finetune --out", "finetune --predictions", "export --out",
            "playground --checkpoint"} <= set(checked)


# ---------------------------------------------------------------------------------------------- loaders

def test_every_loader_of_a_file_the_user_names_answers_damage_in_one_line(inputs, tmp_path, monkeypatch):
    """Each file a user names (checkpoint, tokenizer, YAML config, experiment spec and state, labelled CSV and
    JSONL, metrics), truncated, random or of the wrong shape: loaded, or one UsageError line; never a traceback."""
    from dataclasses import asdict

    import experiment
    from gptlab.metrics import read_metrics

    monkeypatch.chdir(REPO)  # the experiment spec's paths are relative to the repository
    options = experiment.playground_options()
    spec = REPO / "experiments" / "ablation.yaml"
    state = tmp_path / "experiment.json"
    state.write_text(json.dumps(asdict(experiment.make_plan(experiment.read_spec(str(spec)), "a", options))))
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "label": t[:3]}) + "\n" for t in ("cat cat", "saw saw")))
    loaders = {  # name -> (a good file, what loads it)
        "checkpoint": (inputs["ckpt"], lambda p: model_from_checkpoint(load_checkpoint(p))),
        "tokenizer": (inputs["tok"], Tokenizer.from_file),
        "config": (REPO / "configs" / "cpu_quickstart.yaml", lambda p: config.parse_config(["--config", str(p)])),
        "experiment spec": (spec, lambda p: experiment.make_plan(experiment.read_spec(str(p)), "a", options)),
        "experiment state": (state, lambda p: experiment.load_plan(p.parent)),
        "labelled CSV": (inputs["train"], lambda p: finetune.read_examples(str(p), None)),
        "labelled JSONL": (jsonl, lambda p: finetune.read_examples(str(p), None)),
        "metrics": (None, read_metrics),
    }
    for name, (good, load) in loaders.items():
        original = good.read_bytes() if good else b'{"step": 1, "loss": 2.0}\n'
        suffix = good.name if good else "m.metrics.jsonl"
        for damage, content in (("truncated", original[: len(original) // 2]), ("random", os.urandom(3000)),
                                ("wrong shape", b"[1, 2, 3]\n"), ("empty", b"")):
            folder = tmp_path / name.replace(" ", "_") / damage.replace(" ", "_")
            folder.mkdir(parents=True)
            (folder / suffix).write_bytes(content)
            try:
                load(folder / suffix)
            except UsageError as e:
                assert "\n" not in str(e) and str(e), (name, damage, str(e))
