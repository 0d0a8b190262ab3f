"""Benchmark: a big corpus from its text to the first training step, engines side by side (prints markdown tables).

    python preprocessing/bench_encoding.py --mb 1000 --sample_mb 1000

1. The corpus: this Python installation's own sources (standard library and site-packages, a few hundred MB of
   varied text every user has) and the bundled corpus, as documents in a shuffled order, repeated to --mb MB;
   documents totalling --heldout_mb MB are kept out of it, as held-out text.
2. Tokenizer trainers on the corpus's first --sample_mb MB: tokenizers' BpeTrainer (what train_tokenizer runs)
   and rustbpe, the same number of merges and the same split; each one's compression (tokens per byte) on the
   held-out text.
3. Encoding, the same --encode_mb MB in ~1 MB pieces as the token cache cuts them: tokenizers' own encode_batch
   (its threads) against the fast engine (gptlab.encoding: tiktoken) on one thread and on every core; the ids are
   checked equal.
4. Text to first step, as a user runs it: `playground.py corpus.txt --vocab_size V --max_iters 1` (its own
   tokenizer on a --tokenizer_sample of the training split, the token cache, start-up, one step of a quick-start
   sized model and its evaluation), timed whole, with its peak resident memory. --first_step_only skips 2 and 3
   (for big corpora).
The machine may be shared: compare the rows of one run (ratios), not runs made at different times.
"""

import json
import os
import random
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from gptlab.encoding import GPT2_SPLIT, ReferenceEncoder, encoder_for, tiktoken_ranks
from gptlab.errors import CliParser, UsageError, run_cli
from gptlab.speed import write_repeated
from gptlab.tokenizer import READ_CHARS, Tokenizer, iter_corpus, train_tokenizer

REPO = Path(__file__).resolve().parent.parent
SPECIAL_TOKENS = 5  # train_tokenizer(..., bert_tokens=True), as playground.py trains one: <|endoftext|> + 4


