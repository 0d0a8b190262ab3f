"""Train a tokenizer on a corpus and save it as tokenizer.json.

    python preprocessing/train_tokenizer.py CORPUS [CORPUS ...] {bpe,bbpe} [--vocab_size N] [--out PATH]
                                            [--bert_tokens]

CORPUS: .txt files and/or folders of .txt files. See preprocessing/tokenizer.py for the two kinds and the
special-token ids.
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from errors import CliParser, UsageError, run_cli  # noqa: E402
from preprocessing.tokenizer import KINDS, Tokenizer, corpus_files, iter_corpus, train_tokenizer  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CliParser(description="Train a BPE (bpe) or byte-level BPE (bbpe) tokenizer on text files.")
    parser.add_argument("corpus", nargs="+", metavar="CORPUS", help="text files and/or folders of .txt files")
    parser.add_argument("kind", choices=KINDS, help="bpe: BPE with an unknown token; bbpe: byte-level BPE")
    parser.add_argument("--vocab_size", type=int, default=8000, help="tokens in the vocabulary (default 8000)")
    parser.add_argument("--out", default="tokenizer.json", help="where to write it (default tokenizer.json)")
    parser.add_argument("--bert_tokens", action="store_true", help="also add <mask> <pad> <cls> <sep>, needed "
                        "for masked-LM pretraining (--objective mlm) and fine-tuning")
    return parser.parse_args(argv)


def check_writable(out: Path) -> None:
    """Fail before a long training run, not after it."""
    folder = out.resolve().parent
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name such as {out / 'tokenizer.json'}")
    if not folder.is_dir():
        raise UsageError(f"--out folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UsageError(f"cannot write {out}: permission denied")


def tokens_per_byte(tokenizer: Tokenizer, files: list[Path]) -> float:
    """How compact the tokenizer is on its corpus (streamed; fewer tokens per byte = longer tokens)."""
    tokens = n_bytes = 0
    for piece in iter_corpus(files):
        tokens += len(tokenizer.encode(piece))
        n_bytes += len(piece.encode("utf-8"))
    return tokens / n_bytes


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    check_writable(out)
    files = corpus_files(args.corpus)
    start = time.perf_counter()
    tokenizer = train_tokenizer(files, args.kind, args.vocab_size, show_progress=sys.stderr.isatty(),
                                bert_tokens=args.bert_tokens)
    seconds = time.perf_counter() - start
    tokenizer.save(out)
    print(f"{args.kind} tokenizer: {tokenizer.vocab_size} tokens (asked {args.vocab_size}), trained in "
          f"{seconds:.1f}s, {tokens_per_byte(tokenizer, files):.3f} tokens/byte on the corpus -> {out}")


if __name__ == "__main__":
    run_cli(main)
