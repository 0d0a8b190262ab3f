"""The token cache's fast engine (gptlab.encoding): tiktoken with the byte-level BPE converted must write exactly
the token files of the reference engine (Hugging Face tokenizers), and a tokenizer it cannot run exactly keeps
the reference engine, which the log names."""

import json
import os
import random
from pathlib import Path

import pytest

from gptlab import corpus as corpus_module
from gptlab import data, encoding
from gptlab.encoding import ReferenceEncoder, encoder_for
from gptlab.tokenizer import Tokenizer, corpus_files, train_tokenizer

BUNDLED = Path(__file__).resolve().parent.parent / "data" / "shakespeare.txt"
# The sweep over code points takes every UNICODE_STRIDE-th one (1: all of them, a few seconds more).
UNICODE_STRIDE = int(os.environ.get("UNICODE_STRIDE", 29))
SPECIALS = ["<|endoftext|>", "<mask>", "<pad>", "<cls>", "<sep>"]
# Text a corpus of the world holds, and what tends to break a conversion: CRLF, a lone \r, a byte-order mark,
# emoji (with a zero-width joiner and skin tones), non-Latin scripts, combining marks, digits of other scripts,
# whitespace Python and Rust disagree on (\x1c, U+2028), contractions, and special tokens inside the text.
WORLD = ("\ufeffThe quick brown fox\r\njumps over\rthe lazy dog's back; we'll see, they're 'ere.\r\n"
         "Ünïcödé naïve café — “quotes” … 𝔘𝔫𝔦𝔠𝔬𝔡𝔢\n日本語のテキスト、中文文本。한국어 텍스트.\n"
         "Русский текст, ελληνικά, עברית, العربية ١٢٣, हिन्दी देवनागरी ०१२, ไทย\n"
         "emoji 🙂👍🏽 👨‍👩‍👧 🇫🇷 e\u0301 a\u0308\n\ttabs\t\tand  spaces   \u00a0nbsp \u2028sep\x1cfs\n"
         "<|endoftext|> a <mask> b  <mask><pad><cls> <sep>x<mask\n12345 3.14159 1e-9 0x1F\n")


def tokenizer_on(text: str, tmp_path: Path, vocab_size: int = 600, kind: str = "bbpe",
                 bert_tokens: bool = True) -> Tokenizer:
    corpus = tmp_path / f"train_{kind}.txt"
    corpus.write_text(text, encoding="utf-8")
    return train_tokenizer([corpus], kind, vocab_size, show_progress=False, bert_tokens=bert_tokens)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    """A byte-level BPE with every special token, trained on Shakespeare and the world's text."""
    text = BUNDLED.read_text(encoding="utf-8")[:60_000] + WORLD * 20
    return tokenizer_on(text, tmp_path_factory.mktemp("tok"))


def token_files(files: list[Path], tok: Tokenizer, cache: Path, reference: bool, monkeypatch) -> list[bytes]:
    """The token cache's train and val files, written by the fast engine or the reference one."""
    with monkeypatch.context() as m:
        if reference:
            m.setattr(data, "encoder_for", lambda t: ReferenceEncoder(t, "the reference"))
        splits = data.build_token_cache(files, tok, cache, 0.1)
    return [b"".join(p.read_bytes() for p in splits[s].paths) for s in ("train", "val")]


def corpus_shape(shape: str, folder: Path, monkeypatch) -> list[Path]:
    """The corpus shapes the suite builds caches of: one file, a folder of documents, a line longer than a piece,
    the world's text, and the bundled corpus."""
    folder.mkdir()
    if shape == "bundled":
        return [BUNDLED]
    if shape == "documents":
        for i, text in enumerate(["First document.\n" * 50, WORLD, "no newline at the end", "\n\n\n"]):
            (folder / f"{i}.txt").write_text(text, encoding="utf-8")
        return corpus_files([folder])
    if shape == "long line":  # cut into pieces between characters, where the pieces meet
        for module in (corpus_module, data):
            monkeypatch.setattr(module, "CHUNK_BYTES", 1000)
        text = "Romeo é日本🙂 and Juliet, <mask> " * 500 + "\n"
    else:
        text = {"world": WORLD * 30, "slice": BUNDLED.read_text(encoding="utf-8")[:30_000]}[shape]
    path = folder / "corpus.txt"
    path.write_bytes(text.encode("utf-8"))  # bytes: CRLF and the BOM as they are
    return [path]


