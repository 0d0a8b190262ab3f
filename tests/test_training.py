"""playground.py end to end on tiny models: loss falls, resume is exact, the token cache is reused,
wandb never needs the network, and user mistakes are one line on stderr with nothing overwritten."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import playground
from config import parse_config
from gptlab import checkpoint as checkpoint_module
from gptlab.checkpoint import load_checkpoint
from gptlab.data import build_token_cache, read_token_folder
from gptlab.tokenizer import BERT_TOKENS, EOT, Tokenizer, corpus_files

REPO = Path(__file__).resolve().parent.parent
TINY = ["--embedding_dim", "32", "--num_of_layers", "2", "--num_of_heads", "2", "--block_size", "32",
        "--batch_size", "8", "--eval_iters", "2", "--log_interval", "5", "--warmup_iters", "5", "--lr", "3e-3",
        "--sample_tokens", "0"]


def run_args(tmp_path: Path, corpus: Path, tokenizer: Path, *extra: str) -> list[str]:
    return [str(corpus), "--tokenizer", str(tokenizer), "--out_dir", str(tmp_path / "runs"),
            "--checkpoint", str(tmp_path / "ckpt.tar"), *TINY, *extra]


def train(argv: list[str]) -> dict[str, float]:
    c, set_by_flags = parse_config(argv)
    return playground.train(c, set_by_flags)


def metrics(tmp_path: Path, name: str = "ckpt") -> list[dict]:
    lines = (tmp_path / f"{name}.metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_loss_falls_on_the_bundled_corpus(tmp_path, corpus, tokenizer_path):
    final = train(run_args(tmp_path, corpus, tokenizer_path, "--max_iters", "60", "--eval_interval", "60",
                           "--dropout", "0"))
    first = metrics(tmp_path)[0]["loss"]
    assert first > 5.0  # about ln(320) = 5.77 at random init
    assert final["val_loss"] < first - 1.0
    bpb = final["val_loss"] / math.log(2) * _val_split(tmp_path).num_tokens / _val_split(tmp_path).num_bytes
    assert final["val_bpb"] == pytest.approx(bpb)
    ckpt = load_checkpoint(tmp_path / "ckpt.tar")
    assert ckpt["iteration"] == 60 and ckpt["best_val_loss"] == pytest.approx(final["val_loss"])
    assert (tmp_path / "ckpt.loss.png").exists()


@pytest.mark.gpu
def test_loss_falls_on_cuda_in_bfloat16_compiled_with_mfu_logged(tmp_path, corpus, tokenizer_path):
    device = "cuda"
    final = train(run_args(tmp_path, corpus, tokenizer_path, "--max_iters", "60", "--eval_interval", "60",
                           "--dropout", "0", "--device", device, "--dtype", "bfloat16", "--compile"))
    rows = metrics(tmp_path)
    assert final["val_loss"] < rows[0]["loss"] - 1.0
    if playground.peak_flops(torch.device(device)):  # a GPU in the table: MFU is a fraction, beside tokens/s
        assert all(0 < row["mfu"] < 1 for row in rows if "tokens_per_s" in row)


def _val_split(tmp_path: Path):
    meta_files = list((tmp_path / "runs" / "token_cache").glob("*/meta.json"))
    assert len(meta_files) == 1
    return read_token_folder(meta_files[0].parent)["val"]


def test_resume_reproduces_an_uninterrupted_run_exactly(tmp_path, corpus, tokenizer_path, monkeypatch):
    """Run 20 steps, keeping a copy of the step-10 checkpoint; resume that copy to 20: same losses, same weights."""
    args = run_args(tmp_path, corpus, tokenizer_path, "--max_iters", "20", "--checkpoint_interval", "10",
                    "--eval_interval", "10", "--dropout", "0.1")  # dropout: the RNG state must be restored too
    real_save = checkpoint_module.save_checkpoint

    def save_and_keep_step_10(state, path):
        real_save(state, path)
        if state["iteration"] == 10:
            shutil.copy(path, tmp_path / "step10.tar")

    monkeypatch.setattr(playground, "save_checkpoint", save_and_keep_step_10)
    train(args)
    monkeypatch.undo()
    uninterrupted = load_checkpoint(tmp_path / "ckpt.tar")
    losses = {r["step"]: r["loss"] for r in metrics(tmp_path) if "loss" in r}

    train(["--resume", "--checkpoint", str(tmp_path / "step10.tar"), "--out_dir", str(tmp_path / "runs")])
    resumed = load_checkpoint(tmp_path / "step10.tar")
    assert resumed["iteration"] == 20
    for name, tensor in uninterrupted["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    resumed_losses = {r["step"]: r["loss"] for r in metrics(tmp_path, "step10") if "loss" in r}
    assert resumed_losses == {step: loss for step, loss in losses.items() if step > 10}
    assert resumed["best_val_loss"] == uninterrupted["best_val_loss"]


def test_token_cache_is_reused_and_rebuilt_when_the_corpus_changes(tmp_path, corpus, tokenizer_path, monkeypatch):
    args = run_args(tmp_path, corpus, tokenizer_path, "--max_iters", "1", "--eval_interval", "1", "--overwrite")
    builds = []
    real_write = build_token_cache.__globals__["_write_token_files"]
    monkeypatch.setitem(build_token_cache.__globals__, "_write_token_files",
                        lambda *a: (builds.append(a[0]), real_write(*a)))
    train(args)
    train(args)
    assert len(builds) == 1  # the second run reused the cache
    changed = tmp_path / "changed.txt"
    changed.write_text(corpus.read_text() + "A new line at the end.\n")
    train([str(changed), *args[1:]])
    assert len(builds) == 2
    assert len(list((tmp_path / "runs" / "token_cache").iterdir())) == 2


def test_without_a_tokenizer_one_is_trained_once_and_serves_fine_tuning(tmp_path, corpus, capsys):
    args = [str(corpus), "--tokenizer_kind", "bpe", "--vocab_size", "120", "--out_dir", str(tmp_path / "runs"),
            *TINY, "--max_iters", "1", "--eval_interval", "1"]
    train([*args, "--checkpoint", str(tmp_path / "a.tar")])
    assert "training a bpe tokenizer (120 tokens)" in capsys.readouterr().out
    [saved] = (tmp_path / "runs").glob("tokenizer-bpe120-*.json")
    train([*args, "--checkpoint", str(tmp_path / "b.tar")])
    assert "training a bpe tokenizer" not in capsys.readouterr().out  # the saved one is reused
    tok = Tokenizer.from_file(saved)
    assert tok.vocab_size == 120
    assert Tokenizer.from_json(load_checkpoint(tmp_path / "b.tar")["tokenizer"]).to_json() == tok.to_json()
    # <mask> <pad> <cls> <sep> are there, so this decoder can be fine-tuned without a new tokenizer
    assert [tok.special_id(t, "fine-tuning") for t in BERT_TOKENS] == [2, 3, 4, 5]


def test_mfu_is_logged_when_the_device_peak_is_known(tmp_path, corpus, tokenizer_path, monkeypatch):
    monkeypatch.setattr(playground, "peak_flops", lambda device, dtype: 1e9)  # pretend the CPU is a known 1 GFLOP/s GPU
    train(run_args(tmp_path, corpus, tokenizer_path, "--max_iters", "5", "--eval_interval", "5"))
    [row] = [m for m in metrics(tmp_path) if "tokens_per_s" in m]
    model = checkpoint_module.model_from_checkpoint(load_checkpoint(tmp_path / "ckpt.tar"))[0]
    assert row["mfu"] == pytest.approx(model.flops_per_token() * row["tokens_per_s"] / 1e9)


def test_documents_are_separated_by_end_of_text(tmp_path, tokenizer_path):
    """Two files become two documents: the token stream holds an end-of-text token after each."""
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("First document.\n" * 50)
    (folder / "b.txt").write_text("Second document.\n" * 50)
    tok = Tokenizer.from_file(tokenizer_path)
    splits = build_token_cache(corpus_files([folder]), tok, tmp_path / "cache", val_fraction=0.1)
    train_ids = splits["train"].tokens().tolist()
    val_ids = splits["val"].tokens().tolist()
    assert train_ids.count(tok.eot_id) == 1 and val_ids[-1] == tok.eot_id
    first, second = "First document.\n" * 50, "Second document.\n" * 50
    assert tok.decode(train_ids + val_ids) == first + EOT + second + EOT
    assert splits["train"].num_bytes + splits["val"].num_bytes == 16 * 50 + 17 * 50
    # val starts at the first line that begins at or after 90% of the 1650 bytes: 9 lines of 17 bytes
    assert splits["val"].num_bytes == 17 * 9


def test_token_files_do_not_depend_on_the_number_of_cores(tmp_path, corpus, tokenizer_path, monkeypatch):
    """Pieces of the corpus are encoded a batch at a time over all cores: the token files equal those of
    encoding each piece alone, one after another, in order."""
    from gptlab import data
    monkeypatch.setattr(data, "CHUNK_BYTES", 4_000)  # about 15 pieces
    tok = Tokenizer.from_file(tokenizer_path)
    files = {}
    for cores in (1, 3, 64):
        monkeypatch.setattr(data.os, "cpu_count", lambda cores=cores: cores)
        splits = build_token_cache([corpus], tok, tmp_path / f"cores{cores}", val_fraction=0.1)
        files[cores] = [splits[s].tokens().tobytes() for s in ("train", "val")]
    assert files[1] == files[3] == files[64]
    text = corpus.read_text(encoding="utf-8")
    ids = np.frombuffer(files[1][0] + files[1][1], dtype=np.uint16).tolist()
    assert tok.decode(ids) == text + EOT


def test_wandb_offline_needs_no_network(tmp_path, corpus, tokenizer_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(run_args(tmp_path, corpus, tokenizer_path, "--max_iters", "2", "--eval_interval", "2",
                   "--wandb_project", "gptx-test"))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))  # beside the checkpoint, as its metrics
    assert len(runs) == 1
    assert any(r.get("val_loss") for r in metrics(tmp_path))  # the local copy is always written


# ----------------------------------------------------------------------------- mistakes on the command line

def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "playground.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def good_checkpoint(corpus, tokenizer_path, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("good")
    train(run_args(tmp, corpus, tokenizer_path, "--max_iters", "2", "--eval_interval", "2"))
    return tmp / "ckpt.tar"


@pytest.mark.parametrize("case", ["missing corpus", "empty corpus", "short corpus", "heads", "vocab mismatch",
                                  "corrupt resume", "shape change on resume", "non-numeric", "negative interval"])
def test_user_mistakes_are_one_line_and_overwrite_nothing(case, tmp_path, corpus, tokenizer_path, good_checkpoint):
    ckpt = tmp_path / "ckpt.tar"
    shutil.copy(good_checkpoint, ckpt)
    before = ckpt.read_bytes()
    empty, short = tmp_path / "empty.txt", tmp_path / "short.txt"
    empty.write_text("")
    short.write_text("To be, or not to be.\n" * 3)
    # --overwrite: even a run allowed to replace the checkpoint must leave it untouched when it fails its checks
    common = ["--tokenizer", str(tokenizer_path), "--checkpoint", str(ckpt), "--out_dir", str(tmp_path / "r"),
              "--max_iters", "2", "--overwrite", *TINY]
    args, expected = {
        "missing corpus": ([str(tmp_path / "nope.txt"), *common], "nope.txt"),
        "empty corpus": ([str(empty), *common], "empty"),
        "short corpus": ([str(short), *common], "fewer than block_size + 1"),
        "heads": ([str(corpus), *common, "--num_of_heads", "3"], "not divisible by --num_of_heads 3"),
        "vocab mismatch": ([str(corpus), *common, "--vocab_size", "999"], "--vocab_size 999 does not match"),
        "corrupt resume": (["--resume", "--checkpoint", str(_corrupt(tmp_path))], "not a GPT-experiments checkpoint"),
        "shape change on resume": (["--resume", "--checkpoint", str(ckpt), "--embedding_dim", "64"],
                                   "differs from the checkpoint's 32"),
        "non-numeric": ([str(corpus), *common, "--batch_size", "many"], "--batch_size: not an integer: 'many'"),
        "negative interval": ([str(corpus), *common, "--eval_interval", "-1"], "--eval_interval must be a positive"),
    }[case]
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert ckpt.read_bytes() == before


def _corrupt(tmp_path: Path) -> Path:
    path = tmp_path / "corrupt.tar"
    path.write_bytes(b"this is not a checkpoint" * 100)
    return path
