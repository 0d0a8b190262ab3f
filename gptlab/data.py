"""From a corpus to training batches: tokenize once into cached token shards, then sample windows.

corpus files --build_token_cache--> train-00000.bin ... val-00000.bin ... (+ meta.json) --get_batch--> (x, y)

Two kinds of batches from the same token files: a GPT predicts each window's next tokens; a BERT-style
encoder (with a Masking) sees the window with some tokens hidden and predicts those.

The corpus is split by bytes before tokenizing: the last `val_fraction` of its bytes (moved to a line
start) is the validation text. Knowing the exact byte count of each split lets evaluation report bits
per byte, which compares models with different tokenizers fairly.
"""

import bisect
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch

from gptlab.corpus import (
    CHUNK_BYTES,
    TEXT_FIELD,
    Block,
    Line,
    file_hash,
    file_kind,
    file_lines,
    read_corpus,
    regular_file,
    text_sizes,
)
from gptlab.encoding import Encoder, encoder_for
from gptlab.errors import UsageError
from gptlab.fileio import atomic_files, atomic_write_text
from gptlab.progress import byte_progress
from gptlab.tokenizer import Tokenizer

CACHE_FORMAT = 2  # bump when the layout of the cache files changes (2: shards, resumable)
DEFAULT_VAL_FRACTION = 0.1  # the last 10% of the bytes, as nanoGPT splits Tiny Shakespeare
SHARD_BYTES = 64 << 20  # the most a token shard holds (unless one piece of text alone gives more): a killed
# build loses at most this much work
SPLITS = ("train", "val")
PREPARED = "prepared.json"  # what prepare_data.py prepared a folder from (its marker)
PREPARED_TOKENIZER = "tokenizer.json"  # beside the token shards in a prepared folder


@dataclass(frozen=True)
class TokenSplit:
    """One split of the corpus, tokenized: token ids in shard files read one after another (one flat array),
    and the size of the text they came from."""

    paths: tuple[Path, ...]  # the shards, in order
    dtype: str  # "uint16" when the vocabulary fits, else "uint32"
    num_tokens: int
    num_bytes: int
    shard_tokens: tuple[int, ...] = ()  # tokens in each shard; () for a single file of num_tokens

    def __post_init__(self) -> None:
        if not self.shard_tokens:
            object.__setattr__(self, "shard_tokens", (self.num_tokens,) * len(self.paths))

    def windows(self, starts: Any, length: int) -> np.ndarray:
        """tokens[i : i + length] for each i in starts, as one array: a window may span two shards."""
        offsets = np.cumsum((0, *self.shard_tokens))
        maps: dict[int, np.ndarray] = {}  # each shard opened once per call (a fresh memmap: see get_batch)

        def shard(k: int) -> np.ndarray:
            if k not in maps:
                maps[k] = np.memmap(self.paths[k], dtype=self.dtype, mode="r")
            return maps[k]

        rows = []
        for start in map(int, starts):
            k, parts, at = bisect.bisect_right(offsets, start) - 1, [], start
            while at < start + length:
                part = shard(k)[at - offsets[k]:start + length - offsets[k]]
                parts.append(part)
                at, k = at + len(part), k + 1
            rows.append(parts[0] if len(parts) == 1 else np.concatenate(parts))
        return np.stack(rows)

    def tokens(self) -> np.ndarray:
        """Every token of the split (for tests and small splits: it is read into memory)."""
        return np.concatenate([np.fromfile(p, dtype=self.dtype) for p in self.paths] or [np.zeros(0, self.dtype)])


def prepared_folder(corpus: tuple[str, ...]) -> Path | None:
    """The folder prepare_data.py wrote (its token shards, meta.json and tokenizer.json), if that is the corpus."""
    found = [Path(p) for p in corpus if (Path(p) / PREPARED).is_file() and (Path(p) / PREPARED_TOKENIZER).is_file()]
    if found and len(corpus) > 1:
        raise UsageError(f"{found[0]} is a prepared folder (preprocessing/prepare_data.py): train on it alone")
    return found[0] if found else None


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def cache_key(files: list[Path], tokenizer: Tokenizer | None, val_fraction: float,
              text_field: str = TEXT_FIELD) -> str:
    """A hash of everything the token files depend on: corpus contents, tokenizer, split, format (and the text
    field, where a file has records)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{CACHE_FORMAT}|{val_fraction}|".encode())
    h.update(tokenizer.to_json().encode() if tokenizer is not None else b"")
    for path in files:
        records = file_kind(path)[0] != "text"
        h.update(f"\0file\0{file_hash(path)}{'|' + text_field if records else ''}".encode())
    return h.hexdigest()


def val_threshold(files: list[Path], val_fraction: float, text_field: str = TEXT_FIELD) -> int:
    """(1 - val_fraction) of the corpus's text bytes (the documents read one after another): a line that begins
    before this offset is training text, one that begins at or after it is validation text."""
    return int(sum(text_sizes(files, text_field)) * (1 - val_fraction))


def val_start(files: list[Path], val_fraction: float, text_field: str = TEXT_FIELD) -> int:
    """The byte offset (the documents read one after another) where the validation text starts: the first line
    that begins at or after val_threshold (each document begins a line), or the end of the corpus. Everything
    before it is the training text: what the token cache's train split holds and a tokenizer may learn from."""
    threshold, offset = val_threshold(files, val_fraction, text_field), 0
    for path, size in zip(files, text_sizes(files, text_field), strict=True):
        if offset <= threshold < offset + size:
            return offset + _line_end(path, threshold - offset, text_field)
        offset += size
    return offset