@pytest.mark.parametrize("shape", ["slice", "documents", "long line", "world", "bundled"])
def test_token_files_are_byte_identical_to_the_reference_engine(tmp_path, tokenizer, shape, monkeypatch):
    files = corpus_shape(shape, tmp_path / "corpus", monkeypatch)
    assert encoder_for(tokenizer).name == "tiktoken"
    fast = token_files(files, tokenizer, tmp_path / "fast", False, monkeypatch)
    assert fast == token_files(files, tokenizer, tmp_path / "reference", True, monkeypatch)
    assert len(fast[0]) > 0 and len(fast[1]) > 0


def fuzzed(rng: random.Random, n: int) -> list[str]:
    """Short strings drawn from pieces that stress the split and the added tokens, and any code point."""
    pieces = [*SPECIALS, "<mask", "|endoftext|>", "<", ">", " ", "  ", "\t", "\n", "\r\n", "\r", "\u2028", "\x1c",
              "\xa0", "\u3000", "'s", "'ll", "'", "a", "Z", "é", "e\u0301", "日本", "🙂", "👍🏽", "‍", "٣", "१", "7",
              "ab", "the", " the", "!!", ".", "...", "—", "\ufeff", "𝔘"]
    strings = []
    for _ in range(n):
        parts = [rng.choice(pieces) if rng.random() < 0.85 else chr(rng.choice([rng.randrange(32, 0x2FFF),
                 rng.randrange(0xE000, 0x110000)])) for _ in range(rng.randrange(0, 12))]
        strings.append("".join(parts))
    return strings


def test_ten_thousand_fuzzed_strings_encode_to_the_same_ids(tokenizer):
    strings = fuzzed(random.Random(0), 10_000)
    assert encoder_for(tokenizer).encode_batch(strings) == tokenizer.encode_batch(strings)


def test_added_tokens_are_cut_out_as_tokenizers_cuts_them(tokenizer):
    """Normalized added tokens are looked for only between the others, the longest match wins, and lstrip
    takes the whitespace before a token."""
    tok = Tokenizer.from_json(tokenizer.to_json())
    from tokenizers import AddedToken
    tok.hf.add_tokens([AddedToken("sk> x", normalized=True), AddedToken("<ma", normalized=True),
                       AddedToken("<mask> y", normalized=True, lstrip=True), AddedToken(" hi", normalized=False)])
    strings = fuzzed(random.Random(1), 2_000) + ["a <mask> x <ma <mask> y  <mask> y\n hi", "\n\n<ma hi<mask"]
    fast = encoder_for(tok)
    assert fast.name == "tiktoken"
    assert fast.encode_batch(strings) == tok.encode_batch(strings)


def test_one_thread_and_many_give_the_same_ids(tokenizer):
    texts = [WORLD * 3, "", "<mask>", BUNDLED.read_text(encoding="utf-8")[:5_000]]
    assert encoder_for(tokenizer, threads=1).encode_batch(texts) == encoder_for(tokenizer, threads=3).encode_batch(
        texts) == tokenizer.encode_batch(texts)


def edited(tok: Tokenizer, edit) -> Tokenizer:
    spec = json.loads(tok.to_json())
    edit(spec)
    return Tokenizer.from_json(json.dumps(spec))


def swap_two_merged_tokens(spec: dict) -> None:
    vocab = spec["model"]["vocab"]
    a, b = (spec["model"]["merges"][i] for i in (0, 1))
    a, b = "".join(a), "".join(b)
    vocab[a], vocab[b] = vocab[b], vocab[a]


