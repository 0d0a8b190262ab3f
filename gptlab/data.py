"""From text files to training batches: tokenize once into a cached token file, then sample windows.

corpus .txt files --build_token_cache--> train.bin / val.bin (+ meta.json) --get_batch--> (x, y)

Two kinds of batches from the same token files: a GPT predicts each window's next tokens; a BERT-style
encoder (with a Masking) sees the window with some tokens hidden and predicts those.

The corpus is split by bytes before tokenizing: the last `val_fraction` of its bytes (moved to a line
start) is the validation text. Knowing the exact byte count of each split lets evaluation report bits
per byte, which compares models with different tokenizers fairly.
"""

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from gptlab.corpus import CHUNK_BYTES, Line, read_corpus, regular_file
from gptlab.encoding import encoder_for
from gptlab.errors import UsageError
from gptlab.fileio import atomic_files, atomic_write_text
from gptlab.progress import byte_progress
from gptlab.tokenizer import Tokenizer

CACHE_FORMAT = 1  # bump when the layout of the cache files changes
DEFAULT_VAL_FRACTION = 0.1  # the last 10% of the bytes, as nanoGPT splits Tiny Shakespeare


@dataclass(frozen=True)
class TokenSplit:
    """One split of the corpus, tokenized: a flat file of token ids and the size of the text it came from."""

    path: Path
    dtype: str  # "uint16" when the vocabulary fits, else "uint32"
    num_tokens: int
    num_bytes: int


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def cache_key(files: list[Path], tokenizer: Tokenizer | None, val_fraction: float) -> str:
    """A hash of everything the token files depend on: corpus contents, tokenizer, split, format."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{CACHE_FORMAT}|{val_fraction}|".encode())
    h.update(tokenizer.to_json().encode() if tokenizer is not None else b"")
    for path in files:
        h.update(b"\0file\0")
        with open(path, "rb") as f:
            while block := f.read(CHUNK_BYTES):
                h.update(block)
    return h.hexdigest()


def val_threshold(files: list[Path], val_fraction: float) -> int:
    """(1 - val_fraction) of the corpus's bytes (the files read one after another): a line that begins before
    this offset is training text, one that begins at or after it is validation text."""
    return int(sum(p.stat().st_size for p in files) * (1 - val_fraction))


def val_start(files: list[Path], val_fraction: float) -> int:
    """The byte offset (the files read one after another) where the validation text starts: the first line
    that begins at or after val_threshold (each file begins a line), or the end of the corpus. Everything
    before it is the training text: what the token cache's train split holds and a tokenizer may learn from."""
    threshold, offset = val_threshold(files, val_fraction), 0
    for path in files:
        size = path.stat().st_size
        if offset <= threshold < offset + size:
            with open(path, "rb") as f:
                if threshold > offset:  # inside the file: the training text ends with the line holding byte
                    f.seek(threshold - offset - 1)  # threshold - 1 (read in pieces: a line may be huge)
                    while (piece := f.readline(CHUNK_BYTES)) and not piece.endswith(b"\n"):
                        pass
                return offset + f.tell()
        offset += size
    return offset


def _split_lines(files: list[Path], val_fraction: float) -> Iterator[tuple[str, Line | None]]:
    """Yield (split, line) for every line of the corpus (corpus.read_corpus: its checks, a line longer than
    CHUNK_BYTES in pieces); (split, None) marks the end of a document (file).

    A line is validation text when it begins at or after val_threshold: the text from val_start on, which the
    tokenizer does not learn from. (The pieces of a longer line are placed one by one, and a document's end by
    where it falls, as the token files have always been built.)
    """
    threshold = val_threshold(files, val_fraction)
    seen = 0
    for line in read_corpus(files, val_start(files, val_fraction), past_end=True):
        if line is None:
            yield ("train" if seen <= threshold else "val"), None
        else:
            yield ("train" if seen < threshold else "val"), line
            seen += line.size


def build_token_cache(files: list[Path], tokenizer: Tokenizer, cache_dir: Path, val_fraction: float,
                      wait: Callable[[Path], None] | None = None) -> dict[str, TokenSplit]:
    """Tokenize the corpus into cache_dir/<key>/{train,val}.bin, or reuse them if they already exist whole.

    A torn cache (a meta.json that is empty or invalid, a .bin file missing or of the wrong size: a build
    killed on an old version, a full disk, a hand edit) is rebuilt. Two processes building the same cache at
    once both succeed: each writes its own temporary files, and the second rename puts identical files in place.
    wait: for a process that leaves the building to another one: called with the path of meta.json (written
    last), it returns once that file exists.
    """
    for path in files:  # before hashing them: reading a FIFO would block
        regular_file(path)
    folder = cache_dir / cache_key(files, tokenizer, val_fraction)
    if wait is not None:
        wait(folder / "meta.json")
    splits = _read_cache(folder)
    if splits is None:
        try:
            _write_token_files(files, tokenizer, folder, val_fraction)
        except OSError as e:
            raise UsageError(f"cannot write the token cache in {folder}: {e.strerror or e}") from None
        splits = _read_cache(folder)
        if splits is None:
            raise UsageError(f"the token cache in {folder} could not be read back after writing it")
    return splits


