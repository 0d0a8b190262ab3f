"""Sharded checkpoints (--checkpoint_format dcp) and --resume auto: two FSDP ranks write one folder, one
process and three resume it with the saved weights bit for bit, a failed or killed save leaves the last good
checkpoint, and a worker killed under torchrun --max-restarts costs one restart, not the run."""

import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import corpus_slice
from test_distributed import REPO, _children, args_for, run, torchrun
from torch.distributed.checkpoint import FileSystemWriter

import generate
import playground
from config import parse_settings
from gptlab import checkpoint
from gptlab.checkpoint import ShardedSaver, checkpoint_exists, load_checkpoint
from gptlab.errors import UsageError
from gptlab.hf_folder import load_checkpoint_or_folder
from gptlab.tokenizer import corpus_files, train_tokenizer

SHARDED = ("--checkpoint_format", "dcp", "--batch_size", "4", "--eval_interval", "100", "--lr_schedule", "constant")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """A 40 kB corpus and a 300-token tokenizer trained on it."""
    folder = tmp_path_factory.mktemp("data")
    corpus, tokenizer = corpus_slice(folder, 40_000), folder / "tokenizer.json"
    train_tokenizer(corpus_files([corpus]), "bbpe", 300, show_progress=False).save(tokenizer)
    return corpus, tokenizer


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[name], b[name]) for name in a)


def train(argv: list[str]) -> None:
    c, set_by_flags, in_yaml = parse_settings(argv)
    playground.train(c, set_by_flags, in_yaml=in_yaml)


def steps_logged(metrics: Path) -> list[int]:
    return [json.loads(row)["step"] for row in metrics.read_text().splitlines() if '"loss"' in row]


# torchrun's workers share its rendezvous store by default, where a restarted group can read the addresses of the
# one that died and fail to connect (pytorch/pytorch#135712, #167288): docs/cluster.md says to set this.
RESTARTABLE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def tiny_state(value: float, iteration: int) -> dict:
    w = torch.full((4, 3), value)
    return {"model_config": {}, "model": {"w": w}, "tokenizer": "{}", "iteration": iteration,
            "optimizer": {"state": {"w": {"exp_avg": w * 2}}, "param_groups": [{"lr": 0.1, "params": ["w"]}]}}


class FullDisk(FileSystemWriter):
    def write_data(self, plan, planner):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_or_killed_save_never_damages_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    saver = ShardedSaver(path, is_main=True, distributed=False)
    saver.save(tiny_state(1.0, 1))
    saver.wait()
    monkeypatch.setattr(checkpoint, "FileSystemWriter", FullDisk)
    saver.save(tiny_state(2.0, 2))  # written in the background: its failure is said when it is waited for
    with pytest.raises(UsageError, match="cannot write checkpoint .*ckpt: No space left on device"):
        saver.wait()
    assert load_checkpoint(path)["iteration"] == 1  # its temporary folder beside is never read
    monkeypatch.undo()

    # A kill between the two renames of a swap: the last good checkpoint is aside; it is read from there and
    # kept until the next one is in place.
    path.rename(tmp_path / ".ckpt.old")
    assert checkpoint_exists(path) and load_checkpoint(path)["iteration"] == 1
    saver.save(tiny_state(3.0, 3))
    saver.wait()
    ckpt = load_checkpoint(path)
    assert ckpt["iteration"] == 3 and same_tensors(ckpt["model"], tiny_state(3.0, 3)["model"])
    assert torch.equal(ckpt["optimizer"]["state"]["w"]["exp_avg"], torch.full((4, 3), 6.0))
    assert ckpt["optimizer"]["param_groups"] == [{"lr": 0.1, "params": ["w"]}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # the failed save's folder is gone too


class Payload:
    def __init__(self, victim: Path) -> None:
        self.victim = victim

    def __reduce__(self):
        return os.remove, (str(self.victim),)


def test_a_checkpoint_index_that_would_run_code_is_refused_unread(tmp_path):
    saver = ShardedSaver(tmp_path / "ckpt", is_main=True, distributed=False)
    saver.save(tiny_state(1.0, 1))
    saver.wait()
    victim = tmp_path / "victim.txt"
    victim.write_text("still here")
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(Payload(victim)))
    with pytest.raises(UsageError, match="ckpt is not a readable checkpoint .*index"):
        load_checkpoint(tmp_path / "ckpt")
    assert victim.exists()


