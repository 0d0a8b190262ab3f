"""generate.py and evaluate.py on a tiny checkpoint: determinism, greedy, streaming, prompts, bits per
byte by hand, and one-line errors for every bad input."""

import dataclasses
import io
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main

import evaluate
import generate
from evaluate import encode_file, evaluate_tokens
from gpt import GPT, GPTConfig
from gptlab.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from gptlab.tokenizer import corpus_files, train_tokenizer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory) -> Path:
    """A tiny untrained model with a real tokenizer, saved as playground.py saves checkpoints."""
    tmp = tmp_path_factory.mktemp("gen")
    corpus = tmp / "corpus.txt"
    corpus.write_text((REPO / "data" / "shakespeare.txt").read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    tok = train_tokenizer(corpus_files([corpus]), "bbpe", 300, show_progress=False)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, embedding_dim=32, num_of_layers=2,
                          num_of_heads=2, dropout=0.0))
    path = tmp / "ckpt.tar"
    save_checkpoint({"model_config": dataclasses.asdict(model.config), "model": model.state_dict(),
                     "tokenizer": tok.to_json()}, path)
    return path


@pytest.fixture(scope="module")
def loaded(ckpt_path):
    return model_from_checkpoint(load_checkpoint(ckpt_path))


def test_same_seed_same_text_and_another_seed_differs(loaded):
    model, tok = loaded
    a, b, c = (generate.generate_text(model, tok, "To be", 40, temperature=1.0, seed=s)[0] for s in (1, 1, 2))
    assert a == b and a != c


def test_temperature_zero_is_greedy_argmax(loaded):
    model, tok = loaded
    text, n = generate.generate_text(model, tok, "ROMEO.", 20, temperature=0)
    ids = tok.encode("ROMEO.")
    for _ in range(n):
        logits, _ = model(torch.tensor([ids[-32:]]))
        ids.append(int(logits[0, -1].argmax()))
    assert text == tok.decode(ids[len(tok.encode("ROMEO.")):])


def test_top_k_one_equals_greedy(loaded):
    model, tok = loaded
    greedy = generate.generate_text(model, tok, "Enter", 30, temperature=0)
    assert generate.generate_text(model, tok, "Enter", 30, temperature=1.3, top_k=1, seed=5) == greedy


def test_streamed_pieces_add_up_to_the_returned_text(loaded):
    model, tok = loaded
    pieces: list[str] = []
    text, _ = generate.generate_text(model, tok, "Hamlet", 60, temperature=1.0, seed=3, on_text=pieces.append)
    assert "".join(pieces) == text and len(pieces) > 1


def test_streaming_decodes_each_token_a_bounded_number_of_times(loaded, monkeypatch):
    """Each step decodes the tokens since the last piece, not the whole text: the decoded lengths add up
    to a small multiple of the text's tokens (the old whole-text decoding added up to n^2 / 2)."""
    model, tok = loaded
    decoded: list[int] = []
    decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda ids: decoded.append(len(ids)) or decode(ids))
    pieces: list[str] = []
    text, n = generate.generate_text(model, tok, "Hamlet", 200, temperature=1.0, seed=3, on_text=pieces.append)
    assert n > 100 and "".join(pieces) == text
    assert sum(decoded) < 12 * n


