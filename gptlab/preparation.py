"""What a training run prepares before its first step: the tokenizer (the --tokenizer file, or one trained on a
sample of the corpus's training split alone) and the token cache of both splits; or neither, for a folder that
preprocessing/prepare_data.py prepared. Under torchrun each machine's first process prepares them and the others
wait for the files."""

import json
import time
from functools import partial
from pathlib import Path

from config import TrainConfig
from gptlab.cli import parse_size
from gptlab.corpus import corpus_files, file_kind
from gptlab.data import (
    PREPARED_TOKENIZER,
    TokenSplit,
    build_token_cache,
    cache_key,
    prepared_folder,
    read_token_folder,
    val_start,
)
from gptlab.errors import UsageError
from gptlab.fileio import atomic_write_text
from gptlab.runtime import Runtime
from gptlab.tokenizer import LearnedFrom, Reading, Tokenizer, learned_from, train_tokenizer

DEFAULT_VOCAB_SIZE = 8000
def corpus_of(c: TrainConfig) -> list[Path]:
    """The corpus's files; none for a prepared folder (its text is not read again)."""
    return [] if prepared_folder(c.corpus) else corpus_files(list(c.corpus))


def resolve_tokenizer(c: TrainConfig, files: list[Path], rt: Runtime) -> tuple[Tokenizer, LearnedFrom | None]:
    """The --tokenizer file (the user's choice, trained on whatever they chose: what it learned from is unknown),
    the prepared folder's, or one trained on a sample of the corpus's training split alone (once; kept in out_dir,
    keyed by corpus, split, size and sample), so the validation text stays unseen by everything that learns; with
    what it learned from (tokenizer.Reading)."""
    folder = prepared_folder(c.corpus)
    if c.tokenizer is not None or folder is not None:
        path = Path(c.tokenizer) if c.tokenizer is not None else folder / PREPARED_TOKENIZER
        tokenizer = Tokenizer.from_file(path)
        if c.vocab_size is not None and c.vocab_size != tokenizer.vocab_size:
            raise UsageError(f"--vocab_size {c.vocab_size} does not match {path}, which has "
                             f"{tokenizer.vocab_size} tokens (leave --vocab_size out to use the tokenizer's)")
        return tokenizer, _prepared_record(folder) if c.tokenizer is None else None
    vocab_size = c.vocab_size or DEFAULT_VOCAB_SIZE
    sample = parse_size(c.tokenizer_sample)
    # "val<fraction>" in the name: tokenizers saved before the split was held out (named without it) learned
    # from the validation text too, and are never picked up. "sample<bytes>" wherever the sample may be less than
    # the training split (named from file sizes: the processes that wait for the file know it without reading).
    key = cache_key(files, None, c.val_fraction, c.text_field)[:12]
    may_sample = sum(p.stat().st_size for p in files) > sample or any(file_kind(p) != ("text", None) for p in files)
    sampled = f"-sample{sample}" if may_sample else ""
    path = Path(c.out_dir) / f"tokenizer-{c.tokenizer_kind}{vocab_size}-val{c.val_fraction:g}{sampled}-{key}.json"
    record = path.with_suffix(".learned_from")  # JSON: what it learned from, written before it (wait_for)
    if rt.prepares_data and not path.exists():
        _train_own_tokenizer(c, files, vocab_size, sample, path, record)
    wait_for(path, "the tokenizer")
    try:
        learned = json.loads(record.read_text())
    except (OSError, ValueError):  # a tokenizer saved before the record was kept: the files as they are now
        learned = learned_from(files, val_start(files, c.val_fraction, c.text_field), c.text_field)
    return Tokenizer.from_file(path), learned


def _train_own_tokenizer(c: TrainConfig, files: list[Path], vocab_size: int, sample: int, path: Path,
                         record: Path) -> None:
    """Train on (a sample of) the training split; write what it read to `record`, then the tokenizer to `path`."""
    end = val_start(files, c.val_fraction, c.text_field)  # reads every record first: a bad one stops us here
    print(f"training a {c.tokenizer_kind} tokenizer ({vocab_size} tokens) on the corpus's training split -> {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    reading, started = Reading(files, c.text_field), time.monotonic()
    # With <mask> <pad> <cls> <sep> (4 of the vocab_size ids), so that the same tokenizer serves masked-LM
    # pretraining and fine-tuning (finetune.py) of the model trained here.
    tokenizer = train_tokenizer(files, c.tokenizer_kind, vocab_size, show_progress=True, bert_tokens=True,
                                end=end, text_field=c.text_field, sample=sample, reading=reading)
    seen = sum(reading.seen)
    print(f"the tokenizer learned from {seen / 1e6:,.1f} MB of the {end / 1e6:,.1f} MB training split ("
          f"{'all of it' if seen == end else f'--tokenizer_sample {c.tokenizer_sample}, spread evenly'}) in "
          f"{time.monotonic() - started:.1f} s")
    atomic_write_text(record, json.dumps(reading.learned_from()), "tokenizer record")
    tokenizer.save(path)


def _prepared_record(folder: Path | None) -> LearnedFrom | None:
    try:
        return json.loads((folder / "meta.json").read_text()).get("tokenizer_learned_from") if folder else None
    except (OSError, ValueError):
        return None


def wait_for(path: Path, what: str) -> None:
    """Wait until `path` exists: the other processes wait for the files that each machine's first process prepares.
    Polling, not a collective, since the tokenizer and token cache of a large corpus can take longer than NCCL's
    collective timeout; if the preparing process fails, torchrun stops the job."""
    shown = False
    while not path.exists():
        if not shown:
            print(f"waiting for {what} ({path}) from this machine's first process")
            shown = True
        time.sleep(0.5)


def load_data(c: TrainConfig, tokenizer: Tokenizer, files: list[Path], rt: Runtime) -> dict[str, TokenSplit]:
    """Token files for the train and val splits (built once per machine, by its first process (local rank 0),
    then reused), or those of a prepared folder."""
    folder = prepared_folder(c.corpus)
    if folder is not None:
        splits = _prepared_splits(folder, tokenizer)
    else:
        wait = None if rt.prepares_data else partial(wait_for, what="the token cache")
        splits = build_token_cache(files, tokenizer, Path(c.out_dir) / "token_cache", c.val_fraction, wait,
                                   c.text_field)
    for name, split in splits.items():
        if split.num_tokens < c.model.block_size + 1:
            raise UsageError(f"the {name} split has {split.num_tokens} tokens, fewer than block_size + 1 = "
                             f"{c.model.block_size + 1}: use a longer corpus, a smaller --block_size or another "
                             f"--val_fraction")
    return splits


def _prepared_splits(folder: Path, tokenizer: Tokenizer) -> dict[str, TokenSplit]:
    splits = read_token_folder(folder)
    if splits is None:
        raise UsageError(f"{folder} is not a whole prepared folder (a shard is missing or torn): run "
                         f"preprocessing/prepare_data.py again with --out {folder}")
    if Tokenizer.from_file(folder / PREPARED_TOKENIZER).to_json() != tokenizer.to_json():
        raise UsageError(f"{folder} was prepared with another tokenizer than this run's: train on it without "
                         f"--tokenizer (it holds its own, {PREPARED_TOKENIZER})")
    return splits
