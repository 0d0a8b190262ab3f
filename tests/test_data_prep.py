"""Real corpora: the formats users have (.jsonl/.json, .parquet, .gz, .zst, mixed in folders), the token cache in
resumable shards, preprocessing/prepare_data.py and playground.py DIR, the tokenizer's sample, a corpus named
twice, and the tokenizer's record of what it read. The token files of a .txt corpus are pinned: the speedrun
records depend on their bytes."""

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import BUNDLED_CORPUS

import playground
from config import parse_config
from gptlab import corpus as corpus_module
from gptlab import data, planning
from gptlab import tokenizer as tokenizer_module
from gptlab.checkpoint import load_checkpoint
from gptlab.corpus import corpus_files, file_hash
from gptlab.errors import UsageError
from gptlab.tokenizer import Reading, Tokenizer, iter_corpus, train_tokenizer
from preprocessing import prepare_data

REPO = Path(__file__).resolve().parent.parent
TINY = ["--embedding_dim", "32", "--num_of_layers", "1", "--num_of_heads", "2", "--block_size", "16",
        "--batch_size", "2", "--eval_iters", "1", "--max_iters", "1", "--eval_interval", "1", "--sample_tokens", "0"]
DOCUMENTS = ["First document.\nIt has two lines.\n", "", "\ufeffBOM, CRLF\r\nand a lone CR\rhere\n",
             "emoji 🙂🎉 日本語 Ελληνικά <|endoftext|> no newline at the end",
             "Romeo é日本🙂 and Juliet, " * 40 + "\nthe end\n",  # a line longer than the patched CHUNK_BYTES
             *[f"Document {i}: {'to be or not to be, ' * (i % 7 + 1)}\n" for i in range(40)]]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    corpus = tmp_path_factory.mktemp("tok") / "c.txt"
    corpus.write_text(BUNDLED_CORPUS.read_text(encoding="utf-8")[:20_000] + "é日本🙂\n", encoding="utf-8")
    return train_tokenizer([corpus], "bbpe", 300, show_progress=False)


def token_bytes(splits: dict[str, data.TokenSplit]) -> tuple[bytes, bytes, int, int]:
    return (splits["train"].tokens().tobytes(), splits["val"].tokens().tobytes(), splits["train"].num_bytes,
            splits["val"].num_bytes)


# ------------------------------------------------------------------------------------- today's bytes, pinned

def edge_folder(folder: Path) -> Path:
    """Documents of every shape: Shakespeare, CRLF/BOM/emoji/no final newline, an empty file, a 300 kB line."""
    folder.mkdir(parents=True, exist_ok=True)
    text = BUNDLED_CORPUS.read_text(encoding="utf-8")
    (folder / "a.txt").write_text(text[:30_000][: text[:30_000].rindex("\n") + 1], encoding="utf-8")
    (folder / "b.txt").write_bytes("\ufeffBOM first\r\nCRLF line\r\n\r\nemoji 🙂🎉 日本語 Ελληνικά\rlone CR\n"
                                   "<|endoftext|> in the text\n\n\n   \n\tno newline at the end".encode())
    (folder / "c.txt").write_bytes(b"")
    (folder / "d.txt").write_text(("Romeo é日本🙂 and Juliet, " * 12_000) + "\nthe end\n" + text[30_000:80_000],
                                  encoding="utf-8")
    return folder


def test_token_files_and_tokenizers_of_txt_corpora_keep_their_bytes(tmp_path, monkeypatch):
    """Hashes computed with the code before shards and formats (commit eec787d, where train.bin and val.bin were
    the concatenations of today's shards): the bundled corpus as it is, and a folder of odd documents in pieces
    of 40 kB (several per split, a long line in pieces)."""
    files = corpus_files([edge_folder(tmp_path / "edge")])
    tok = train_tokenizer([tmp_path / "edge" / "a.txt"], "bbpe", 300, show_progress=False)
    assert sha(tok.to_json().encode()) == "f6c6cf2951700328"
    held_out = train_tokenizer(files, "bbpe", 300, show_progress=False, end=data.val_start(files, 0.1),
                               sample=1 << 30)
    assert sha(held_out.to_json().encode()) == "c5640965ccea0539"
    pinned = {"bundled": (753649, 1036249, "be3d94328269d754", 84216, 115119, "3d4504e0b182e5ce"),
              "edge": (348828, 406934, "c7762c4990fbee34", 32410, 45204, "0961fd8831bcd62a")}
    for name, corpus in (("bundled", [BUNDLED_CORPUS]), ("edge", files)):
        if name == "edge":
            monkeypatch.setattr(corpus_module, "CHUNK_BYTES", 40_000)
            monkeypatch.setattr(data, "CHUNK_BYTES", 40_000)
        splits = data.build_token_cache(corpus, tok, tmp_path / name, 0.1)
        got = tuple(x for s in ("train", "val") for x in (splits[s].num_tokens, splits[s].num_bytes,
                                                          sha(splits[s].tokens().tobytes())))
        assert got == pinned[name], name