def documents(seed: int) -> list[Path]:
    """This interpreter's Python sources and the bundled corpus, shuffled."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = [p for p in root.rglob("*.py") if p.is_file()] + [REPO / "data" / "shakespeare.txt"]
    random.Random(seed).shuffle(found)
    return found


def readable(path: Path) -> bytes | None:
    try:
        data = path.read_bytes()
        data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return None if b"\0" in data else data


def make_corpus(folder: Path, mb: int, heldout_mb: int, seed: int) -> tuple[Path, Path]:
    """corpus.txt (mb MB: the documents, repeated as needed) and heldout.txt (heldout_mb MB of other ones)."""
    texts, size = [], 0
    for text in filter(None, map(readable, documents(seed))):  # read only what is needed
        texts.append(text)
        size += len(text)
        if size >= (mb + heldout_mb) * 1_000_000:
            break
    heldout, size = [], 0
    while size < heldout_mb * 1_000_000 and len(texts) > 1:
        heldout.append(texts.pop())
        size += len(heldout[-1])
    (folder / "heldout.txt").write_bytes(b"\n".join(heldout))
    write_repeated(folder / "corpus.txt", texts, mb)
    return folder / "corpus.txt", folder / "heldout.txt"


def pieces(path: Path, mb: float) -> list[str]:
    """The first `mb` MB of a file in pieces of about 1 MB cut at line ends, as the token cache cuts them."""
    out, part, size = [], [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            part.append(line)
            size += len(line)
            if size >= 1_000_000 * (len(out) + 1):
                out.append("".join(part))
                part = []
            if size >= mb * 1_000_000:
                break
    return out + ["".join(part)] if part else out


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def trainers(corpus: Path, heldout: Path, sample_mb: int, vocab_size: int, folder: Path) -> tuple[Path, float]:
    """Both trainers on the corpus's first sample_mb MB; prints their table; the tokenizers one's file and time."""
    import rustbpe

    end = sample_mb * 1_000_000
    tok, hf_s = timed(lambda: train_tokenizer([corpus], "bbpe", vocab_size, show_progress=False,
                                              bert_tokens=True, end=end))
    path = folder / "tokenizer.json"
    tok.save(path)
    rust = rustbpe.Tokenizer()
    merges = vocab_size - 256 - SPECIAL_TOKENS
    _, rust_s = timed(lambda: rust.train_from_iterator(iter_corpus([corpus], end), 256 + merges,
                                                       pattern=GPT2_SPLIT))
    texts = pieces(heldout, float("inf"))
    held_bytes = heldout.stat().st_size
    hf_tpb = sum(map(len, encoder_for(tok).encode_batch(texts))) / held_bytes
    rust_tpb = sum(map(len, rust.batch_encode(texts))) / held_bytes
    same = same_merges(tok, rust.get_mergeable_ranks())
    print(f"\nTokenizer trainers, the corpus's first {sample_mb:,} MB, {merges:,} merges each, the GPT-2 split; "
          f"tokens per byte on {held_bytes / 1e6:.0f} MB of held-out documents:\n"
          "| trainer | s | MB/s | tokens per byte (held out) | its tokens |\n|---|---|---|---|---|\n"
          f"| tokenizers BpeTrainer | {hf_s:.1f} | {sample_mb / hf_s:.1f} | {hf_tpb:.4f} | |\n"
          f"| rustbpe | {rust_s:.1f} | {sample_mb / rust_s:.1f} | {rust_tpb:.4f} | {same} |", flush=True)
    return path, hf_s


def same_merges(tok: Tokenizer, rust_ranks: list[tuple[bytes, int]]) -> str:
    """How rustbpe's vocabulary compares with the tokenizers one's (byte strings, then their order)."""
    ours = sorted(tiktoken_ranks(json.loads(tok.to_json())).items(), key=lambda kv: kv[1])
    theirs = sorted(rust_ranks, key=lambda kv: kv[1])
    learned, rust_learned = [t for t, _ in ours if len(t) > 1], [t for t, _ in theirs if len(t) > 1]
    if learned == rust_learned:
        return "the same, in the same order"
    if set(learned) == set(rust_learned):
        return "the same, in another order"
    return f"{len(set(learned) - set(rust_learned)):,} of {len(learned):,} differ"


def engines(corpus: Path, tok: Tokenizer, encode_mb: int) -> None:
    """Encoding speed of both engines on the same pieces; prints their table."""
    texts = pieces(corpus, encode_mb)
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    batch = os.cpu_count() or 1  # as the token cache batches its pieces

    def run(encoder) -> list[list[int]]:
        return [ids for i in range(0, len(texts), batch) for ids in encoder.encode_batch(texts[i:i + batch])]

    reference, ref_s = timed(run, ReferenceEncoder(tok, ""))
    rows = [("tokenizers encode_batch", f"{batch} (its own)", ref_s, True)]
    for threads in (1, batch):
        ids, s = timed(run, encoder_for(tok, threads))
        rows.append(("tiktoken, converted (gptlab.encoding)", str(threads), s, ids == reference))
    print(f"\nEncoding {mb:,.0f} MB of the corpus in ~1 MB pieces, {batch} cores:\n"
          "| engine | threads | s | MB/s | x tokenizers | same ids |\n|---|---|---|---|---|---|")
    for name, threads, s, same in rows:
        print(f"| {name} | {threads} | {s:.1f} | {mb / s:.2f} | {ref_s / s:.2f} | {'yes' if same else 'NO'} |",
              flush=True)


# The quick start's shape: the step is not what this measures (GPT-2's default 124M would add ~1 GB and seconds).
SMALL_MODEL = ["--embedding_dim", "128", "--num_of_layers", "4", "--num_of_heads", "4", "--block_size", "128"]


def first_step(corpus: Path, heldout: Path, folder: Path, vocab_size: int, tokenizer_sample: str | None) -> float:
    """Seconds of a user's first command on the corpus, to its first step (its own tokenizer, the token cache,
    start-up, one step and its evaluation); prints them with the process's peak resident memory and its
    tokenizer's tokens per byte on the held-out text."""
    command = [sys.executable, str(REPO / "playground.py"), corpus.name, "--vocab_size", str(vocab_size),
               "--out_dir", "runs", "--checkpoint", "runs/ckpt.pt",  # in `folder`, the corpus's folder
               "--max_iters", "1", "--eval_iters", "1", "--sample_tokens", "0", *SMALL_MODEL]
    command += ["--tokenizer_sample", tokenizer_sample] if tokenizer_sample else []
    start = time.perf_counter()
    with open(folder / "first_step.log", "w+") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=folder)
        peak_mb = wait_for_peak(child)
        seconds = time.perf_counter() - start
        log.seek(0)
        out = log.read()
    if child.returncode != 0:
        raise UsageError(f"playground.py failed: {(out.strip().splitlines() or ['no output'])[-1]}")
    said = [line for line in out.splitlines()
            if line.startswith(("the tokenizer learned from", "token cache:"))]
    print(f"\n`{' '.join(['playground.py', *command[2:]])}`\n" + "".join(f"- {line}\n" for line in said)
          + f"- **text to first step: {seconds:.1f} s**, peak resident memory "
          + (f"{peak_mb:,.0f} MB" if peak_mb else "not measured (no /proc)"), flush=True)
    (learned,) = (folder / "runs").glob("tokenizer-*.json")
    texts = pieces(heldout, float("inf"))
    tokens = sum(map(len, encoder_for(Tokenizer.from_file(learned)).encode_batch(texts)))
    print(f"- its tokenizer: {tokens / heldout.stat().st_size:.4f} tokens per byte of the held-out text", flush=True)
    return seconds