def test_resume_auto_starts_a_run_then_continues_it(tmp_path, setup, capsys):
    corpus, tokenizer = setup
    assert parse_settings(["--resume", "auto"])[0].resume == "auto" and parse_settings(["--resume"])[0].resume is True
    (tmp_path / "auto.yaml").write_text("resume: auto\n")
    assert parse_settings(["--config", str(tmp_path / "auto.yaml")])[0].resume == "auto"
    metrics = tmp_path / "ckpt.metrics.jsonl"
    metrics.write_text('{"step": 7, "loss": 1.0}\n')  # an attempt killed before its first save
    for max_iters in (2, 4):
        train([*args_for(tmp_path, corpus, tokenizer, "--batch_size", "2", "--max_iters", str(max_iters),
                         "--eval_interval", "100", "--resume", "auto")])
    assert "resumed from step 2" in capsys.readouterr().out
    assert steps_logged(metrics) == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, setup) -> tuple[Path, int, str]:
    """20 steps on 2 FSDP ranks under torchrun --max-restarts 2 --resume auto, one worker killed with SIGKILL
    after the first checkpoint: (its folder, torchrun's exit status, its output)."""
    corpus, tokenizer = setup
    folder = tmp_path_factory.mktemp("killed")
    metrics = folder / "ckpt.metrics.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts",
           "2", str(REPO / "playground.py"), *args_for(folder, corpus, tokenizer, *SHARDED, "--fsdp", "--max_iters",
                                                        "20", "--checkpoint_interval", "4", "--resume", "auto")]
    with open(folder / "out.txt", "w") as out:  # files: a full pipe would stall the job
        proc = subprocess.Popen(cmd, cwd=folder, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **RESTARTABLE})
    try:
        deadline = time.time() + 240  # slow on a loaded machine: every process imports torch first
        while not (checkpoint_exists(folder / "ckpt.tar") and len(steps_logged(metrics)) >= 6):
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.05)
        os.kill(max(_children(proc.pid)), signal.SIGKILL)
        status = proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    return folder, status, (folder / "out.txt").read_text()


@pytest.mark.skipif(not Path("/proc").exists(), reason="finds the worker processes through /proc")
def test_a_worker_killed_under_max_restarts_costs_a_restart_not_the_run(killed_run):
    folder, status, output = killed_run
    assert status == 0, output[-3000:]
    assert output.count("resumed from step ") == 1 and "exitcode: -9" in output
    assert steps_logged(folder / "ckpt.metrics.jsonl") == list(range(1, 21))  # cut back on resume: once each
    assert load_checkpoint(folder / "ckpt.tar")["iteration"] == 20
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt.loss.png", "ckpt.metrics.jsonl", "ckpt.tar", "out.txt",
                                                        "runs"]  # nothing left aside


@pytest.mark.skipif(not Path("/proc").exists(), reason="finds the worker processes through /proc")
def test_two_ranks_save_shards_that_one_and_three_processes_resume_bit_exactly(tmp_path, killed_run):
    folder = killed_run[0] / "ckpt.tar"
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt"]
    whole = load_checkpoint(folder)
    assert whole["iteration"] == 20 and len(whole["rng"]["torch"]) == 2

    # What generate, evaluate, finetune and --init_from read it with; and generation from it.
    assert same_tensors(load_checkpoint_or_folder(folder)["model"], whole["model"])
    generate.main(["--checkpoint", str(folder), "--prompt", "ROMEO:", "--max_new_tokens", "5", "--device", "cpu"])

    # One line makes it one file, which holds the same state.
    checkpoint.main([str(folder), str(tmp_path / "one.tar")])
    as_file = load_checkpoint(tmp_path / "one.tar")
    assert same_tensors(as_file["model"], whole["model"]) and as_file["config"] == whole["config"]

    # Three processes reshard it: at learning rate 0 the step they train leaves the weights as they were read.
    three = shutil.copytree(folder, tmp_path / "three" / "ckpt.tar")
    run(torchrun(3, "--resume", "--checkpoint", str(three), "--max_iters", "21", "--lr", "0", "--min_lr", "0",
                 "--out_dir", str(tmp_path / "three" / "runs")))
    resharded = load_checkpoint(three)
    assert resharded["iteration"] == 21 and len(list(three.glob("*.distcp"))) == 3
    assert same_tensors(resharded["model"], whole["model"])

    # One process without torchrun trains on from the folder exactly as from the file of the same state.
    for start in (shutil.copytree(folder, tmp_path / "one" / "ckpt.tar"), tmp_path / "one.tar"):
        train(["--resume", "--checkpoint", str(start), "--max_iters", "22", "--grad_accum_steps", "2",
               "--out_dir", str(start.parent / f"runs_{start.name}")])
    from_folder, from_file = load_checkpoint(tmp_path / "one" / "ckpt.tar"), load_checkpoint(tmp_path / "one.tar")
    assert from_folder["iteration"] == 22 and not same_tensors(from_folder["model"], whole["model"])
    assert same_tensors(from_folder["model"], from_file["model"])
    assert same_tensors(from_folder["optimizer"]["state"]["wte.weight"], from_file["optimizer"]["state"]["wte.weight"])