@pytest.mark.parametrize("kind", ["bbpe", "bpe"])
def test_text_pieces_add_up_to_the_whole_decoding(kind, tmp_path):
    """Random token sequences (byte-level ones cut characters apart): the pieces, each ending in whole
    characters, join into the decoding of the whole sequence."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("Où est le café? 日本 — O Romeo, Romeo!\n  indented line.\n" * 50
                      + (REPO / "data" / "shakespeare.txt").read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    tok = train_tokenizer(corpus_files([corpus]), kind, 400, show_progress=False)
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.integers(0, tok.vocab_size, 60).tolist()
        pieces = list(generate.text_pieces(tok, ids))
        assert all(not piece.endswith("\ufffd") for piece in pieces)
        assert tok.decode(ids).startswith("".join(pieces))
    ids = tok.encode("Où est le café? 日本 — O Romeo, Romeo!\n  indented line.\n")
    assert "".join(generate.text_pieces(tok, ids)) == tok.decode(ids)


def test_samples_are_generated_as_one_batch(loaded, monkeypatch):
    model, tok = loaded
    batches: list[int] = []
    stream = model.stream
    monkeypatch.setattr(model, "stream", lambda idx, *a, **k: batches.append(idx.size(0)) or stream(idx, *a, **k))
    samples = generate.generate_batch(model, tok, "KING.", 3, 25, temperature=1.0, seed=7)
    assert batches == [3] and len(samples) == 3 and len({tuple(s) for s in samples}) > 1  # sampled apart
    greedy = generate.generate_batch(model, tok, "KING.", 2, 25, temperature=0)
    alone, _ = generate.generate_text(model, tok, "KING.", 25, temperature=0)
    assert [tok.decode(ids) for ids in greedy] == [alone, alone]


def test_prompt_round_trips_through_the_checkpoint_tokenizer(loaded):
    _, tok = loaded
    prompt = "Où est le café? 日本 — O Romeo, Romeo!\n"
    assert tok.decode(tok.encode(prompt)) == prompt


def test_evaluate_bits_per_byte_equals_a_hand_computation(loaded, tmp_path):
    model, tok = loaded
    text = (REPO / "data" / "shakespeare.txt").read_text(encoding="utf-8")[50_000:52_000]
    (tmp_path / "t.txt").write_text(text, encoding="utf-8", newline="")
    result = evaluate_tokens(model, *encode_file(tmp_path / "t.txt", tok), batch_size=3)
    ids = tok.encode(text)
    nats, count = 0.0, 0
    for start in range(0, len(ids) - 1, 32):  # windows of 33 tokens sharing their boundary token
        window = torch.tensor([ids[start:start + 33]])
        logits, loss = model(window[:, :-1], window[:, 1:])
        nats += loss.item() * (window.size(1) - 1)
        count += window.size(1) - 1
    assert count == len(ids) - 1
    assert result["loss"] == pytest.approx(nats / count, rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / len(text.encode("utf-8")), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nats / count), rel=1e-5)


def test_evaluate_encodes_a_large_file_piece_by_piece_without_losing_text(loaded, tmp_path, monkeypatch):
    _, tok = loaded
    text = (REPO / "data" / "shakespeare.txt").read_text(encoding="utf-8")[:40_000]
    (tmp_path / "t.txt").write_text(text, encoding="utf-8", newline="")
    monkeypatch.setattr(evaluate, "CHUNK_BYTES", 5_000)  # so the text goes to the tokenizer in about 8 pieces
    ids, n_bytes = encode_file(tmp_path / "t.txt", tok)
    assert ids.dtype == np.uint16 and n_bytes == len(text.encode("utf-8"))
    assert tok.decode(ids.tolist()) == text  # pieces end at line ends: nothing is cut or lost


# ---------------------------------------------------------------------- the CLI

def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "generate.py"), *args], capture_output=True,
                          text=True, timeout=120, input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL)


def test_cli_streams_prompt_and_samples_with_stats(ckpt_path):
    r = cli("--checkpoint", str(ckpt_path), "--prompt", "KING.", "--max_new_tokens", "15", "--num_samples", "2",
            "--stats", "--seed", "4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("KING.") >= 2 and "---------- sample 2 of 2 ----------" in r.stdout
    assert r.stderr.count("stats: ") == 1 and "tokens/s" in r.stderr  # one batch, one line
    again = cli("--checkpoint", str(ckpt_path), "--prompt", "KING.", "--max_new_tokens", "15", "--num_samples", "2",
                "--seed", "4")
    assert again.stdout == r.stdout  # same seed, same text


def test_cli_reads_a_piped_prompt_and_crops_a_long_one_with_a_notice(ckpt_path):
    r = cli("--checkpoint", str(ckpt_path), "--max_new_tokens", "5", stdin="word " * 100)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("word word")
    assert "notice: the prompt has" in r.stderr and "last 32 (block_size)" in r.stderr


@pytest.mark.parametrize("case", ["missing", "corrupt", "version", "max_new_tokens", "top_p", "top_k",
                                  "temperature", "prompt_file", "both prompts", "tokenizer"])
def test_cli_bad_input_is_one_line(case, ckpt_path, tmp_path):
    corrupt = tmp_path / "corrupt.tar"
    corrupt.write_bytes(ckpt_path.read_bytes()[:1000])  # a truncated file
    old = tmp_path / "old.tar"
    torch.save({**load_checkpoint(ckpt_path), "version": 999}, old)
    other_tok = tmp_path / "other.json"
    (tmp_path / "c.txt").write_text("other text for another tokenizer " * 50)
    train_tokenizer([tmp_path / "c.txt"], "bbpe", 280, show_progress=False).save(other_tok)
    ck = ["--checkpoint", str(ckpt_path), "--prompt", "x"]
    args, expected = {
        "missing": (["--checkpoint", str(tmp_path / "nope.tar")], "checkpoint not found"),
        "corrupt": (["--checkpoint", str(corrupt)], "is not a readable checkpoint"),
        "version": (["--checkpoint", str(old)], "format version 999"),
        "max_new_tokens": ([*ck, "--max_new_tokens", "0"], "--max_new_tokens must be a positive integer"),
        "top_p": ([*ck, "--top_p", "1.5"], "--top_p must be in (0, 1]"),
        "top_k": ([*ck, "--top_k", "0"], "--top_k must be a positive integer"),
        "temperature": ([*ck, "--temperature", "-1"], "--temperature must be >= 0"),
        "prompt_file": (["--checkpoint", str(ckpt_path), "--prompt_file", str(tmp_path / "no.txt")],
                        "cannot read --prompt_file"),
        "both prompts": ([*ck, "--prompt_file", str(tmp_path / "c.txt")], "not both"),
        "tokenizer": ([*ck, "--tokenizer", str(other_tok)], "does not match the checkpoint"),
    }[case]
    r = cli(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], r.stderr


def test_evaluate_cli_reports_all_three_figures(ckpt_path, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Who's there? Nay, answer me: stand, and unfold yourself.\n" * 20)
    r = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--checkpoint", str(ckpt_path), str(text)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "nats/token" in r.stdout and "perplexity" in r.stdout and "bits/byte" in r.stdout
    empty = tmp_path / "e.txt"
    empty.write_text("")
    r = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--checkpoint", str(ckpt_path), str(empty)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


def run_generate(argv: list[str], capsys) -> tuple[int, str, str]:
    return run_main(generate.main, argv, capsys)


class PipedBytes(io.TextIOWrapper):
    """A piped standard input holding these bytes, decoded as Python does under a C locale."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data), encoding="ascii", errors="surrogateescape")

    def isatty(self) -> bool:
        return False


@pytest.mark.parametrize(("stdin", "argv", "says"), [
    (None, [], "error: no prompt: standard input is closed; give --prompt TEXT or --prompt_file FILE (--prompt '' "
               "generates from scratch)"),
    (PipedBytes(b"caf\xe9 au lait"), [], "error: standard input is not UTF-8 text"),
    (PipedBytes(b""), ["--prompt", "caf\udce9"], "error: --prompt is not UTF-8 text"),  # argv bytes, as read
])
def test_a_prompt_that_cannot_be_read_is_one_line(ckpt_path, monkeypatch, capsys, stdin, argv, says):
    monkeypatch.setattr(sys, "stdin", stdin)  # None: started with `<&-`
    status, out, err = run_generate(["--checkpoint", str(ckpt_path), *argv], capsys)
    assert (status, out, err) == (2, "", says + "\n")


def test_closed_stdin_with_a_prompt_generates(ckpt_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", None)
    status, out, err = run_generate(["--checkpoint", str(ckpt_path), "--prompt", "KING.", "--max_new_tokens", "3",
                                     "--device", "cpu"], capsys)
    assert status == 0 and out.startswith("KING."), err
