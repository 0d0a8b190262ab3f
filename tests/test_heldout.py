"""The validation split is held out from the tokenizer too: the one playground.py trains for itself and the
one preprocessing/train_tokenizer.py makes learn from the same training bytes as the token cache, never from a
byte of the validation text; evaluate.py warns when it scores a file the tokenizer learned from."""

from pathlib import Path

import pytest
from conftest import BUNDLED_CORPUS

import evaluate
import playground
from config import parse_config
from gptlab import tokenizer as tokenizer_module
from gptlab.checkpoint import load_checkpoint
from gptlab.data import build_token_cache, cache_key, val_start
from gptlab.tokenizer import Tokenizer, iter_corpus, train_tokenizer
from preprocessing import train_tokenizer as train_tokenizer_cli

WORD = "Zorblaxian"  # a word of the validation text alone: a tokenizer that saw it learns it as one token
TINY = ["--embedding_dim", "32", "--num_of_layers", "1", "--num_of_heads", "2", "--block_size", "16",
        "--batch_size", "2", "--eval_iters", "1", "--max_iters", "1", "--eval_interval", "1", "--sample_tokens", "0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """About 30 kB of Shakespeare, then 2 kB where every line holds WORD: the last 10% of the bytes (the default
    split) are the end of the Shakespeare and all of the WORD lines."""
    text = BUNDLED_CORPUS.read_text(encoding="utf-8")[:30_000]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text[:text.rindex("\n") + 1] + f"{WORD} speaks, {WORD} answers.\n" * 60, encoding="utf-8")
    return path


def learned_word(tok: Tokenizer) -> bool:
    return any(WORD[1:7] in token for token in tok.hf.get_vocab())


def train(tmp_path: Path, *args: str) -> Path:
    checkpoint = tmp_path / "ckpt.tar"
    c, set_by_flags = parse_config([*args, "--out_dir", str(tmp_path / "runs"), "--checkpoint", str(checkpoint),
                                    *TINY])
    playground.train(c, set_by_flags)
    return checkpoint


def test_the_word_is_learned_from_the_whole_corpus(corpus):
    """The probe works: a tokenizer trained on every byte (what playground.py used to do) learns WORD."""
    assert WORD in corpus.read_text()[val_start([corpus], 0.1):]
    assert learned_word(train_tokenizer([corpus], "bbpe", 400, show_progress=False))


def test_playground_tokenizer_reads_exactly_the_training_bytes(tmp_path, corpus, monkeypatch):
    read: list[str] = []

    def spy(files: list[Path], end: int | None = None, *args: object):
        for piece in iter_corpus(files, end, *args):
            read.append(piece)
            yield piece

    monkeypatch.setattr(tokenizer_module, "iter_corpus", spy)
    ckpt = load_checkpoint(train(tmp_path, str(corpus), "--vocab_size", "400"))
    trained = Tokenizer.from_json(ckpt["tokenizer"])
    assert not learned_word(trained)
    # It read the training split's bytes, all of them and no others: the token cache's train split.
    splits = build_token_cache([corpus], trained, tmp_path / "runs" / "token_cache", 0.1)
    assert "".join(read).encode() == corpus.read_bytes()[:splits["train"].num_bytes]
    # The checkpoint says so, for evaluate.py.
    [record] = ckpt["tokenizer_learned_from"]
    assert (record["learned_bytes"], record["bytes"]) == (splits["train"].num_bytes, corpus.stat().st_size)


def test_a_tokenizer_saved_before_the_split_was_held_out_is_never_reused(tmp_path, corpus):
    """Old runs left tokenizer-<kind><size>-<corpus hash>.json in out_dir, trained on every byte."""
    leaked = train_tokenizer([corpus], "bbpe", 400, show_progress=False, bert_tokens=True)
    (tmp_path / "runs").mkdir()
    leaked.save(tmp_path / "runs" / f"tokenizer-bbpe400-{cache_key([corpus], None, 0.0)[:12]}.json")
    used = Tokenizer.from_json(load_checkpoint(train(tmp_path, str(corpus), "--vocab_size", "400"))["tokenizer"])
    assert not learned_word(used) and used.to_json() != leaked.to_json()


def test_cli_holds_out_the_same_split_as_playground(tmp_path, corpus):
    train_tokenizer_cli.main([str(corpus), "bbpe", "--vocab_size", "400", "--bert_tokens",
                              "--out", str(tmp_path / "cli.json")])
    cli = Tokenizer.from_file(tmp_path / "cli.json")
    assert not learned_word(cli)
    auto = Tokenizer.from_json(load_checkpoint(train(tmp_path, str(corpus), "--vocab_size", "400"))["tokenizer"])
    assert cli.to_json() == auto.to_json()
    train_tokenizer_cli.main([str(corpus), "bbpe", "--vocab_size", "400", "--val_fraction", "0",
                              "--out", str(tmp_path / "all.json")])
    assert learned_word(Tokenizer.from_file(tmp_path / "all.json"))


@pytest.mark.parametrize("val_fraction", [0.1, 0.25, 0.5, 0.62])
def test_the_token_cache_and_the_tokenizer_agree_on_the_split(tmp_path, val_fraction):
    """Several documents (one without a final newline, one empty, one a single long line): the cache's train
    split is exactly the text before val_start, and iter_corpus stops there."""
    texts = ["one\ntwo two\nthree three three\n", "", "x" * 97, "no newline at the end", "é\n" * 40, "y" * 50 + "\n"]
    files = []
    for i, text in enumerate(texts):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_text(text, encoding="utf-8")
    corpus = "".join(texts).encode()
    tok = train_tokenizer(files, "bbpe", 300, show_progress=False)
    end = val_start(files, val_fraction)
    splits = build_token_cache(files, tok, tmp_path / "cache", val_fraction)
    assert splits["train"].num_bytes == end and splits["val"].num_bytes == len(corpus) - end
    assert "".join(iter_corpus(files, end)).encode() == corpus[:end]
    # val starts at a line start: a file's first byte, or the byte after a newline
    starts = {0, len(corpus)} | {i + 1 for i, b in enumerate(corpus) if b == ord("\n")}
    starts |= {len("".join(texts[:i]).encode()) for i in range(len(texts))}
    assert end in starts and int(len(corpus) * (1 - val_fraction)) <= end


def test_evaluate_warns_on_text_the_tokenizer_learned_from(tmp_path, corpus, capsys, monkeypatch):
    checkpoint = train(tmp_path, str(corpus), "--vocab_size", "400")
    scores = {"loss": 1.0, "perplexity": 2.7, "bits_per_byte": 1.0, "tokens": 1, "bytes": 1}
    monkeypatch.setattr(evaluate, "evaluate_tokens", lambda *args, **kwargs: scores)  # the warning is the point
    val_text = tmp_path / "val.txt"
    val_text.write_bytes(corpus.read_bytes()[val_start([corpus], 0.1):])
    capsys.readouterr()
    evaluate.main([str(corpus), str(val_text), "--checkpoint", str(checkpoint)])
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and f"bytes of {corpus}: its scores are not those of held-out" in err
    # a --tokenizer file is the user's choice: what it learned from is unknown, so no warning
    (tmp_path / "b").mkdir()
    own = train(tmp_path / "b", str(corpus), "--tokenizer", str(tmp_path / "runs" / next(
        p.name for p in (tmp_path / "runs").glob("tokenizer-*.json"))))
    assert load_checkpoint(own)["tokenizer_learned_from"] is None
    evaluate.main([str(corpus), "--checkpoint", str(own)])
    assert "warning" not in capsys.readouterr().err