def _read_cache(folder: Path) -> dict[str, TokenSplit] | None:
    """The cache's splits if meta.json and both token files are whole, else None (to be rebuilt)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        splits = {split: TokenSplit(folder / f"{split}.bin", meta["dtype"], int(meta[split]["num_tokens"]),
                                    int(meta[split]["num_bytes"])) for split in ("train", "val")}
        for split in splits.values():
            if split.path.stat().st_size != split.num_tokens * np.dtype(split.dtype).itemsize:
                return None
    except (OSError, ValueError, KeyError, TypeError):  # missing, empty, not JSON, wrong fields
        return None
    return splits


def _write_token_files(files: list[Path], tokenizer: Tokenizer, folder: Path, val_fraction: float) -> None:
    """Stream the corpus through the tokenizer into train.bin and val.bin (fileio.atomic_files: temporary files
    named by this process's id, renamed when whole), then write meta.json last (atomically), so a half-built
    cache is never taken for a whole one."""
    folder.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    counts = {s: {"num_tokens": 0, "num_bytes": 0} for s in ("train", "val")}
    with atomic_files([folder / "train.bin", folder / "val.bin"], "the token cache") as (train_out, val_out):
        _tokenize_into({"train": train_out, "val": val_out}, counts, files, tokenizer, val_fraction, dtype)
    atomic_write_text(folder / "meta.json", json.dumps({"dtype": dtype, **counts}), "token cache index")


def _tokenize_into(outs: dict[str, BinaryIO], counts: dict[str, dict[str, int]], files: list[Path],
                   tokenizer: Tokenizer, val_fraction: float, dtype: str) -> None:
    """The corpus goes to the tokenizer in pieces of about CHUNK_BYTES, cut at line ends (and where the
    validation text or a document starts). One batch of pieces at a time is encoded with encode_batch, which
    spreads the pieces over every core; each piece is encoded as it would be alone, so the token files are the
    same whatever the number of cores, and memory holds one batch. The fastest engine that gives the tokenizer's
    own ids encodes them (encoding.encoder_for); the log says which."""
    encoder = encoder_for(tokenizer)
    print(f"token cache: encoding with {encoder.name} ({encoder.reason})")
    pending: dict[str, list[str]] = {"train": [], "val": []}
    batch: list[tuple[str, str, bool]] = []  # (split, text, ends a document) waiting to be encoded
    batch_size = os.cpu_count() or 1

    def encode_batch() -> None:
        for (split, _, end_of_document), ids in zip(batch, encoder.encode_batch([t for _, t, _ in batch]),
                                                    strict=True):
            if end_of_document:
                ids.append(tokenizer.eot_id)  # documents are separated by the end-of-text token
            outs[split].write(np.asarray(ids, dtype=dtype).tobytes())
            counts[split]["num_tokens"] += len(ids)
        batch.clear()

    def flush(split: str, end_of_document: bool) -> None:
        batch.append((split, "".join(pending[split]), end_of_document))
        pending[split].clear()
        if len(batch) >= batch_size:
            encode_batch()

    total = sum(p.stat().st_size for p in files)
    buffered, current = 0, "train"
    with byte_progress(total, "tokenizing") as bar:  # a bar on a terminal, a line every 30 s in a log
        for split, line in _split_lines(files, val_fraction):
            if split != current or buffered >= CHUNK_BYTES:
                flush(current, end_of_document=False)
                buffered, current = 0, split
            if line is None:
                flush(split, end_of_document=True)
                continue
            pending[split].append(line.text)
            counts[split]["num_bytes"] += line.size
            buffered += line.size
            bar.update(line.size)
        encode_batch()


@dataclass(frozen=True)
class Masking:
    """BERT's masked-language-model corruption (Devlin et al. 2019, section 3.1): each ordinary token is
    chosen with probability `prob`; a chosen token becomes <mask> 80% of the time, a random ordinary token
    10%, and stays itself 10% (so the model cannot assume that an unmasked token is never a target)."""

    mask_id: int
    special_ids: tuple[int, ...]  # never chosen and never drawn as random replacements
    vocab_size: int
    prob: float = 0.15


def mask_tokens(tokens: torch.Tensor, m: Masking, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) for the masked-LM loss: targets hold the original token where one was chosen,
    -1 (ignored by the loss) everywhere else."""
    original = tokens.numpy()
    chosen = (rng.random(original.shape) < m.prob) & ~np.isin(original, m.special_ids)
    action = rng.random(original.shape)
    to_mask = chosen & (action < 0.8)
    to_random = chosen & (action >= 0.8) & (action < 0.9)  # the remaining 10% keep their token
    ordinary = np.setdiff1d(np.arange(m.vocab_size), m.special_ids)
    inputs = original.copy()
    inputs[to_mask] = m.mask_id
    inputs[to_random] = rng.choice(ordinary, size=int(to_random.sum()))
    targets = np.where(chosen, original, -1)
    return torch.from_numpy(inputs), torch.from_numpy(targets)


def batch_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """A generator for one batch, fixed by (seed, stream, index).

    Deriving every batch from its index (not from a running generator) makes the data order a pure
    function of the step: resuming needs only the step number, and N processes drawing slots
    rank, rank + N, ... see exactly the batches one process would draw.
    """
    return np.random.default_rng([seed, stream, index])


def get_batch(split: TokenSplit, batch_size: int, block_size: int, rng: np.random.Generator,
              masking: Masking | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random contiguous windows: x = tokens[i : i+T], y = tokens[i+1 : i+T+1] (the next token at each place).
    With masking, x = tokens[i : i+T] corrupted and y the tokens to recover (see mask_tokens)."""
    # A fresh memmap per batch: cheap, and a long-lived one has been seen to grow resident memory.
    data = np.memmap(split.path, dtype=split.dtype, mode="r")
    starts = rng.integers(0, len(data) - block_size, size=batch_size)
    windows = np.stack([data[i:i + block_size + 1] for i in starts]).astype(np.int64)
    tokens = torch.from_numpy(windows)
    if masking is not None:
        return mask_tokens(tokens[:, :-1], masking, rng)
    return tokens[:, :-1], tokens[:, 1:]
