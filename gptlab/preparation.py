"""What a training run prepares before its first step: the tokenizer (the --tokenizer file, or one trained on
the corpus's training split alone) and the token cache of both splits. Under torchrun each machine's first
process prepares them and the others wait for the files."""

import time
from functools import partial
from pathlib import Path

from config import TrainConfig
from gptlab.data import TokenSplit, build_token_cache, cache_key, val_start
from gptlab.errors import UsageError
from gptlab.runtime import Runtime
from gptlab.tokenizer import LearnedFrom, Tokenizer, learned_from, train_tokenizer

DEFAULT_VOCAB_SIZE = 8000


def resolve_tokenizer(c: TrainConfig, files: list[Path], rt: Runtime) -> tuple[Tokenizer, LearnedFrom | None]:
    """The --tokenizer file (the user's choice, trained on whatever they chose: what it learned from is unknown),
    or one trained on the corpus's training split alone (once; kept in out_dir, keyed by corpus, split and size),
    so the validation text stays unseen by everything that learns; with what it learned from (learned_from)."""
    if c.tokenizer is not None:
        tokenizer = Tokenizer.from_file(c.tokenizer)
        if c.vocab_size is not None and c.vocab_size != tokenizer.vocab_size:
            raise UsageError(f"--vocab_size {c.vocab_size} does not match {c.tokenizer}, which has "
                             f"{tokenizer.vocab_size} tokens (leave --vocab_size out to use the tokenizer's)")
        return tokenizer, None
    vocab_size = c.vocab_size or DEFAULT_VOCAB_SIZE
    # "val<fraction>" in the name: tokenizers saved before the split was held out (named without it) learned
    # from the validation text too, and are never picked up.
    key = cache_key(files, None, c.val_fraction)[:12]
    path = Path(c.out_dir) / f"tokenizer-{c.tokenizer_kind}{vocab_size}-val{c.val_fraction:g}-{key}.json"
    end = val_start(files, c.val_fraction)
    if rt.prepares_data and not path.exists():
        print(f"training a {c.tokenizer_kind} tokenizer ({vocab_size} tokens) on the corpus's training split -> "
              f"{path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        # With <mask> <pad> <cls> <sep> (4 of the vocab_size ids), so that the same tokenizer serves masked-LM
        # pretraining and fine-tuning (finetune.py) of the model trained here.
        train_tokenizer(files, c.tokenizer_kind, vocab_size, show_progress=True,
                        bert_tokens=True, end=end).save(path)
    wait_for(path, "the tokenizer")
    return Tokenizer.from_file(path), learned_from(files, end)


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
    then reused)."""
    wait = None if rt.prepares_data else partial(wait_for, what="the token cache")
    splits = build_token_cache(files, tokenizer, Path(c.out_dir) / "token_cache", c.val_fraction, wait)
    for name, split in splits.items():
        if split.num_tokens < c.model.block_size + 1:
            raise UsageError(f"the {name} split has {split.num_tokens} tokens, fewer than block_size + 1 = "
                             f"{c.model.block_size + 1}: use a longer corpus, a smaller --block_size or another "
                             f"--val_fraction")
    return splits
