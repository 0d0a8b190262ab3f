"""The corpus as the token cache reads it: bounded pieces whatever the lines look like, binary data and things
that are not files refused up front, and progress a log file can show."""

import os
from pathlib import Path

import numpy as np
import pytest

from gptlab import data
from gptlab.errors import UsageError
from gptlab.tokenizer import Tokenizer, corpus_files, train_tokenizer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    corpus = tmp_path_factory.mktemp("tok") / "c.txt"
    corpus.write_text((REPO / "data" / "shakespeare.txt").read_text(encoding="utf-8")[:20_000] + "é日本🙂\n")
    return train_tokenizer([corpus], "bbpe", 300, show_progress=False)


def test_a_sparse_file_is_refused_at_its_first_piece(tmp_path, tokenizer):
    """A 2 GB sparse file was read as one 2 GB line and grew past 23 GB; NUL bytes are refused at once."""
    sparse = tmp_path / "sparse.txt"
    with open(sparse, "wb") as f:
        f.truncate(256 << 20)  # 256 MB of zeros, no line break, no disk used
    with pytest.raises(UsageError, match="sparse.txt holds NUL bytes"):
        data.build_token_cache([sparse], tokenizer, tmp_path / "cache", 0.1)


def test_a_line_longer_than_a_piece_streams_in_pieces_cut_between_characters(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(data, "CHUNK_BYTES", 1000)
    text = "Romeo é日本🙂 and Juliet, " * 2000  # 62 kB without a line break; multi-byte characters
    corpus = tmp_path / "one_line.txt"
    corpus.write_text(text + "\nthe end\n", encoding="utf-8")
    pieces = [piece for _, piece in data._split_lines([corpus], 0.1) if piece is not None]
    assert max(map(len, pieces)) <= 1000 and b"".join(pieces) == corpus.read_bytes()
    splits = data.build_token_cache([corpus], tokenizer, tmp_path / "cache", 0.1)
    ids = np.concatenate([np.fromfile(splits[s].path, dtype=splits[s].dtype) for s in ("train", "val")])
    assert tokenizer.decode([int(i) for i in ids if i != tokenizer.eot_id]) == corpus.read_text(encoding="utf-8")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
@pytest.mark.parametrize("kind", ["fifo", "/dev/null", "/dev/zero"])
def test_a_corpus_that_is_not_a_regular_file_says_so(tmp_path, kind):
    path = tmp_path / "fifo" if kind == "fifo" else Path(kind)
    if kind == "fifo":
        os.mkfifo(path)
    with pytest.raises(UsageError, match=f"{path} is not a regular file"):
        corpus_files([path])


def test_outside_a_terminal_the_long_phases_print_a_line_every_30_s(tmp_path, tokenizer, monkeypatch, capsys):
    """In a log file (SLURM, nohup) a tokenizer or token cache of minutes says how far it is: bytes, MB/s, ETA."""
    from gptlab import progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)  # every update, so that a tiny corpus shows it
    corpus = tmp_path / "c.txt"
    corpus.write_text((REPO / "data" / "shakespeare.txt").read_text(encoding="utf-8")[:20_000])
    data.build_token_cache([corpus], tokenizer, tmp_path / "cache", 0.1)
    train_tokenizer([corpus], "bbpe", 300, show_progress=True)
    err = capsys.readouterr().err  # pytest's stderr is not a terminal
    for phase in ("tokenizing", "reading corpus"):
        line = next(line for line in err.splitlines() if line.startswith(f"{phase}: "))
        assert " of 0 MB (" in line and " MB/s, about " in line and line.endswith(" s left"), line
