"""The corpus as the tokenizer's training and the token cache read it (gptlab.corpus, one reader for both):
bounded pieces whatever the lines look like, the same refusals in the same words, and progress a log file can
show."""

import os
from pathlib import Path

import numpy as np
import pytest

from gptlab import corpus as corpus_module
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
    monkeypatch.setattr(corpus_module, "CHUNK_BYTES", 1000)
    monkeypatch.setattr(data, "CHUNK_BYTES", 1000)
    text = "Romeo é日本🙂 and Juliet, " * 2000  # 62 kB without a line break; multi-byte characters
    corpus = tmp_path / "one_line.txt"
    corpus.write_text(text + "\nthe end\n", encoding="utf-8")
    pieces = [piece for _, piece in data._split_lines([corpus], 0.1) if piece is not None]
    assert max(piece.size for piece in pieces) <= 1000
    assert "".join(piece.text for piece in pieces).encode() == corpus.read_bytes()
    splits = data.build_token_cache([corpus], tokenizer, tmp_path / "cache", 0.1)
    ids = np.concatenate([splits[s].tokens() for s in ("train", "val")])
    assert tokenizer.decode([int(i) for i in ids if i != tokenizer.eot_id]) == corpus.read_text(encoding="utf-8")


@pytest.mark.parametrize("case, expected", [
    ("nul", "bad.txt holds NUL bytes: a binary file, not text"),
    ("latin-1", "bad.txt is not UTF-8 text (a binary file?)"),
    ("whitespace", "bad.txt holds only whitespace (188 characters) before its validation text"),
    ("nothing", "bad.txt holds nothing before its validation text"),
    ("folder", "is not a regular file"),
    ("fifo", "is not a regular file"),
])
def test_the_tokenizer_and_the_token_cache_refuse_the_same_corpora_in_the_same_words(tmp_path, tokenizer, case,
                                                                                     expected):
    path = tmp_path / "bad.txt"
    if case == "folder":
        path.mkdir()
    elif case == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("POSIX FIFOs")
        os.mkfifo(path)  # reading it would wait forever for a writer
    else:
        path.write_bytes({"nul": bytes([5, 0, 17, 0]) * 100 + b"\n" * 20,  # valid UTF-8: a uint16 token cache
                          "latin-1": "Roméo et Juliette\n".encode("latin-1") * 20,
                          "whitespace": b" \n" * 100 + b"the end\n",  # only whitespace before val_start
                          "nothing": b"",
                          }[case])
    # the training split's end, as playground.py and train_tokenizer.py give it (it reads only regular files)
    end = data.val_start([path], 0.1) if path.is_file() else None
    errors = []
    for call in (lambda: train_tokenizer([path], "bbpe", 300, show_progress=False, end=end),
                 lambda: data.build_token_cache([path], tokenizer, tmp_path / "cache", 0.1)):
        with pytest.raises(UsageError) as refused:
            call()
        errors.append(str(refused.value))
    assert errors[0] == errors[1] and expected in errors[0] and "\n" not in errors[0], errors
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.bin"))


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


def _random_corpus(folder: Path, rng: np.random.Generator, chunk: int) -> list[Path]:
    """A few files of lines of every shape: empty, short, multi-byte, CRLF, longer than the patched piece size
    `chunk` or just as long, with and without a last line end."""
    words = ["a", "Romeo", "é日本", "🙂", " ", "\t", "\r\n", "x" * 150, *("y" * (chunk - k) for k in (0, 1, 2))]
    files = []
    for i in range(int(rng.integers(1, 4))):
        lines = ["".join(rng.choice(words, size=int(rng.geometric(0.2 if rng.random() < 0.9 else 0.01))))
                 for _ in range(int(rng.integers(0, 120)))]
        text = "\n".join(lines) + ("\n" if rng.random() < 0.7 else "")
        files.append(folder / f"{i}.txt")
        files[-1].write_text(text, encoding="utf-8", newline="")
    return files


@pytest.mark.parametrize("seed", range(40))
def test_blocks_of_lines_give_the_pieces_and_samples_that_single_lines_give(tmp_path, monkeypatch, seed):
    """The token cache and the tokenizer's sample read text files in Blocks (thousands of lines at once, for
    speed); the line-by-line reader is the reference: the same pieces at the same line indices, and the same
    sampled text and record, at random piece, read and sample sizes."""
    from gptlab import tokenizer as tokenizer_module

    rng = np.random.default_rng(seed)
    chunk = int(rng.integers(40, 400))
    files = _random_corpus(tmp_path, rng, chunk)
    if not any("".join(f.read_text(encoding="utf-8") for f in files).split()):
        files[0].write_text("some text\n", encoding="utf-8")
    monkeypatch.setattr(corpus_module, "CHUNK_BYTES", chunk)
    monkeypatch.setattr(data, "CHUNK_BYTES", chunk)
    monkeypatch.setattr(corpus_module, "BLOCK_BYTES", int(rng.integers(1, 8 * chunk)))
    monkeypatch.setattr(tokenizer_module, "READ_CHARS", int(rng.integers(20, 200)))
    monkeypatch.setattr(tokenizer_module, "SAMPLE_BLOCK", int(rng.integers(1, 300)))
    val_fraction, sample = float(rng.choice([0.05, 0.1, 0.5])), int(rng.integers(50, 4000))

    def read() -> tuple[list, list, list]:
        end = data.val_start(files, val_fraction)
        reading = tokenizer_module.Reading(files, "text")
        sampled = list(tokenizer_module.iter_corpus(files, end, "text", sample, reading))
        return list(data._pieces(files, val_fraction, "text")), sampled, reading.learned_from()

    in_blocks = read()
    monkeypatch.setattr(corpus_module, "_blocks", corpus_module._lines)
    assert in_blocks == read()


@pytest.mark.parametrize("sample", [2990, 2500, 1234, 31])
def test_a_sample_that_fills_up_inside_a_block_takes_the_lines_that_fit(sample):
    """Where the sample's last chosen stretch overflows it, a Block is taken line by line, as single lines are."""
    from gptlab.tokenizer import _sampled

    lines = [f"line {i:03d} of thirty bytes ....\n".encode() for i in range(100)]
    assert {len(line) for line in lines} == {30}
    block = corpus_module.Block(b"".join(lines), np.cumsum([len(line) for line in lines]))
    single = [corpus_module.Line(line.decode(), len(line)) for line in lines]

    def texts(items: list) -> list[str | None]:
        return [None if item is None else item.text for item in items]

    taken = texts(list(_sampled(iter(single), 3000, sample, None)))
    assert "".join(t for t in taken if t) and len("".join(t for t in taken if t)) <= sample
    assert "".join(t or "|" for t in texts(list(_sampled(iter([block]), 3000, sample, None)))) == \
        "".join(t or "|" for t in taken)
