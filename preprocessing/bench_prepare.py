"""Benchmark: a corpus's preparation, phase by phase, with time and peak resident memory (prints a markdown table).

    python preprocessing/bench_prepare.py [--mb 1000] [--vocab_size 8192] [--tokenizer_sample 100MB] [--kill_at 0.4]

The corpus: this Python installation's standard-library sources and the bundled corpus, shuffled, written as one
.txt file of --mb MB (repeated as needed). Each phase runs in a fresh process, so its peak resident memory
(ru_maxrss) is its own:
    tokenizer    train_tokenizer on the training split, at most --tokenizer_sample of it (as playground.py does)
    token cache  preprocessing/prepare_data.py: every byte encoded into token shards
    resume       (with --kill_at F) the same preparation killed with SIGKILL at F of the full build's time, then
                 run again: the second run's time, and whether its files equal the uninterrupted ones
The machine may be shared: compare rows of one run (ratios), not runs made at different times.
"""

import argparse
import filecmp
import json
import random
import resource
import runpy
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from gptlab.cli import parse_size
from gptlab.data import val_start
from gptlab.errors import CliParser, UsageError, run_cli
from gptlab.speed import write_repeated
from gptlab.tokenizer import TOKENIZER_SAMPLE, Reading, train_tokenizer

REPO = Path(__file__).resolve().parent.parent
PREPARE = REPO / "preprocessing" / "prepare_data.py"


def make_corpus(path: Path, mb: int, seed: int = 0) -> None:
    """Python sources and the bundled corpus, shuffled, repeated to `mb` MB (scratch, in a temporary folder)."""
    found = [p for p in Path(sysconfig.get_paths()["stdlib"]).rglob("*.py") if p.is_file()]
    found.append(REPO / "data" / "shakespeare.txt")
    random.Random(seed).shuffle(found)
    texts = []
    for p in found:
        data = p.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if b"\0" not in data:
            texts.append(data)
    write_repeated(path, texts, mb)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB


def tokenizer_phase(corpus: str, out: str, vocab_size: int, sample: str) -> None:
    """Runs in a child process: seconds, MB read, peak RSS MB."""
    files = [Path(corpus)]
    start = time.perf_counter()
    reading = Reading(files)
    tok = train_tokenizer(files, "bbpe", vocab_size, show_progress=False, bert_tokens=True,
                          end=val_start(files, 0.1), sample=parse_size(sample), reading=reading)
    seconds = time.perf_counter() - start
    tok.save(out)
    print(json.dumps({"seconds": seconds, "read_mb": sum(reading.seen) / 1e6, "rss_mb": peak_rss_mb()}))


def prepare_phase(corpus: str, tokenizer: str, out: str) -> None:
    """Runs in a child process: prepare_data.py as its command runs (a script imports no other); its peak RSS MB."""
    sys.argv = [str(PREPARE), corpus, "--tokenizer", tokenizer, "--out", out]
    runpy.run_path(str(PREPARE), run_name="__main__")
    print(json.dumps({"rss_mb": peak_rss_mb()}))


def child(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finished(run: subprocess.Popen, what: str) -> dict:
    out, err = run.communicate()
    if run.returncode != 0:
        raise UsageError(f"{what} failed: {(err.strip().splitlines() or ['?'])[-1]}")
    return json.loads(out.strip().splitlines()[-1])


def killed_and_resumed(args: list[str], reference: Path, after: float) -> tuple[float, bool]:
    """Kill a preparation with SIGKILL `after` seconds in, run it again: (rerun seconds, files the same)."""
    run = child(*args)
    time.sleep(after)
    run.send_signal(signal.SIGKILL)
    run.communicate()
    start = time.perf_counter()
    finished(child(*args), "the resumed preparation")
    seconds = time.perf_counter() - start
    out = Path(args[-1])
    names = sorted(p.name for p in reference.iterdir())
    same = sorted(p.name for p in out.iterdir()) == names and all(
        filecmp.cmp(out / n, reference / n, shallow=False) for n in names)
    return seconds, same


def main() -> None:
    parser = CliParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1000, help="corpus size in MB")
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--tokenizer_sample", default=TOKENIZER_SAMPLE)
    parser.add_argument("--kill_at", type=float, default=None, help="also kill a preparation at this fraction of "
                        "the full build's time, and time its rerun")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        phase, *paths = args.child
        return tokenizer_phase(*paths, args.vocab_size, args.tokenizer_sample) if phase == "tokenizer" else \
            prepare_phase(*paths)
    with tempfile.TemporaryDirectory() as tmp:
        corpus, tokenizer = Path(tmp) / "corpus.txt", Path(tmp) / "tokenizer.json"
        make_corpus(corpus, args.mb)
        size = corpus.stat().st_size / 1e6
        t = finished(child("--vocab_size", str(args.vocab_size), "--tokenizer_sample", args.tokenizer_sample,
                           "--child", "tokenizer", str(corpus), str(tokenizer)), "the tokenizer phase")
        print(f"corpus {size:,.0f} MB (Python sources + bundled corpus), bbpe {args.vocab_size}, "
              f"--tokenizer_sample {args.tokenizer_sample}\n")
        print("| phase | seconds | MB/s | peak RSS MB |\n|---|---|---|---|")
        print(f"| tokenizer ({t['read_mb']:,.0f} MB read) | {t['seconds']:.0f} | {t['read_mb'] / t['seconds']:.1f} | "
              f"{t['rss_mb']:.0f} |", flush=True)
        start = time.perf_counter()
        rss = finished(child("--child", "prepare", str(corpus), str(tokenizer), str(Path(tmp) / "prepared")),
                       "the preparation")["rss_mb"]
        seconds = time.perf_counter() - start
        print(f"| token cache (prepare_data.py) | {seconds:.0f} | {size / seconds:.1f} | {rss:.0f} |", flush=True)
        if args.kill_at:
            again = ["--child", "prepare", str(corpus), str(tokenizer), str(Path(tmp) / "killed")]
            rerun, same = killed_and_resumed(again, Path(tmp) / "prepared", args.kill_at * seconds)
            print(f"| rerun after kill -9 at {args.kill_at:.0%} of the build time | {rerun:.0f} | | |\n\nrerun / "
                  f"full build: {rerun / seconds:.0%}; files identical to the uninterrupted build: {same}")


if __name__ == "__main__":
    run_cli(main)
