"""Tokenizers: exact round-trips (bbpe), readable decoding (bpe), sizes, special ids, determinism, the
streamed corpus reader, and the CLI's handling of bad input."""

import subprocess
import sys
from pathlib import Path

import pytest

from gptlab.data import val_start
from gptlab.errors import UsageError
from gptlab.tokenizer import (
    BERT_TOKENS,
    EOT,
    MASK,
    READ_CHARS,
    UNK,
    Tokenizer,
    corpus_files,
    iter_corpus,
    train_tokenizer,
)

REPO = Path(__file__).resolve().parent.parent
MIXED = ("Plain ASCII, with punctuation!\n\tTabbed line; accents: café, naïve, Ærøskøbing, ñandú.\n"
         "CJK: 日本語のテキスト, 中文文本, 한국어.\nEmoji: 😀🚀👩‍👩‍👧 and symbols ∑∫√ €£¥.\n\n"
         "  Two leading spaces, trailing spaces   \n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Some Shakespeare plus mixed-script text, about 60 kB."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text((REPO / "data" / "shakespeare.txt").read_text()[:50_000] + MIXED * 20, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bbpe(corpus) -> Tokenizer:
    return train_tokenizer([corpus], "bbpe", 500, show_progress=False)


@pytest.fixture(scope="module")
def bpe(corpus) -> Tokenizer:
    return train_tokenizer([corpus], "bpe", 500, show_progress=False)


def test_bbpe_round_trips_any_text_exactly(bbpe):
    unseen = "Ünïcödé never seen in training: Ελληνικά, עברית, 🦀🧪, \r\n\x00 and \u200b zero width."
    for text in (MIXED, unseen, "", " ", "\n\n\n", "a" * 1000):
        assert bbpe.decode(bbpe.encode(text)) == text


def test_bpe_decodes_to_the_original_words_and_spacing(bpe):
    unseen = "Wolves  quaffed the jugs of kvass -- quickly!\n\n   Whither, Horatio?  \n"  # not in the corpus
    assert bpe.decode(bpe.encode(unseen)).split() == unseen.split()
    assert bpe.decode(bpe.encode(unseen)) == unseen  # spaces, runs of spaces and blank lines too
    assert bpe.decode(bpe.encode(MIXED)) == MIXED  # every character of MIXED was seen in training


def test_bpe_loses_only_unseen_characters_and_the_space_marker(bpe):
    ids = bpe.encode("a ⚗ b")
    assert bpe.hf.token_to_id(UNK) in ids
    assert bpe.decode(ids) == f"a {UNK} b"
    assert bpe.decode(bpe.encode("a ▁ b")) == "a   b"  # the marker itself reads back as a space


@pytest.mark.parametrize("kind", ["bpe", "bbpe"])
def test_text_encoded_in_pieces_decodes_like_the_whole(bbpe, bpe, kind):
    tok = bbpe if kind == "bbpe" else bpe
    text = "To be, or not to be:  that is\nthe question. " + MIXED
    for cut in (1, 5, 6, 7, 14, 30, 31, len(text) - 1):  # inside words, at spaces, inside runs of spaces
        assert tok.decode(tok.encode(text[:cut]) + tok.encode(text[cut:])) == text


@pytest.mark.parametrize("kind, size", [("bbpe", 300), ("bbpe", 1000), ("bpe", 300), ("bpe", 1000)])
def test_vocab_size_is_honoured_exactly(corpus, kind, size):
    assert train_tokenizer([corpus], kind, size, show_progress=False).vocab_size == size  # specials included


def test_special_tokens_have_their_documented_ids(bbpe, bpe):
    assert bbpe.eot_id == 0 and bbpe.hf.token_to_id(EOT) == 0
    assert bpe.eot_id == 0 and bpe.hf.token_to_id(UNK) == 1
    assert bbpe.hf.token_to_id(UNK) is None  # byte-level BPE never needs one
    assert bbpe.encode(EOT) == [0] and bpe.encode(EOT) == [0]  # recognised in text, not split into pieces
    assert bbpe.decode([0]) == EOT
    assert bbpe.kind == "bbpe" and bpe.kind == "bpe"


def test_several_files_and_a_folder_of_them_give_the_same_tokenizer(tmp_path, corpus):
    text = corpus.read_text(encoding="utf-8")
    folder = tmp_path / "docs"
    folder.mkdir()
    parts = [folder / "a.txt", folder / "b.txt", folder / "c.txt"]
    for i, part in enumerate(parts):
        part.write_text(text[i * 20_000:(i + 1) * 20_000], encoding="utf-8")
    (folder / "notes.md").write_text("not a .txt file: ignored")
    as_files = train_tokenizer(corpus_files(parts), "bbpe", 400, show_progress=False)
    as_folder = train_tokenizer(corpus_files([folder]), "bbpe", 400, show_progress=False)
    assert corpus_files([folder]) == parts
    assert as_files.to_json() == as_folder.to_json()


def test_training_is_deterministic(corpus):
    for kind in ("bpe", "bbpe"):
        a, b = (train_tokenizer([corpus], kind, 400, show_progress=False) for _ in range(2))
        assert a.to_json() == b.to_json()


def test_save_and_load_round_trip(tmp_path, bbpe):
    path = tmp_path / "tok.json"
    bbpe.save(path)
    loaded = Tokenizer.from_file(path)
    assert loaded.to_json() == bbpe.to_json()
    assert loaded.encode(MIXED) == bbpe.encode(MIXED)


def test_loading_a_file_that_is_not_a_tokenizer_is_a_usage_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(UsageError, match="not a tokenizer.json"):
        Tokenizer.from_file(bad)
    with pytest.raises(UsageError, match="not found"):
        Tokenizer.from_file(tmp_path / "missing.json")


def test_a_failed_save_is_a_usage_error_and_leaves_no_file(tmp_path, bbpe):
    folder = tmp_path / "models"
    folder.mkdir()
    for target in (tmp_path / "no" / "such" / "folder.json", folder):  # missing folder; a folder in the way
        with pytest.raises(UsageError, match="cannot write"):
            bbpe.save(target)
    assert [p.name for p in tmp_path.rglob("*")] == ["models"]


def test_the_corpus_is_streamed_in_bounded_pieces_that_end_at_line_ends(tmp_path):
    lines = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(3000))
    (tmp_path / "lines.txt").write_text(lines, encoding="utf-8")
    (tmp_path / "one_line.txt").write_text("x" * (5 * READ_CHARS), encoding="utf-8")
    for name, text in (("lines.txt", lines), ("one_line.txt", "x" * (5 * READ_CHARS))):
        pieces = list(iter_corpus([tmp_path / name]))
        assert "".join(pieces) == text and len(pieces) > 1
        assert max(map(len, pieces)) <= 2 * READ_CHARS
    assert all(piece.endswith("\n") for piece in iter_corpus([tmp_path / "lines.txt"]))


def test_folders_are_searched_for_txt_files_only(tmp_path):
    (tmp_path / "notes.md").write_text("no .txt here")
    with pytest.raises(UsageError, match="no .txt files in folder"):
        corpus_files([tmp_path])
    with pytest.raises(UsageError, match="corpus not found"):
        corpus_files([tmp_path / "missing.txt"])


# ---------------------------------------------------------------------- the CLI

def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "preprocessing" / "train_tokenizer.py"), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_trains_and_reports(tmp_path, corpus):
    result = cli(str(corpus), "bbpe", "--vocab_size", "400", "--out", "tok.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "bbpe tokenizer: 400 tokens (asked 400)" in result.stdout and "tokens/byte" in result.stdout
    saved = Tokenizer.from_file(tmp_path / "tok.json")
    assert saved.vocab_size == 400
    # Another process trains the same tokenizer (on the training split: the CLI holds out the last 10% by
    # default): training does not depend on hash seeds or thread timing.
    end = val_start([corpus], 0.1)
    assert saved.to_json() == train_tokenizer([corpus], "bbpe", 400, show_progress=False, end=end).to_json()


def test_cli_default_output_is_tokenizer_json_in_the_current_folder(tmp_path, corpus):
    assert cli(str(corpus), "bpe", "--vocab_size", "300", cwd=tmp_path).returncode == 0
    assert Tokenizer.from_file(tmp_path / "tokenizer.json").kind == "bpe"


@pytest.mark.parametrize("case", ["missing", "no txt", "empty", "binary", "nul", "kind", "small bbpe", "zero",
                                  "unwritable"])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, corpus, case):
    (tmp_path / "empty.txt").write_text(" \n\n")
    (tmp_path / "binary.txt").write_bytes(bytes(range(128, 256)) * 20)  # not UTF-8 (and no NUL: see "nul")
    (tmp_path / "ids.txt").write_bytes(bytes([5, 0, 17, 0, 99, 1]) * 100)  # a uint16 token cache: valid UTF-8
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.md").write_text("not a .txt file")
    args, expected = {
        "missing": (["nope.txt", "bbpe"], "corpus not found: nope.txt"),
        "no txt": (["notes", "bbpe"], "no .txt files in folder notes"),
        "empty": (["empty.txt", "bbpe"], "the corpus is empty"),
        "binary": (["binary.txt", "bbpe"], "binary.txt is not UTF-8 text"),
        "nul": (["ids.txt", "bpe"], "ids.txt holds NUL bytes"),
        "kind": ([str(corpus), "wordpiece"], "invalid choice: 'wordpiece'"),
        "small bbpe": ([str(corpus), "bbpe", "--vocab_size", "200"], "at least 257"),
        "zero": ([str(corpus), "bpe", "--vocab_size", "0"], "at least 3"),
        "unwritable": ([str(corpus), "bbpe", "--out", "notes/a.md/tok.json"], "is a file, not a folder"),
    }[case]
    out = tmp_path / "out.json"
    result = cli(*args, *([] if "--out" in args else ["--out", str(out)]), cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.rglob("*") if "json" in p.name or "tmp" in p.name] == []


@pytest.mark.parametrize("kind, first_id", [("bbpe", 1), ("bpe", 2)])
def test_bert_tokens_follow_the_base_specials_in_documented_order(corpus, kind, first_id):
    tok = train_tokenizer([corpus], kind, 500, show_progress=False, bert_tokens=True)
    assert tok.eot_id == 0
    for offset, token in enumerate(BERT_TOKENS):
        assert tok.special_id(token, "test") == first_id + offset
        assert tok.encode(f"a {token} b").count(first_id + offset) == 1  # the literal text is the token
    assert tok.vocab_size == 500


def test_missing_bert_token_is_a_clear_error(bbpe):
    with pytest.raises(UsageError, match="fill-mask needs the <mask> token.*--bert_tokens"):
        bbpe.special_id(MASK, "fill-mask")