def _line_end(path: Path, at: int, text_field: str) -> int:
    """Where the line holding byte at - 1 of the file's text ends (0 for at = 0: a file begins a line)."""
    if at == 0:
        return 0
    if file_kind(path) == ("text", None):  # a plain file: seek there (read in pieces: a line may be huge)
        with open(path, "rb") as f:
            f.seek(at - 1)
            while (piece := f.readline(CHUNK_BYTES)) and not piece.endswith(b"\n"):
                pass
            return f.tell()
    done = 0
    for line in file_lines(path, text_field):  # a document's end is a line's end
        done += line.size if line is not None else 0
        if done >= at and (line is None or line.text.endswith("\n")):
            return done
    return done


def _split_lines(files: list[Path], val_fraction: float,
                 text_field: str = TEXT_FIELD) -> Iterator[tuple[str, Line | Block | None]]:
    """Yield (split, line) for every line of the corpus (corpus.read_corpus: its checks, a line longer than
    CHUNK_BYTES in pieces); (split, None) marks the end of a document.

    A line is validation text when it begins at or after val_threshold: the text from val_start on, which the
    tokenizer does not learn from. (The pieces of a longer line are placed one by one, and a document's end by
    where it falls, as the token files have always been built.)
    """
    threshold = val_threshold(files, val_fraction, text_field)
    seen = 0
    for line in read_corpus(files, val_start(files, val_fraction, text_field), past_end=True,
                            text_field=text_field, blocks=True):
        if line is None:
            yield ("train" if seen <= threshold else "val"), None
        else:
            yield ("train" if seen < threshold else "val"), line
            seen += line.size


class Piece(NamedTuple):
    """A piece of one split's text, encoded on its own (so the token files do not depend on how many are
    encoded at once, and a build can resume at any piece)."""

    split: str
    text: str
    end_of_document: bool  # the end-of-text token follows its ids
    num_bytes: int
    start: int  # the index (in _split_lines) of the line where it begins: where a resumed build restarts


def _pieces(files: list[Path], val_fraction: float, text_field: str) -> Iterator[Piece]:
    """The corpus in pieces of about CHUNK_BYTES, cut at line ends, where the validation text starts and where a
    document ends (the token files are these cuts: they are the ones they have always been). A piece ends with
    the first line that brings `buffered` to CHUNK_BYTES; a Block's lines are cut by the same rule, found with
    a binary search over their ends instead of line by line."""
    parts: list[str] = []
    buffered = size = start = index = 0  # buffered: not reset at a document's end (the cuts have always been so)
    current = "train"  # index: of the line (or document end) in _split_lines, where a resumed build restarts
    for split, item in _split_lines(files, val_fraction, text_field):
        if item is None:
            if split != current or buffered >= CHUNK_BYTES:
                yield Piece(current, "".join(parts), False, size, start)
                parts, size, start, buffered, current = [], 0, index, 0, split
            yield Piece(split, "".join(parts), True, size, start)
            parts, size, start, index = [], 0, index + 1, index + 1
            continue
        count = 1 if isinstance(item, Line) else len(item.ends)
        done = 0  # the item's lines added so far
        while done < count:
            if split != current or buffered >= CHUNK_BYTES:
                yield Piece(current, "".join(parts), False, size, start)
                parts, size, start, buffered, current = [], 0, index + done, 0, split
            if isinstance(item, Line):
                text, n, done = item.text, item.size, 1
            else:  # up to the first line whose end brings buffered to CHUNK_BYTES, or the Block's end
                first = int(item.ends[done - 1]) if done else 0
                last = min(int(np.searchsorted(item.ends, first + CHUNK_BYTES - buffered)), len(item.ends) - 1)
                end = int(item.ends[last])
                text, n, done = item.data[first:end].decode("utf-8"), end - first, last + 1
            parts.append(text)
            size += n
            buffered += n
        index += done


