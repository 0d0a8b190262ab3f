"""A run's files: its metrics and pictures are named after its checkpoint and beside it, so two runs never share
them (the caches keyed by content stay shared in --out_dir); a checkpoint from the layout before (its files in
--out_dir) still resumes, exports and reports; and a refused run leaves nothing that blocks the corrected
command."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import corpus_slice

import export
import playground
from config import parse_settings
from gptlab import report
from gptlab.checkpoint import load_checkpoint
from gptlab.errors import UsageError
from gptlab.metrics import METRICS, earlier_run_file, read_metrics, run_file
from gptlab.runtime import Runtime
from gptlab.starting import check_runtime
from gptlab.tokenizer import corpus_files, train_tokenizer

TINY = ["--embedding_dim", "32", "--num_of_layers", "1", "--num_of_heads", "2", "--block_size", "16",
        "--batch_size", "4", "--eval_iters", "1", "--log_interval", "1", "--warmup_iters", "1", "--lr", "3e-3",
        "--sample_tokens", "0", "--device", "cpu", "--max_iters", "2", "--eval_interval", "2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return corpus_slice(tmp_path_factory.mktemp("corpus"), 20_000)


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(corpus_files([corpus]), "bbpe", 300, show_progress=False).save(path)
    return path


def train(*argv: str | Path) -> dict[str, float]:
    c, set_by_flags, in_yaml = parse_settings([str(a) for a in argv])
    return playground.train(c, set_by_flags, in_yaml=in_yaml)


def fresh(tmp_path: Path, corpus: Path, tokenizer: Path, checkpoint: Path, *extra: str) -> dict[str, float]:
    return train(corpus, "--tokenizer", tokenizer, "--out_dir", tmp_path / "runs", "--checkpoint", checkpoint,
                 *TINY, *extra)


def test_two_checkpoints_of_one_name_in_two_folders_keep_their_own_files(tmp_path, corpus, tokenizer):
    for folder in ("a", "b"):  # one --out_dir: the second run used to be refused, runs/ck.metrics.jsonl existing
        fresh(tmp_path, corpus, tokenizer, tmp_path / folder / "ck.tar", "--seed", str(ord(folder)))
    a, b = (read_metrics(tmp_path / folder / "ck.metrics.jsonl") for folder in ("a", "b"))
    assert a and b and a != b
    assert all((tmp_path / folder / "ck.loss.png").exists() for folder in ("a", "b"))
    assert not list((tmp_path / "runs").glob("*.metrics.jsonl"))
    assert len(list((tmp_path / "runs" / "token_cache").iterdir())) == 1  # the cache, keyed by content, shared


def test_a_checkpoint_of_the_layout_before_resumes_exports_and_reports(tmp_path, corpus, tokenizer):
    """Made with its metrics and plot in --out_dir (as runs did before): they are found there, cut back to
    the checkpoint's step, continued and read, and nothing is started beside the checkpoint."""
    ckpt = tmp_path / "a" / "ck.tar"
    fresh(tmp_path, corpus, tokenizer, ckpt)
    earlier = earlier_run_file(tmp_path / "runs", ckpt, METRICS)
    shutil.move(run_file(ckpt, METRICS), earlier)
    shutil.move(run_file(ckpt, "loss.png"), earlier_run_file(tmp_path / "runs", ckpt, "loss.png"))
    with earlier.open("a") as f:  # logged after the last save by a run that was then killed
        f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n")
    train("--resume", "--checkpoint", ckpt, "--max_iters", "4")
    assert [(r["step"], r["loss"] == 9.0) for r in read_metrics(earlier) if "loss" in r] == \
        [(1, False), (2, False), (3, False), (4, False)]
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ck.tar"]
    out = tmp_path / "hf"
    export.main(["--checkpoint", str(ckpt), "--out", str(out)])
    val_loss = [r for r in read_metrics(earlier) if "val_loss" in r][-1]["val_loss"]
    assert f"final validation loss (step 4): {val_loss:.4f}" in (out / "README.md").read_text()
    # experiment.py's runs name --out_dir as their folder, so both layouts put the metrics in the same file
    run = report.Run(None, 0, tmp_path / "variant" / "seed0")
    assert run.metrics == run_file(run.checkpoint, METRICS) == earlier_run_file(run.folder, run.checkpoint, METRICS)


@pytest.mark.parametrize(("flags", "says"), [(["--ema_decay", "0.9"], "--ema_decay is not supported with --fsdp"),
                                             (["--optimizer", "muon"], "--optimizer muon does not support --fsdp"),
                                             (["--dtype", "float16"], "--fsdp with --dtype float16")])
def test_what_fsdp_refuses_is_refused_before_any_file(tmp_path, corpus, tokenizer, monkeypatch, flags, says):
    c, _, _ = parse_settings([str(corpus), "--tokenizer", str(tokenizer), "--fsdp", *flags])
    fsdp = Runtime(torch.device("cpu"), torch.float16 if c.dtype == "float16" else torch.float32, world_size=2,
                   fsdp=True)  # as under torchrun --nproc_per_node 2
    with pytest.raises(UsageError, match=says):
        check_runtime(c, fsdp)
    monkeypatch.setattr(playground, "setup_runtime", lambda *a: fsdp)
    with pytest.raises(UsageError, match=says):
        fresh(tmp_path, corpus, tokenizer, tmp_path / "ck.tar", "--fsdp", *flags)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    assert list((tmp_path / "runs").iterdir()) == []  # no token cache: the refusal came first


def test_refused_runs_leave_nothing_that_blocks_the_corrected_command(tmp_path, corpus, tokenizer, monkeypatch):
    ckpt = tmp_path / "ck.tar"
    with pytest.raises(UsageError, match="above the 1,000 B budget"):
        fresh(tmp_path, corpus, tokenizer, ckpt, "--max_memory", "1000")
    assert not (tmp_path / "runs" / "token_cache").exists()  # the plan is made before the cache is built
    real_step = playground.train_step

    def refused_at_the_first_step(*args):  # a mistake only the first step meets
        raise UsageError("refused at the first step")

    monkeypatch.setattr(playground, "train_step", refused_at_the_first_step)
    with pytest.raises(UsageError, match="refused at the first step"):
        fresh(tmp_path, corpus, tokenizer, ckpt)
    monkeypatch.setattr(playground, "train_step", real_step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # no metrics file, no lock
    fresh(tmp_path, corpus, tokenizer, ckpt)  # the corrected command: no --overwrite needed
    assert load_checkpoint(ckpt)["iteration"] == 2
    assert [r["step"] for r in read_metrics(run_file(ckpt, METRICS)) if "loss" in r] == [1, 2]

