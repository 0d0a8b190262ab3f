"""Prepare a corpus once: its token shards and the tokenizer, in one folder that playground.py trains from.

    python preprocessing/prepare_data.py CORPUS [CORPUS ...] --tokenizer tokenizer.json --out DIR
                                         [--val_fraction F] [--text_field NAME] [--shard_size 256MB]
    python playground.py DIR [--flags]          # trains without reading the text again

CORPUS: files and folders of .txt, .jsonl/.json, .parquet, .gz/.zst (see gptlab/corpus.py). DIR holds the token
shards (train-00000.bin ..., val-00000.bin ...: the same bytes playground.py's own token cache holds), meta.json
and a copy of the tokenizer. A preparation killed at any moment (kill -9, a lost node) resumes after its last
finished shard when the same command runs again, and ends with the files an uninterrupted one writes. On a
cluster: prepare once on shared storage, then every node trains from DIR.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path

from gptlab.cli import FRACTION, SIZE, check_fields, parse_dataclass, parse_size, setting
from gptlab.corpus import TEXT_FIELD, corpus_files
from gptlab.data import DEFAULT_VAL_FRACTION, PREPARED, PREPARED_TOKENIZER, SHARD_BYTES, cache_key, token_folder
from gptlab.errors import UsageError, run_cli
from gptlab.fileio import atomic_write_text
from gptlab.tokenizer import Tokenizer


@dataclass(frozen=True)
class PrepareArgs:
    corpus: tuple[str, ...] = setting((), "CORPUS...: files and/or folders of .txt, .jsonl, .json, .parquet, .gz, "
                                      ".zst")
    tokenizer: str = setting("", "tokenizer.json to encode with (preprocessing/train_tokenizer.py makes one)")
    out: str = setting("", "the folder to write (new, empty, or an earlier preparation of the same inputs)")
    val_fraction: float = setting(DEFAULT_VAL_FRACTION, "fraction of the corpus (its last bytes, from a line "
                                  "start) held out for validation", rule=FRACTION)
    text_field: str = setting(TEXT_FIELD, "the field of each .jsonl/.json record, or the .parquet column, holding "
                              "a document's text")
    shard_size: str = setting(f"{SHARD_BYTES >> 20}MB", "the most one token shard holds, like 256MB",
                              rule=SIZE)

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.corpus:
            raise UsageError("give the corpus: files and/or folders")
        if not self.tokenizer or not self.out:
            raise UsageError("give --tokenizer (a tokenizer.json) and --out (the folder to write)")


def check_out(out: Path, key: str, corpus: tuple[str, ...]) -> None:
    """--out is new, empty, or a preparation of these very inputs (to finish or reuse): never a folder of other
    files, and not inside a corpus folder (its .json files would be read as corpus the next time)."""
    for path in map(Path, corpus):
        if path.is_dir() and out.resolve().is_relative_to(path.resolve()):
            raise UsageError(f"--out {out} is inside the corpus folder {path}: choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: give a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    try:
        earlier = json.loads((out / PREPARED).read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"--out {out} is a folder of other files: choose a new or empty folder") from None
    if earlier != key:
        raise UsageError(f"--out {out} holds the preparation of other inputs (corpus, tokenizer, --val_fraction or "
                         f"--text_field): choose another folder, or delete it first")


def main(argv: list[str] | None = None) -> None:
    args = parse_dataclass(PrepareArgs, "Tokenize a corpus once into a folder that playground.py trains from.",
                           argv, positional="corpus")
    files = corpus_files(list(args.corpus))
    tokenizer = Tokenizer.from_file(args.tokenizer)
    out = Path(args.out)
    key = cache_key(files, tokenizer, args.val_fraction, args.text_field)
    check_out(out, key, args.corpus)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # The key first (a rerun recognises its folder), the tokenizer, then the shards and meta.json.
    atomic_write_text(out / PREPARED, json.dumps({"key": key, "corpus": list(map(str, files)), "val_fraction":
                      args.val_fraction, "text_field": args.text_field}), "preparation record")
    tokenizer.save(out / PREPARED_TOKENIZER)
    splits = token_folder(files, tokenizer, out, args.val_fraction, args.text_field, parse_size(args.shard_size))
    seconds = time.perf_counter() - start
    for name, split in splits.items():
        print(f"{name}: {split.num_tokens:,} tokens from {split.num_bytes:,} bytes of text in "
              f"{len(split.paths)} shard(s)")
    print(f"prepared {out} in {seconds:.1f}s: train with python playground.py {out}")


if __name__ == "__main__":
    run_cli(main)