def token_encoder(tokenizer: Tokenizer) -> Encoder:
    """What encodes the token cache's pieces: the fastest engine that gives the tokenizer's own ids
    (encoding.encoder_for); the log says which."""
    encoder = encoder_for(tokenizer)
    print(f"token cache: encoding with {encoder.name} ({encoder.reason})")
    return encoder


def encode_pieces(encoder: Encoder, texts: list[str]) -> list[list[int]]:
    """The one place the token cache encodes text: a batch of pieces in, their ids out (each piece as alone)."""
    return encoder.encode_batch(texts)


def build_token_cache(files: list[Path], tokenizer: Tokenizer, cache_dir: Path, val_fraction: float,
                      wait: Callable[[Path], None] | None = None, text_field: str = TEXT_FIELD,
                      shard_bytes: int = SHARD_BYTES) -> dict[str, TokenSplit]:
    """Tokenize the corpus into cache_dir/<key>/ (token_folder), or reuse it if it is already whole.

    wait: for a process that leaves the building to another one: called with the path of meta.json (written
    last), it returns once that file exists.
    """
    for path in files:  # before hashing them: reading a FIFO would block
        regular_file(path)
    folder = cache_dir / cache_key(files, tokenizer, val_fraction, text_field)
    if wait is not None:
        wait(folder / "meta.json")
    return token_folder(files, tokenizer, folder, val_fraction, text_field, shard_bytes)


def token_folder(files: list[Path], tokenizer: Tokenizer, folder: Path, val_fraction: float,
                 text_field: str = TEXT_FIELD, shard_bytes: int = SHARD_BYTES) -> dict[str, TokenSplit]:
    """The token shards of both splits in `folder`, built (or finished, after a killed build) unless whole.

    A torn cache (a meta.json that is empty or invalid, a shard missing or of the wrong size: a full disk, a hand
    edit) is rebuilt; a build killed at any moment resumes after its last finished shard, and ends with the same
    files as one never killed. Two processes building the same folder at once both succeed: each writes its own
    temporary files, and renames put identical files in place.
    """
    splits = read_token_folder(folder)
    if splits is None:
        try:
            _write_token_files(files, tokenizer, folder, val_fraction, text_field, shard_bytes)
        except OSError as e:
            raise UsageError(f"cannot write the token cache in {folder}: {e.strerror or e}") from None
        splits = read_token_folder(folder)
        if splits is None:
            raise UsageError(f"the token cache in {folder} could not be read back after writing it")
    return splits


def _shard_path(folder: Path, split: str, index: int) -> Path:
    return folder / f"{split}-{index:05d}.bin"


def _whole_shards(folder: Path, record: dict[str, Any], dtype: str) -> dict[str, list[int]] | None:
    """The token counts of each split's shards that `record` lists, if every one is there at its size."""
    try:
        shards = {split: [int(n) for n in record[split]["shards"]] for split in SPLITS}
        itemsize = np.dtype(dtype).itemsize
        for split, counts in shards.items():
            for index, n in enumerate(counts):
                if _shard_path(folder, split, index).stat().st_size != n * itemsize:
                    return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return shards