# ------------------------------------------------------------------------------------------------ formats

def write_forms(folder: Path, documents: list[str]) -> dict[str, list[Path]]:
    """The same documents as .txt files, .jsonl, .json.gz, .jsonl.zst, .txt.gz files, .parquet, and a folder
    mixing them (sorted names keep the documents' order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    forms: dict[str, list[Path]] = {}
    for name in ("txt", "txt.gz", "mixed"):
        (folder / name).mkdir(parents=True)
    for i, text in enumerate(documents):
        (folder / "txt" / f"{i:03d}.txt").write_bytes(text.encode())
        (folder / "txt.gz" / f"{i:03d}.txt.gz").write_bytes(gzip.compress(text.encode()))
    lines = b"".join(json.dumps({"id": i, "text": t}).encode() + b"\n" for i, t in enumerate(documents))
    (folder / "docs.jsonl").write_bytes(lines)
    (folder / "docs.json.gz").write_bytes(gzip.compress(lines.replace(b"\n", b"\n\n")))  # blank lines skipped
    (folder / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"text": documents}), folder / "docs.parquet", row_group_size=7)
    third = len(documents) // 3
    (folder / "mixed" / "0.txt").write_bytes(documents[0].encode())
    (folder / "mixed" / "1.jsonl.gz").write_bytes(gzip.compress(
        b"".join(json.dumps({"text": t}).encode() + b"\n" for t in documents[1:third])))
    pq.write_table(pa.table({"text": documents[third:]}), folder / "mixed" / "2.parquet", row_group_size=5)
    (folder / "mixed" / "notes.md").write_text("not a corpus file: ignored")
    forms.update({name: corpus_files([folder / name]) for name in ("txt", "txt.gz", "mixed")})
    forms.update({name: [folder / name] for name in ("docs.jsonl", "docs.json.gz", "docs.jsonl.zst", "docs.parquet")})
    return forms


def test_the_same_documents_in_every_form_give_the_same_token_files(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(corpus_module, "CHUNK_BYTES", 300)  # long lines in pieces, several pieces per split
    monkeypatch.setattr(data, "CHUNK_BYTES", 300)
    forms = write_forms(tmp_path, DOCUMENTS)
    built = {name: token_bytes(data.build_token_cache(files, tokenizer, tmp_path / "cache" / name, 0.1))
             for name, files in forms.items()}
    assert len(set(built.values())) == 1, {name: [len(x) if isinstance(x, bytes) else x for x in b]
                                           for name, b in built.items()}
    train, val, _, _ = built["txt"]
    ids = np.frombuffer(train + val, dtype=np.uint16)
    assert int((ids == tokenizer.eot_id).sum()) == len(DOCUMENTS) + 1  # one per document, and the literal one
    # and the tokenizer a run trains for itself learns the same merges from any form
    learned = {name: train_tokenizer(files, "bbpe", 280, show_progress=False, end=data.val_start(files, 0.1))
               .to_json() for name, files in forms.items() if name in ("txt", "docs.parquet", "mixed")}
    assert len(set(learned.values())) == 1


@pytest.mark.parametrize("name, content, expected", [
    ("bad.jsonl", b'{"text": "fine"}\n{"text": "cut\n', "bad.jsonl line 2: invalid JSON"),
    ("bad.jsonl", b'{"text": "fine"}\n\n{"body": "x", "id": 3}\n', "bad.jsonl line 3: no field 'text' (its fields: "
                                                                  "'body', 'id'): name the text's field with "
                                                                  "--text_field"),
    ("bad.json", b'{"text": 42}\n', "bad.json line 1: field 'text' is a JSON number, not a string"),
    ("bad.jsonl", b'{"text": null}\n', "bad.jsonl line 1: field 'text' is a JSON null, not a string"),
    ("bad.jsonl", b'["text"]\n', "bad.jsonl line 1: a JSON array, not an object with a 'text' field"),
    ("bad.jsonl", b'{"text": "a\\u0000b"}\n', "bad.jsonl line 1: the text holds a NUL character"),
    ("bad.jsonl", b'{"text": "\\ud800"}\n', "bad.jsonl line 1: the text holds a lone surrogate"),
    ("bad.jsonl", b'{"text": "caf\xe9"}\n', "bad.jsonl line 1: not UTF-8 text"),
    ("bad.jsonl.gz", b"not gzip at all", "cannot read"),
    ("bad.jsonl.zst", b"not zstd at all", "cannot read"),
    ("bad.txt.gz", gzip.compress(b"\xff\xfe latin\n", mtime=0), "bad.txt.gz is not UTF-8 text"),
    ("bad.parquet", {"body": ["x"]}, "bad.parquet: no column 'text' (its columns: 'body')"),
    ("bad.parquet", {"text": ["x", None]}, "bad.parquet row 2: 'text' is null, not a string"),
    ("bad.parquet", {"text": [1, 2]}, "bad.parquet: column 'text' holds int64, not strings"),
    ("bad.parquet", b"PAR1 not really", "bad.parquet is not a parquet file"),
])
def test_a_bad_record_is_one_error_naming_its_file_and_line(tmp_path, name, content, expected):
    path = tmp_path / name
    if isinstance(content, dict):
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table(content), path)
    else:
        path.write_bytes(content)
    with pytest.raises(UsageError) as refused:
        data.val_start([path], 0.1)  # the first thing a run does with the corpus: before any training
    assert expected in str(refused.value) and "\n" not in str(refused.value), str(refused.value)


def test_a_bad_record_stops_a_run_before_its_tokenizer_and_token_cache(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "fine"}\n' * 50 + '{"txt": "typo"}\n')
    c, given = parse_config([str(corpus), "--out_dir", str(tmp_path / "runs"), "--checkpoint", str(tmp_path / "ck"),
                             *TINY])
    with pytest.raises(UsageError, match=f"^{corpus} line 51: no field 'text' \\(its fields: 'txt'\\): name the "
                                         f"text's field with --text_field$"):
        playground.train(c, given)
    assert not list((tmp_path / "runs").glob("tokenizer-*")) and not (tmp_path / "runs" / "token_cache").exists()


# ------------------------------------------------------------------------------------------ named twice

def test_a_corpus_named_twice_is_refused_naming_both(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    a = folder / "a.txt"
    a.write_text("the same text\n" * 10)
    (tmp_path / "copy.txt").write_text("the same text\n" * 10)
    (tmp_path / "link.txt").symlink_to(a)
    for paths, expected in [([a, a], f"{a} is named twice"), ([a, folder], f"{a} is named twice"),
                            ([a, tmp_path / "link.txt"], f"{a} and {tmp_path / 'link.txt'} are the same file"),
                            ([a, tmp_path / "copy.txt"], f"{a} and {tmp_path / 'copy.txt'} have the same content")]:
        with pytest.raises(UsageError, match="twice") as refused:
            corpus_files(paths)
        assert expected in str(refused.value), str(refused.value)
    (tmp_path / "e1.txt").write_text("")
    (tmp_path / "e2.txt").write_text("")
    assert len(corpus_files([tmp_path / "e1.txt", tmp_path / "e2.txt", a])) == 3  # empty files hold no text


# ----------------------------------------------------------------------------------- shards, kill, resume

def many_documents(folder: Path, count: int = 60) -> Path:
    path = folder / "docs.jsonl"
    text = BUNDLED_CORPUS.read_text(encoding="utf-8")
    path.write_text("".join(json.dumps({"text": text[i * 400:(i + 1) * 400]}) + "\n" for i in range(count)))
    return path


def test_batches_drawn_from_many_shards_equal_those_of_one_file(tmp_path, tokenizer):
    corpus = many_documents(tmp_path)
    one = data.token_folder([corpus], tokenizer, tmp_path / "one", 0.1)
    many = data.token_folder([corpus], tokenizer, tmp_path / "many", 0.1, shard_bytes=2_000)
    assert len(many["train"].paths) > 5 and len(one["train"].paths) == 1
    assert token_bytes(one) == token_bytes(many)
    for step in range(20):  # windows crossing shard ends included: the same draws, the same tokens
        x1, y1 = data.get_batch(one["train"], 8, 64, data.batch_rng(1, 0, step))
        x2, y2 = data.get_batch(many["train"], 8, 64, data.batch_rng(1, 0, step))
        assert x1.equal(x2) and y1.equal(y2)


def test_a_preparation_killed_with_sigkill_resumes_at_its_last_finished_shard(tmp_path, tokenizer):
    corpus = many_documents(tmp_path)
    tokenizer.save(tmp_path / "tok.json")
    reference = tmp_path / "reference"
    prepare_data.main([str(corpus), "--tokenizer", str(tmp_path / "tok.json"), "--out", str(reference),
                       "--shard_size", "2KB"])
    # The same command, each batch of pieces slowed down so that it can be killed half way
    code = (f"import sys, time; sys.path.insert(0, {str(REPO)!r})\n"
            "from gptlab import data\nfrom preprocessing import prepare_data\n"
            "encode = data.encode_pieces\n"
            "data.encode_pieces = lambda encoder, texts: (time.sleep(0.05), encode(encoder, texts))[1]\n"
            f"prepare_data.main([{str(corpus)!r}, '--tokenizer', {str(tmp_path / 'tok.json')!r}, '--out', "
            f"{str(tmp_path / 'out')!r}, '--shard_size', '2KB'])\n")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    progress = tmp_path / "out" / "progress.json"
    deadline = time.time() + 60
    while time.time() < deadline and child.poll() is None:
        if progress.exists() and len(json.loads(progress.read_text() or "{}").get("train", {}).get("shards", [])) >= 4:
            break
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL and not (tmp_path / "out" / "meta.json").exists()
    finished = json.loads(progress.read_text())["position"]
    encoded: list[str] = []
    real = data.encode_pieces

    def counting(encoder: object, texts: list[str]) -> list[list[int]]:
        encoded.extend(texts)
        return real(encoder, texts)

    data.encode_pieces = counting
    try:
        prepare_data.main([str(corpus), "--tokenizer", str(tmp_path / "tok.json"), "--out", str(tmp_path / "out"),
                           "--shard_size", "2KB"])
    finally:
        data.encode_pieces = real
    pieces = list(data._pieces([corpus], 0.1, "text"))
    assert 0 < finished and len(encoded) == sum(p.start >= finished for p in pieces) < len(pieces)
    files = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == files  # no progress.json, no temporary file
    assert all((tmp_path / "out" / name).read_bytes() == (reference / name).read_bytes() for name in files)


def test_reading_a_corpus_holds_a_piece_not_the_corpus(tmp_path, monkeypatch):
    """Bounded memory whatever the corpus size: the reader and the cache's pieces stream (checked with 4 kB
    pieces and 32 kB reads of a text file on a 2 MB corpus in three forms)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(corpus_module, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(data, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(corpus_module, "BLOCK_BYTES", 8 * 4096)
    monkeypatch.setattr(corpus_module, "PARQUET_ROWS", 16)
    line = "All the world's a stage, and all the men and women merely players. " * 3 + "\n"
    documents = [line * 50] * 200  # 2 MB
    (tmp_path / "one_line.txt").write_text(line.replace("\n", " ") * 15_000)
    with gzip.open(tmp_path / "docs.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in documents)
    pq.write_table(pa.table({"text": documents}), tmp_path / "docs.parquet", row_group_size=16)
    for name in ("one_line.txt", "docs.jsonl.gz", "docs.parquet"):
        files = [tmp_path / name]
        data.val_start(files, 0.1)
        tracemalloc.start()
        size = sum(len(piece.text) for piece in data._pieces(files, 0.1, "text"))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert size > 2_000_000 and peak < 400_000, (name, peak)


# ------------------------------------------------------------------------------ prepare_data, playground DIR

def test_playground_trains_from_a_prepared_folder_without_the_text(tmp_path, tokenizer):
    corpus = many_documents(tmp_path)
    tokenizer.save(tmp_path / "tok.json")
    prepare_data.main([str(corpus), "--tokenizer", str(tmp_path / "tok.json"), "--out", str(tmp_path / "prep")])
    own = data.build_token_cache([corpus], tokenizer, tmp_path / "cache", 0.1)
    corpus.rename(tmp_path / "elsewhere.jsonl")  # the text is not read again
    c, given = parse_config([str(tmp_path / "prep"), "--out_dir", str(tmp_path / "runs"), "--checkpoint",
                             str(tmp_path / "ck.tar"), *TINY])
    playground.train(c, given)
    assert Tokenizer.from_json(load_checkpoint(tmp_path / "ck.tar")["tokenizer"]).to_json() == tokenizer.to_json()
    assert token_bytes(data.read_token_folder(tmp_path / "prep")) == token_bytes(own)
    assert not (tmp_path / "runs" / "token_cache").exists()
    planning.check_data([str(tmp_path / "prep")], 0.1, 16, None)  # experiment.py's check before its runs
    with pytest.raises(UsageError, match=f"~{own['val'].num_tokens:,} tokens"):
        planning.check_data([str(tmp_path / "prep")], 0.1, 100_000, None)
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="is a folder of other files"):
        prepare_data.main([str(tmp_path / "elsewhere.jsonl"), "--tokenizer", str(tmp_path / "tok.json"),
                           "--out", str(tmp_path / "user")])


# ------------------------------------------------------------------------------- the tokenizer's reading

def test_the_tokenizer_sample_is_spread_over_the_training_split_alone(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"line {i:05d}: to be or not to be\n" for i in range(6000)))
    end = data.val_start([corpus], 0.1)
    training = corpus.read_text()[:end].count("\n")
    reading = Reading([corpus])
    sampled = "".join(iter_corpus([corpus], end, sample=20_000, reading=reading))
    assert len(sampled.encode()) == reading.seen[0] <= 20_000 and len(sampled) > 18_000
    numbers = [int(line[5:10]) for line in sampled.splitlines()]
    assert min(numbers) == 0 and max(numbers) > 0.9 * training and max(numbers) < training  # never val text
    assert all(any(k * training / 10 <= n < (k + 1) * training / 10 for n in numbers) for k in range(10))
    assert "".join(iter_corpus([corpus], end, sample=10**9)) == corpus.read_text()[:end]


def test_the_tokenizer_record_hashes_the_text_as_it_was_read(tmp_path, monkeypatch):
    """A corpus replaced while the tokenizer trains: the checkpoint records the file that was read."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(BUNDLED_CORPUS.read_text(encoding="utf-8")[:30_000])
    read = file_hash(corpus)
    counted = tokenizer_module._counted

    def replace_the_file(pieces, bar):
        for i, piece in enumerate(counted(pieces, bar)):
            if i == 0:
                (tmp_path / "new.txt").write_text("A different text.\n" * 1000)
                os.replace(tmp_path / "new.txt", corpus)  # as an editor or a download saves
            yield piece

    monkeypatch.setattr(tokenizer_module, "_counted", replace_the_file)
    c, given = parse_config([str(corpus), "--vocab_size", "300", "--out_dir", str(tmp_path / "runs"),
                             "--checkpoint", str(tmp_path / "ck.tar"), *TINY])
    playground.train(c, given)
    [record] = load_checkpoint(tmp_path / "ck.tar")["tokenizer_learned_from"]
    assert record["blake2b"] == read != file_hash(corpus)


def test_each_file_read_is_hashed_whole_in_every_form(tmp_path):
    """The record's hash is the whole file's, as read: also where reading stops at the validation text, in a
    compressed file, and in a parquet file (which pyarrow reads in its own order)."""
    forms = write_forms(tmp_path, DOCUMENTS)
    for name in ("docs.jsonl.zst", "docs.parquet", "mixed", "txt.gz"):
        files = forms[name]
        reading = Reading(files)
        list(iter_corpus(files, data.val_start(files, 0.1), reading=reading))
        read = [f for f in files if f in reading.digests]
        assert read and all(reading.digests[f] == file_hash(f) for f in read), name
