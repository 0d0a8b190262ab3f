"""Benchmark: what a big corpus costs before training starts, against corpus size (prints a markdown table):
training the tokenizer, then building the token cache (encoding the corpus into token files), each timed with
its throughput and peak memory.

    python preprocessing/bench_tokenizer.py [--mb 10 100] [--kind bbpe] [--vocab_size 8000]

Each size is the bundled corpus repeated to that many MB; each phase runs in a fresh process, so each peak
resident memory (ru_maxrss) belongs to that phase and size alone. The corpus is streamed in both phases:
memory should grow far less than the corpus does (reading a 100 MB file into one Python string alone would
cost 100+ MB).
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gptlab.data import build_token_cache
from gptlab.errors import CliParser, UsageError, run_cli
from gptlab.tokenizer import Tokenizer, check_vocab_size, train_tokenizer

REPO = Path(__file__).resolve().parent.parent

MAX_MB = 100_000  # 100 GB of scratch corpus: beyond that the disk, not the tokenizer, is measured


def make_corpus(folder: Path, mb: int) -> Path:
    text = (REPO / "data" / "shakespeare.txt").read_bytes()
    path = folder / f"corpus_{mb}mb.txt"
    with open(path, "wb") as f:  # scratch input in a temporary folder: nothing to keep whole
        written = 0
        while written < mb * 1_000_000:
            f.write(text)
            written += len(text)
    return path


def train_once(corpus: str, kind: str, vocab_size: int, tokenizer: str) -> None:
    """Runs in a child process: train and save the tokenizer, then print seconds and peak RSS in MB."""
    start = time.perf_counter()
    tok = train_tokenizer([Path(corpus)], kind, vocab_size, show_progress=False)
    seconds = time.perf_counter() - start
    tok.save(tokenizer)
    print(f"{seconds:.2f} {peak_rss_mb():.0f} {tok.vocab_size}")


def cache_once(corpus: str, tokenizer: str, folder: str) -> None:
    """Runs in a child process: encode the corpus into a token cache, then print seconds and peak RSS in MB."""
    start = time.perf_counter()
    build_token_cache([Path(corpus)], Tokenizer.from_file(tokenizer), Path(folder), 0.1)
    print(f"{time.perf_counter() - start:.2f} {peak_rss_mb():.0f}")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB


def child(*args: str) -> list[str]:
    """Run this script with `args` in a fresh process; its printed fields."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode != 0:  # the child's own one-line error (or the last line of its crash)
        last = (out.stderr.strip().splitlines() or ["no output"])[-1].removeprefix("error: ")
        raise UsageError(f"{args[1]} failed: {last}")
    return out.stdout.splitlines()[-1].split()  # its last line: the log lines above it are the library's


def main() -> None:
    parser = CliParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, nargs="+", default=[10, 100], help="corpus sizes to try, in MB")
    parser.add_argument("--kind", default="bbpe", choices=("bpe", "bbpe"))
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not all(1 <= mb <= MAX_MB for mb in args.mb):
        raise UsageError(f"--mb sizes must be between 1 and {MAX_MB:,}, got {' '.join(map(str, args.mb))}")
    if args.vocab_size <= 0:
        raise UsageError(f"--vocab_size must be positive, got {args.vocab_size}")
    check_vocab_size(args.vocab_size)
    if args.child:
        phase, *paths = args.child
        return train_once(paths[0], args.kind, args.vocab_size, paths[1]) if phase == "train" else cache_once(*paths)
    print(f"{os.cpu_count()} cores\n| corpus MB | kind | vocab | tokenizer s | MB/s | peak RSS MB | token cache s "
          "| MB/s | peak RSS MB |\n|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for mb in args.mb:
            corpus, tokenizer = make_corpus(Path(tmp), mb), Path(tmp) / "tokenizer.json"
            size = corpus.stat().st_size / 1e6
            train_s, train_peak, vocab = child("--child", "train", str(corpus), str(tokenizer), "--kind", args.kind,
                                               "--vocab_size", str(args.vocab_size))
            cache_s, cache_peak = child("--child", "cache", str(corpus), str(tokenizer), str(Path(tmp) / "cache"))
            print(f"| {size:.0f} | {args.kind} | {vocab} | {train_s} | {size / float(train_s):.1f} | {train_peak} | "
                  f"{cache_s} | {size / float(cache_s):.1f} | {cache_peak} |", flush=True)
            corpus.unlink()  # the next size's corpus fits on the disk too


if __name__ == "__main__":
    run_cli(main)
