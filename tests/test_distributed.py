"""torchrun with 2 CPU processes (gloo): the same training as one process with the same global batch,
one checkpoint writer, resume under 2 ranks, and a crashed rank ends the job instead of hanging it."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from checkpoint import load_checkpoint
from preprocessing.tokenizer import corpus_files, train_tokenizer

REPO = Path(__file__).resolve().parent.parent
TINY = ["--embedding_dim", "32", "--num_of_layers", "2", "--num_of_heads", "2", "--block_size", "32",
        "--eval_iters", "2", "--warmup_iters", "2", "--lr", "3e-3", "--dropout", "0", "--sample_tokens", "0",
        "--log_interval", "1", "--device", "cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, **popen) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(REPO / "playground.py"), *args]


def run(cmd: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("ddp")
    text = (REPO / "data" / "shakespeare.txt").read_text(encoding="utf-8")[:40_000]
    corpus = tmp / "corpus.txt"
    corpus.write_text(text[: text.rindex("\n") + 1], encoding="utf-8")
    tokenizer = tmp / "tokenizer.json"
    train_tokenizer(corpus_files([corpus]), "bbpe", 300, show_progress=False).save(tokenizer)
    return corpus, tokenizer


def args_for(folder: Path, corpus: Path, tokenizer: Path, *extra: str) -> list[str]:
    folder.mkdir(exist_ok=True)
    return [str(corpus), "--tokenizer", str(tokenizer), "--out_dir", str(folder / "runs"),
            "--checkpoint", str(folder / "ckpt.tar"), *TINY, *extra]


def losses(folder: Path) -> list[float]:
    import json
    rows = (folder / "runs" / "ckpt.metrics.jsonl").read_text().splitlines()
    return [json.loads(r)["loss"] for r in rows if '"loss"' in r]


def assert_same_weights(a: Path, b: Path, tol: float = 1e-5) -> None:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=tol, rtol=0, msg=name)


def test_two_ranks_match_one_rank_with_the_same_global_batch(tmp_path, setup):
    corpus, tokenizer = setup
    one, two = tmp_path / "one", tmp_path / "two"
    run([sys.executable, str(REPO / "playground.py"),
         *args_for(one, corpus, tokenizer, "--batch_size", "4", "--grad_accum_steps", "2", "--max_iters", "8",
                   "--eval_interval", "8")])
    out = run(torchrun(2, *args_for(two, corpus, tokenizer, "--batch_size", "4", "--grad_accum_steps", "1",
                                    "--max_iters", "8", "--eval_interval", "8")))
    assert "effective batch 4 x 1 accum x 2 ranks = 256 tokens/step" in out.stdout
    assert losses(one) == pytest.approx(losses(two), abs=1e-5)
    assert_same_weights(one / "ckpt.tar", two / "ckpt.tar")
    assert sorted(p.name for p in two.iterdir()) == ["ckpt.tar", "runs"]  # one writer, no temporary files

    # Resume both to step 12: two ranks continue exactly as one does.
    for folder in (one, two):
        (folder / "start.tar").write_bytes((folder / "ckpt.tar").read_bytes())
    run([sys.executable, str(REPO / "playground.py"), "--resume", "--checkpoint", str(one / "ckpt.tar"),
         "--max_iters", "12"])
    run(torchrun(2, "--resume", "--checkpoint", str(two / "ckpt.tar"), "--max_iters", "12"))
    assert load_checkpoint(two / "ckpt.tar")["iteration"] == 12
    assert_same_weights(one / "ckpt.tar", two / "ckpt.tar")


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            if ppid == pid:
                kids.append(int(entry.name))
    return kids


@pytest.mark.skipif(not Path("/proc").exists(), reason="finds the worker processes through /proc")
def test_a_crashed_rank_ends_the_job_instead_of_hanging(tmp_path, setup):
    corpus, tokenizer = setup
    metrics = tmp_path / "runs" / "ckpt.metrics.jsonl"
    cmd = torchrun(2, *args_for(tmp_path, corpus, tokenizer, "--batch_size", "4", "--max_iters", "100000"))
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not (metrics.exists() and metrics.stat().st_size > 0):  # training has started
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.5)
        workers = _children(proc.pid)
        assert len(workers) == 2
        os.kill(max(workers), signal.SIGKILL)  # one rank dies mid-training
        _, stderr = proc.communicate(timeout=90)  # the job must end by itself, well before this
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "Signal 9 (SIGKILL)" in stderr or "SIGKILL" in stderr
