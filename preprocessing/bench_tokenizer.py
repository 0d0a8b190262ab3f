"""Benchmark: tokenizer training time and peak memory against corpus size (prints a markdown table).

    python preprocessing/bench_tokenizer.py [--mb 10 100] [--kind bbpe] [--vocab_size 8000]

Each size is the bundled corpus repeated to that many MB and trained on in a fresh process, so each peak
resident memory (ru_maxrss) belongs to that size alone. The corpus is streamed: memory should grow far
less than the corpus does (reading a 100 MB file into one Python string alone would cost 100+ MB).
"""

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from any folder

from errors import CliParser, UsageError, run_cli  # noqa: E402
from preprocessing.tokenizer import check_vocab_size, train_tokenizer  # noqa: E402

MAX_MB = 100_000  # 100 GB of scratch corpus: beyond that the disk, not the tokenizer, is measured


def make_corpus(folder: Path, mb: int) -> Path:
    text = (REPO / "data" / "shakespeare.txt").read_bytes()
    path = folder / f"corpus_{mb}mb.txt"
    with open(path, "wb") as f:
        written = 0
        while written < mb * 1_000_000:
            f.write(text)
            written += len(text)
    return path


def train_once(corpus: str, kind: str, vocab_size: int) -> None:
    """Runs in the child process: train, then print seconds and peak RSS in MB."""
    start = time.perf_counter()
    tok = train_tokenizer([Path(corpus)], kind, vocab_size, show_progress=False)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB
    print(f"{seconds:.2f} {peak_mb:.0f} {tok.vocab_size}")


def main() -> None:
    parser = CliParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, nargs="+", default=[10, 100], help="corpus sizes to try, in MB")
    parser.add_argument("--kind", default="bbpe", choices=("bpe", "bbpe"))
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not all(1 <= mb <= MAX_MB for mb in args.mb):
        raise UsageError(f"--mb sizes must be between 1 and {MAX_MB:,}, got {' '.join(map(str, args.mb))}")
    if args.vocab_size <= 0:
        raise UsageError(f"--vocab_size must be positive, got {args.vocab_size}")
    check_vocab_size(args.vocab_size)
    if args.child:
        return train_once(args.child, args.kind, args.vocab_size)
    print("| corpus MB | kind | vocab | seconds | peak RSS MB |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for mb in args.mb:
            corpus = make_corpus(Path(tmp), mb)
            out = subprocess.run([sys.executable, __file__, "--child", str(corpus), "--kind", args.kind,
                                  "--vocab_size", str(args.vocab_size)], capture_output=True, text=True)
            if out.returncode != 0:  # the child's own one-line error (or the last line of its crash)
                last = (out.stderr.strip().splitlines() or ["no output"])[-1].removeprefix("error: ")
                raise UsageError(f"training on {mb} MB failed: {last}")
            seconds, peak, vocab = out.stdout.split()
            print(f"| {corpus.stat().st_size / 1e6:.0f} | {args.kind} | {vocab} | {seconds} | {peak} |", flush=True)


if __name__ == "__main__":
    run_cli(main)