@pytest.mark.parametrize("case, reason", [
    ("bpe", "not a byte-level BPE"),
    ("normalizer", "a normalizer"),
    ("prefix space", "prefix space"),
    ("merges out of order", "merges out of id order"),
    ("single word", "single_word"),
])
def test_a_tokenizer_tiktoken_cannot_run_exactly_keeps_the_reference_engine(tmp_path, tokenizer, case, reason,
                                                                            monkeypatch, capsys):
    if case == "bpe":
        tok = tokenizer_on(BUNDLED.read_text(encoding="utf-8")[:20_000], tmp_path, 300, kind="bpe")
    else:
        tok = edited(tokenizer, {
            "normalizer": lambda s: s.update(normalizer={"type": "Lowercase"}),
            "prefix space": lambda s: s["pre_tokenizer"].update(add_prefix_space=True),
            "merges out of order": swap_two_merged_tokens,
            "single word": lambda s: s["added_tokens"][1].update(single_word=True),
        }[case])
    engine = encoder_for(tok)
    assert engine.name == "tokenizers" and reason in engine.reason
    files = corpus_shape("world", tmp_path / "corpus", monkeypatch)
    capsys.readouterr()
    assert token_files(files, tok, tmp_path / "a", False, monkeypatch) == token_files(
        files, tok, tmp_path / "b", True, monkeypatch)
    assert f"token cache: encoding with tokenizers ({engine.reason})" in capsys.readouterr().out


def test_the_log_names_the_fast_engine(tmp_path, tokenizer, capsys, monkeypatch):
    data.build_token_cache(corpus_shape("slice", tmp_path / "corpus", monkeypatch), tokenizer, tmp_path / "c", 0.1)
    assert "token cache: encoding with tiktoken (byte-level BPE, converted exactly)" in capsys.readouterr().out


def byte_level(vocab: list[bytes], merges: list[tuple[bytes, bytes]]) -> dict:
    """A byte-level BPE's tokenizer.json: <|endoftext|>, the 256 bytes, then `vocab` (made by `merges`) in id
    order, split as GPT-2 splits."""
    symbols = {b: c for c, b in encoding._byte_of_symbol().items()}

    def written(token: bytes) -> str:
        return "".join(symbols[b] for b in token)

    tokens = ["<|endoftext|>", *(symbols[b] for b in range(256)), *map(written, vocab)]
    return {"version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
            "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True}],
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                              "use_regex": True}, "decoder": None,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {t: i for i, t in enumerate(tokens)},
                      "merges": [[written(a), written(b)] for a, b in merges]}}


def test_both_engines_split_every_code_point_alike():
    """tokenizers splits with Oniguruma, tiktoken with fancy-regex: their Unicode tables must agree on what is a
    letter, a number, whitespace or neither. A BPE that merges "a", "1", "!" and " " with any following byte
    shows which of them each code point stays with: after "a" only a letter does, after "1" only a number, ..."""
    merges = [(p, bytes([b])) for p in (b"a", b"1", b"!", b" ") for b in range(256)]
    tok = Tokenizer.from_json(json.dumps(byte_level([a + b for a, b in merges], merges)))
    fast = encoder_for(tok)
    assert fast.name == "tiktoken"
    points = [chr(c) for c in range(1, 0x110000, UNICODE_STRIDE) if not 0xD800 <= c <= 0xDFFF]
    texts = ["\n".join(before + c for c in points) for before in ("a", "1", "!", " ")]  # a few MB
    assert fast.encode_batch(texts) == tok.encode_batch(texts)


def test_a_token_tiktoken_would_reach_through_another_pair_is_found():
    """bc (id 257) is merged before ab (258), so "abc" becomes [a, bc]: tokenizers stops there (abc's merge is
    (ab, c)), tiktoken would join a and bc because abc is in its vocabulary."""
    spec = byte_level([b"bc", b"ab", b"abc"], [(b"b", b"c"), (b"a", b"b"), (b"ab", b"c")])
    assert "reachable through another pair" in encoding.tiktoken_ranks(spec)
    assert Tokenizer.from_json(json.dumps(spec)).encode("abc") == [ord("a") + 1, 257]  # a, bc
    spec = byte_level([b"bc", b"ab", b"abc"], [(b"b", b"c"), (b"a", b"b"), (b"a", b"bc")])
    assert encoding.tiktoken_ranks(spec)[b"abc"] == 259
    assert encoder_for(Tokenizer.from_json(json.dumps(spec))).encode_batch(["abc"]) == [[259]]