def wait_for_peak(child: subprocess.Popen) -> float | None:
    """Wait for the child; its peak resident memory in MB: Linux's high-water mark (VmHWM), read every 0.2 s
    (getrusage would count the memory of this process, which the child is forked from)."""
    peak, status = None, Path(f"/proc/{child.pid}/status")
    while child.poll() is None:
        try:
            hwm = [line for line in status.read_text().splitlines() if line.startswith("VmHWM:")]
            peak = int(hwm[0].split()[1]) / 1024 if hwm else peak
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    return peak


def main() -> None:
    parser = CliParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1000, help="corpus size in MB")
    parser.add_argument("--sample_mb", type=int, default=1000, help="what the tokenizer trainers read, in MB")
    parser.add_argument("--encode_mb", type=int, default=100, help="what both engines encode, in MB")
    parser.add_argument("--heldout_mb", type=int, default=10, help="held-out documents for tokens per byte")
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer_sample", help="passed to playground.py in step 4 (default: its own default)")
    parser.add_argument("--first_step_only", action="store_true", help="skip the trainers and engines (2 and 3)")
    args = parser.parse_args()
    if not (1 <= args.sample_mb <= args.mb and 1 <= args.encode_mb <= args.mb and args.heldout_mb >= 1):
        raise UsageError("need 1 <= --sample_mb, --encode_mb <= --mb and --heldout_mb >= 1")
    if args.vocab_size < 256 + SPECIAL_TOKENS + 1:
        raise UsageError(f"--vocab_size must be at least {256 + SPECIAL_TOKENS + 1}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (corpus, heldout), make_s = timed(make_corpus, folder, args.mb, args.heldout_mb, args.seed)
        size = corpus.stat().st_size / 1e6
        print(f"{os.cpu_count()} cores; corpus {size:,.0f} MB (this Python's sources and the bundled corpus, "
              f"shuffled documents, repeated; made in {make_s:.0f} s); pieces of {READ_CHARS} characters for the "
              f"trainers", flush=True)
        if not args.first_step_only:
            tokenizer, _ = trainers(corpus, heldout, args.sample_mb, args.vocab_size, folder)
            engines(corpus, Tokenizer.from_file(tokenizer), args.encode_mb)
        first_step(corpus, heldout, folder, args.vocab_size, args.tokenizer_sample)


if __name__ == "__main__":
    run_cli(main)