def read_token_folder(folder: Path) -> dict[str, TokenSplit] | None:
    """The folder's splits if meta.json and every shard are whole, else None (to be built)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        shards = _whole_shards(folder, meta, meta["dtype"])
        if shards is None or meta.get("format") != CACHE_FORMAT:
            return None
        return {split: TokenSplit(tuple(_shard_path(folder, split, i) for i in range(len(shards[split]))),
                                  meta["dtype"], sum(shards[split]), int(meta[split]["num_bytes"]),
                                  tuple(shards[split])) for split in SPLITS}
    except (OSError, ValueError, KeyError, TypeError):  # missing, empty, not JSON, wrong fields
        return None


class _ShardWriter:
    """Writes pieces' ids into shards of at most shard_bytes, one split after the other; a finished shard is
    renamed into place, then progress.json says where a resumed build starts (the piece after it)."""

    def __init__(self, folder: Path, dtype: str, shard_bytes: int, done: dict[str, list[int]]) -> None:
        self.folder, self.dtype, self.shard_bytes = folder, dtype, shard_bytes
        self.shards = done  # the token counts of the finished shards
        self.stack = contextlib.ExitStack()
        self.out: BinaryIO | None = None
        self.split, self.size = "train", 0

    def write(self, piece: Piece, ids: list[int]) -> None:
        data = np.asarray(ids, dtype=self.dtype).tobytes()
        if not data:
            return
        if self.out is not None and (piece.split != self.split or self.size + len(data) > self.shard_bytes):
            self.finish_shard(position=piece.start)
        if self.out is None:
            path = _shard_path(self.folder, piece.split, len(self.shards[piece.split]))
            (self.out,) = self.stack.enter_context(atomic_files([path], "the token cache"))
            self.split, self.size = piece.split, 0
        self.out.write(data)
        self.size += len(data)

    def finish_shard(self, position: int | None) -> None:
        """Rename the open shard into place; position: where a resumed build starts (None: at the end)."""
        if self.out is None:
            return
        self.stack.close()  # flush, fsync, rename
        self.shards[self.split].append(self.size // np.dtype(self.dtype).itemsize)
        self.out = None
        if position is not None:
            record = {"format": CACHE_FORMAT, "dtype": self.dtype, "position": position,
                      **{split: {"shards": self.shards[split]} for split in SPLITS}}
            atomic_write_text(self.folder / "progress.json", json.dumps(record), "token cache progress")

    def __enter__(self) -> "_ShardWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stack.__exit__(*exc)  # on an error the open shard's temporary file is removed


def _resume_point(folder: Path, dtype: str) -> tuple[int, dict[str, list[int]]]:
    """Where a killed build of this folder stopped: the piece to start at and the shards already finished."""
    try:
        record = json.loads((folder / "progress.json").read_text())
        shards = _whole_shards(folder, record, dtype)
        if shards is not None and record["format"] == CACHE_FORMAT and record["dtype"] == dtype:
            return int(record["position"]), shards
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return 0, {split: [] for split in SPLITS}


def _write_token_files(files: list[Path], tokenizer: Tokenizer, folder: Path, val_fraction: float,
                       text_field: str, shard_bytes: int) -> None:
    """Stream the corpus's pieces through the tokenizer into the shards, a batch of pieces at a time (memory holds
    two batches); after a killed build, the pieces its finished shards hold are read again but not encoded. Then
    meta.json, written last (atomically), so a half-built cache is never taken for a whole one."""
    folder.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    position, done = _resume_point(folder, dtype)
    if position:
        print(f"resuming the token cache in {folder} after its {sum(map(len, done.values()))} finished shard(s)")
    encoder = token_encoder(tokenizer)
    started = time.monotonic()
    counts = dict.fromkeys(SPLITS, 0)
    batch_size = 4 * (os.cpu_count() or 1)  # pieces: a few per thread, so that threads end close together

    def batches() -> Iterator[list[Piece]]:
        batch: list[Piece] = []
        for piece in _pieces(files, val_fraction, text_field):
            counts[piece.split] += piece.num_bytes
            bar.update(piece.num_bytes)
            if piece.start < position:
                continue  # in a shard the killed build finished
            batch.append(piece)
            if len(batch) >= batch_size:
                yield batch
                batch = []
        yield batch

    with _ShardWriter(folder, dtype, shard_bytes, done) as writer, \
            byte_progress(sum(text_sizes(files, text_field)), "tokenizing") as bar, \
            ThreadPoolExecutor(1) as background:
        def write(batch: list[Piece], encoded: Future) -> None:
            for piece, ids in zip(batch, encoded.result(), strict=True):
                writer.write(piece, ids + [tokenizer.eot_id] if piece.end_of_document else ids)

        # Each batch is encoded in the background while the next one is read (reading is the one serial part).
        previous = None
        for batch in batches():
            encoded = background.submit(encode_pieces, encoder, [p.text for p in batch])
            if previous is not None:
                write(*previous)
            previous = batch, encoded
        write(*previous)
        writer.finish_shard(position=None)
    meta = {"format": CACHE_FORMAT, "dtype": dtype,
            **{split: {"num_tokens": sum(done[split]), "num_bytes": counts[split], "shards": done[split]}
               for split in SPLITS}}
    atomic_write_text(folder / "meta.json", json.dumps(meta), "token cache index")
    (folder / "progress.json").unlink(missing_ok=True)
    seconds, text_mb = time.monotonic() - started, sum(counts.values()) / 1e6
    print(f"token cache: {text_mb:,.1f} MB of text in {seconds:.1f} s ({text_mb / max(seconds, 1e-9):.1f} MB/s), "
          f"{sum(meta[split]['num_tokens'] for split in SPLITS):,} tokens")


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
    # Fresh memmaps per batch (TokenSplit.windows): cheap, and a long-lived one has been seen to grow resident
    # memory. The windows are drawn over the shards as one array: the same draws whatever the shard size.
    starts = rng.integers(0, split.num_tokens - block_size, size=batch_size)
    windows = split.windows(starts, block_size + 1).astype(np.int64)
    tokens = torch.from_numpy(windows)
    if masking is not None:
        return mask_tokens(tokens[:, :-1], masking, rng)
    return tokens[:, :-1], tokens[:, 1:]
