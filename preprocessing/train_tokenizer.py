"""Train a tokenizer on a corpus and save it as tokenizer.json.

    python preprocessing/train_tokenizer.py CORPUS [CORPUS ...] {bpe,bbpe} [--vocab_size N] [--out PATH]
                                            [--bert_tokens] [--val_fraction F] [--tokenizer_sample 100MB]
                                            [--text_field NAME]

CORPUS: files (.txt, .jsonl/.json, .parquet, .gz/.zst: see gptlab/corpus.py) and/or folders of them. See
gptlab/tokenizer.py for the two kinds and the special-token ids. Of a training split larger than
--tokenizer_sample, the trainer reads that much, in blocks spread evenly over the whole split.

The tokenizer learns from the corpus's training split only: by default the last 10% of its bytes (moved to a
line start) are held out, the very split `playground.py` validates on with its default --val_fraction 0.1. So
`train_tokenizer.py CORPUS bbpe` then `playground.py CORPUS --tokenizer tokenizer.json` reports val bits/byte
on text that neither the tokenizer nor the model has seen. Give the same --val_fraction to both; give
--val_fraction 0 to learn from every byte (a tokenizer corpus that is not the model's validation text).
"""

import time
from dataclasses import dataclass
from pathlib import Path

from gptlab.cli import FRACTION, SIZE, check_fields, parse_dataclass, parse_size, setting
from gptlab.corpus import TEXT_FIELD, text_sizes
from gptlab.data import DEFAULT_VAL_FRACTION, val_start
from gptlab.errors import UsageError, run_cli
from gptlab.fileio import check_output
from gptlab.tokenizer import (
    KINDS,
    MAX_VOCAB_SIZE,
    TOKENIZER_SAMPLE,
    Reading,
    Tokenizer,
    check_vocab_size,
    corpus_files,
    iter_corpus,
    train_tokenizer,
)


@dataclass(frozen=True)
class TokenizerArgs:
    corpus: tuple[str, ...] = setting((), "CORPUS... KIND: text files and/or folders of .txt files, then the "
                                      "kind: bpe (BPE with an unknown token) or bbpe (byte-level BPE)")
    vocab_size: int = setting(8000, f"tokens in the vocabulary (at most {MAX_VOCAB_SIZE:,})")
    out: str = setting("tokenizer.json", "where to write it", output=True)
    overwrite: bool = setting(False, "replace an existing --out file")
    bert_tokens: bool = setting(False, "also add <mask> <pad> <cls> <sep>, needed for masked-LM pretraining "
                                "(--objective mlm) and fine-tuning")
    val_fraction: float = setting(DEFAULT_VAL_FRACTION, "fraction of the corpus (its last bytes, from a line start) "
                                  "not learned from: the validation split of playground.py with the same "
                                  "--val_fraction; 0 learns from all of it", rule=FRACTION)
    tokenizer_sample: str = setting(TOKENIZER_SAMPLE, "the most of the training split the trainer reads, like 100MB "
                                    "or 1GB: "
                                    "blocks spread evenly over the whole split (all of it when it is smaller)",
                                    rule=SIZE)
    text_field: str = setting(TEXT_FIELD, "the field of each .jsonl/.json record, or the .parquet column, holding "
                              "a document's text")

    def __post_init__(self) -> None:
        check_fields(self)
        if len(self.corpus) < 2:
            raise UsageError("give the corpus (files or folders) and then the kind: bpe or bbpe")
        if self.kind not in KINDS:
            raise UsageError(f"argument kind: invalid choice: {self.kind!r} (choose from {', '.join(KINDS)})")
        check_vocab_size(self.vocab_size)  # the lower bound depends on the kind: train_tokenizer checks it

    @property
    def kind(self) -> str:
        return self.corpus[-1]

    @property
    def files(self) -> tuple[str, ...]:
        return self.corpus[:-1]


def parse_args(argv: list[str] | None = None) -> TokenizerArgs:
    return parse_dataclass(TokenizerArgs, "Train a BPE (bpe) or byte-level BPE (bbpe) tokenizer on text files.",
                           argv, positional="corpus")


def tokens_per_byte(tokenizer: Tokenizer, files: list[Path], end: int | None = None, text_field: str = TEXT_FIELD,
                    sample: int | None = None) -> float:
    """How compact the tokenizer is on its training text, or the sample of it it read (streamed; fewer tokens
    per byte = longer tokens)."""
    tokens = n_bytes = 0
    for piece in iter_corpus(files, end, text_field, sample):
        tokens += len(tokenizer.encode(piece))
        n_bytes += len(piece.encode("utf-8"))
    return tokens / n_bytes


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    files = corpus_files(list(args.files))
    check_output(args.out, "--out", inputs=[("corpus", f) for f in files], overwrite=args.overwrite)
    end = val_start(files, args.val_fraction, args.text_field)
    sample, reading = parse_size(args.tokenizer_sample), Reading(files, args.text_field)
    start = time.perf_counter()
    tokenizer = train_tokenizer(files, args.kind, args.vocab_size, show_progress=True, bert_tokens=args.bert_tokens,
                                end=end, text_field=args.text_field, sample=sample, reading=reading)
    seconds = time.perf_counter() - start
    tokenizer.save(args.out)
    total = sum(text_sizes(files, args.text_field))
    seen = sum(reading.seen)
    how = "" if seen == end else f", a --tokenizer_sample {args.tokenizer_sample} spread evenly over {end:,}"
    print(f"{args.kind} tokenizer: {tokenizer.vocab_size} tokens (asked {args.vocab_size}), trained in "
          f"{seconds:.1f}s on {seen:,} of the corpus's {total:,} bytes{how} (the last {total - end:,} held out: "
          f"--val_fraction {args.val_fraction:g}), "
          f"{tokens_per_byte(tokenizer, files, end, args.text_field, sample):.3f} tokens/byte on them -> {args.out}")


if __name__ == "__main__":
    run_cli(main)
