"""Tokenizers: train, save, load, encode and decode, on top of Hugging Face `tokenizers`.

Two kinds (the kind is read back from the saved JSON: a ByteLevel pre-tokenizer means bbpe):
    bbpe  byte-level BPE as in GPT-2: text is UTF-8 bytes, each byte one of 256 base symbols, merges on
          top. Any text round-trips exactly: decode(encode(s)) == s (emoji, CJK, tabs, newlines, \r).
    bpe   vanilla BPE over the characters seen in training, with an unknown token. Text is split at
          spaces and punctuation; each space becomes a "▁" marker glued to the front of what follows it
          (SentencePiece's Metaspace scheme, never prepended at the start of the text), so decoding
          restores spaces, runs of spaces and newlines exactly. What bpe does NOT preserve:
            - characters never seen in training (often the tab, "\r", accents, emoji): they become <unk>
              and decode as the five characters "<unk>";
            - a "▁" (U+2581) in the input: it decodes as a space.

Both kinds encode pieces of a text independently of each other: decode(encode(a) + encode(b)) equals
decode(encode(a + b)), so a long corpus can be encoded in chunks. The literal text "<|endoftext|>" (and
"<unk>" for bpe) in the input is encoded as the special token.

Special tokens, with ids fixed by their order in the trainer's list:
    0  <|endoftext|>  separates documents; generation stops at it     (both kinds)
    1  <unk>          stands for a character outside the vocabulary   (bpe only)
and, when trained with bert_tokens (for masked-language-model pretraining and fine-tuning), next in order
(ids 1-4 for bbpe, 2-5 for bpe):
       <mask>         a hidden token the encoder must predict (it takes the space before it along)
       <pad>          fills short sequences in a batch; never attended to
       <cls>          a sequence's summary position: the encoder's first token, the decoder's last
       <sep>          separates the two texts of a pair
"""

import bisect
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import accumulate, chain, pairwise
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from gptlab.corpus import TEXT_FIELD, Block, Line, file_hash, read_corpus, text_sizes
from gptlab.corpus import corpus_files as corpus_files  # where the CLIs have always imported it from
from gptlab.errors import UsageError
from gptlab.fileio import atomic_write_text
from gptlab.progress import byte_progress

EOT = "<|endoftext|>"
UNK = "<unk>"
MASK, PAD, CLS, SEP = "<mask>", "<pad>", "<cls>", "<sep>"
BERT_TOKENS = (MASK, PAD, CLS, SEP)
KINDS = ("bpe", "bbpe")
# The corpus is streamed in pieces of a few kB, never read into one string. Small pieces matter: the trainer
# reads hundreds of pieces ahead, so memory grows with the piece size (1 MB pieces: +300 MB on a 20 MB corpus).
READ_CHARS = 1 << 12
# Where the trainer's pieces may end a line (as a text file's readline does: "\r\n", a lone "\r", "\n").
LINE_END = re.compile(r"\r\n|\r|\n")
# Far above any useful vocabulary (GPT-4's has about 100k tokens); the trainer allocates for the size asked up
# front, so an absurd size must be refused before training, not end in an out-of-memory abort.
MAX_VOCAB_SIZE = 1_000_000
LearnedFrom = list[dict[str, str | int]]  # see learned_from
# The most of the training split a tokenizer learns from by default (--tokenizer_sample): on a 1 GB corpus, a
# 100 MB sample costs 0.3% more tokens per byte of held-out text than all 900 MB and trains 6x faster (docs/data.md).
TOKENIZER_SAMPLE = "100MB"
SAMPLE_BLOCK = 1 << 20  # a tokenizer's sample is taken in blocks of this many bytes of text, spread evenly


class Tokenizer:
    """A trained tokenizer.json: encode/decode and the few facts the model needs."""

    def __init__(self, hf: HFTokenizer) -> None:
        self.hf = hf
        eot = hf.token_to_id(EOT)
        if eot is None:
            raise UsageError(f"tokenizer has no {EOT} token: train it with preprocessing/train_tokenizer.py")
        self.eot_id: int = eot

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"tokenizer file not found: {path}") from None
        except OSError as e:
            raise UsageError(f"cannot read tokenizer file {path}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise UsageError(f"cannot read tokenizer file {path}: not UTF-8 text") from None
        return cls.from_json(text, source=str(path))

    @classmethod
    def from_json(cls, text: str, source: str = "tokenizer JSON") -> "Tokenizer":
        try:
            return cls(HFTokenizer.from_str(text))
        except Exception:  # tokenizers raises a bare Exception for malformed JSON
            raise UsageError(f"{source} is not a tokenizer.json file") from None

    def to_json(self) -> str:
        return self.hf.to_str()

    def save(self, path: str | Path) -> None:
        """Write atomically (fileio.atomic_write): the old file or the new one, never a torn one."""
        atomic_write_text(path, self.to_json(), "tokenizer")

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids of all special tokens (end-of-text, unknown, and the BERT ones when present)."""
        return tuple(sorted(i for i, t in self.hf.get_added_tokens_decoder().items() if t.special))

    @property
    def kind(self) -> str:
        return "bbpe" if isinstance(self.hf.pre_tokenizer, pre_tokenizers.ByteLevel) else "bpe"

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False)

    def special_id(self, token: str, purpose: str) -> int:
        """The id of a special token that `purpose` needs; a clear error when the tokenizer lacks it."""
        token_id = self.hf.token_to_id(token)
        if token_id is None:
            raise UsageError(f"{purpose} needs the {token} token, which this tokenizer lacks: train one with "
                             f"preprocessing/train_tokenizer.py ... --bert_tokens")
        return token_id


@dataclass
class Reading:
    """What a tokenizer's training read of the corpus, filled as it reads: how many bytes of each file's text it
    was given, and each file's hash as it was read (a file changed meanwhile is recorded as it was read)."""

    files: list[Path]
    text_field: str = TEXT_FIELD
    seen: list[int] = field(default_factory=list)
    digests: dict[Path, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.seen = [0] * len(self.files)

    def learned_from(self) -> LearnedFrom:
        """Each file: its name, size, content hash and how many bytes of its text the tokenizer learned from.
        tokenizer.json has no room for it (the tokenizers library refuses a key it does not know), so
        checkpoints keep it beside the tokenizer, and evaluate.py can warn when it scores a file the tokenizer
        learned from."""
        return [{"file": str(path), "bytes": path.stat().st_size, "learned_bytes": seen,
                 "blake2b": self.digests.get(path) or file_hash(path)}
                for path, seen in zip(self.files, self.seen, strict=True)]


def learned_from(files: list[Path], end: int | None, text_field: str = TEXT_FIELD) -> LearnedFrom:
    """The record of a tokenizer trained on these files up to byte `end` before the record was kept beside it
    (see Reading): the files as they are now."""
    record, offset = [], 0
    for path, size in zip(files, text_sizes(files, text_field), strict=True):
        learned = size if end is None else max(0, min(size, end - offset))
        record.append({"file": str(path), "bytes": path.stat().st_size, "learned_bytes": learned,
                       "blake2b": file_hash(path)})
        offset += size
    return record


def _sampled(lines: Iterator[Line | Block | None], end: int, sample: int,
             reading: Reading | None) -> Iterator[Line | Block | None]:
    """The lines of `sample` bytes of blocks spread evenly over the first `end` bytes (all of them when end <=
    sample), at most `sample` bytes in all; None where a skipped stretch or a document ends (no piece spans it).
    A line is taken whole if it starts in a chosen block and fits in what is left of the sample (a Block's lines
    a run at a time, line by line only where the sample is nearly full). Counts what each file gave in
    reading.seen."""
    block = max(1, min(SAMPLE_BLOCK, sample // 16))
    blocks, wanted = max(1, -(-end // block)), sample // block

    def chosen(starts: Any) -> Any:  # an offset or an array: the blocks where ceil(b * wanted / blocks) steps up
        b = starts // block
        return b >= 0 if end <= sample else -(-(b + 1) * wanted // blocks) > -(-b * wanted // blocks)

    file_ends = list(accumulate(text_sizes(reading.files, reading.text_field))) if reading is not None else []
    offset = taken = 0
    skipping = False
    for item in lines:
        if item is None:
            yield None
            continue
        runs = ((item, chosen(offset)),) if isinstance(item, Line) else _runs(item, offset, chosen)
        for run, take in runs:
            near_full = take and taken + run.size > sample and isinstance(run, Block)
            for part in (run.lines(i, i + 1) for i in range(len(run.ends))) if near_full else (run,):
                if take and taken + part.size <= sample:
                    taken, skipping = taken + part.size, False
                    if reading is not None:
                        reading.seen[bisect.bisect_right(file_ends, offset)] += part.size
                    yield part
                elif not skipping:
                    skipping = True
                    yield None
                offset += part.size


def _runs(item: Block, offset: int, chosen: Any) -> Iterator[tuple[Block, bool]]:
    """The Block (at byte `offset`) in runs of lines that are all chosen or all not, by where each line starts."""
    take = chosen(offset + np.concatenate(([0], item.ends[:-1])))
    cuts = [0, *(np.flatnonzero(take[1:] != take[:-1]) + 1).tolist(), len(take)]
    for i, j in pairwise(cuts):
        yield item.lines(i, j), bool(take[i])


def iter_corpus(files: list[Path], end: int | None = None, text_field: str = TEXT_FIELD, sample: int | None = None,
                reading: Reading | None = None) -> Iterator[str]:
    """The corpus's text (corpus.read_corpus: its checks; up to `end`, the training text's end, when given) in
    the pieces the trainer learns from: READ_CHARS characters, then up to the end of that line but at most
    READ_CHARS more, a piece never spanning two documents. The trainer counts words piece by piece, so these cuts
    are part of what it learns: they are the ones it has always been given.

    sample: at most this many bytes, from blocks spread evenly over the text (see _sampled); reading: filled with
    what was read (needs `end`)."""
    lines = read_corpus(files, end, text_field=text_field, digests=reading.digests if reading else None,
                        blocks=True)
    if sample is not None or reading is not None:
        training = sum(text_sizes(files, text_field)) if end is None else end
        lines = _sampled(lines, training, training if sample is None else sample, reading)
    parts: list[str] = []  # text read, not yet yielded: joined once it holds a piece, so short lines copy little
    chars = 0
    for line in chain(lines, [None]):  # None: the end of a document, of a sampled stretch, or of what is read
        if line is not None:
            text = line.text
            parts.append(text)
            chars += len(text)
            if chars < 2 * READ_CHARS:  # too little to know where the next piece ends, before a document's end
                continue
        text, start = "".join(parts), 0
        while len(text) - start >= 2 * READ_CHARS or (line is None and start < len(text)):
            stop = min(start + 2 * READ_CHARS, len(text))
            newline = LINE_END.search(text, start + READ_CHARS, stop)
            stop = newline.end() if newline else stop
            yield text[start:stop]
            start = stop
        parts, chars = [text[start:]], len(text) - start


def _new_tokenizer(kind: str) -> HFTokenizer:
    if kind == "bbpe":
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # True would add a space
        tok.decoder = decoders.ByteLevel()
        return tok
    tok = HFTokenizer(models.BPE(unk_token=UNK))
    # Split into words and single punctuation marks; each space becomes "▁" glued to the next piece.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
        pre_tokenizers.Punctuation(),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    return tok


def special_tokens(kind: str, bert_tokens: bool) -> list[str | AddedToken]:
    """The special tokens in id order (see the module docstring)."""
    tokens: list[str | AddedToken] = [EOT] if kind == "bbpe" else [EOT, UNK]
    if not bert_tokens:
        return tokens
    # "a <mask> b": the mask stands for a whole word, and words carry their leading space (" b"), so the mask
    # absorbs the space before it (lstrip) instead of leaving a lone space token in front of it.
    return tokens + [AddedToken(MASK, special=True, lstrip=True), PAD, CLS, SEP]


def _trainer(kind: str, vocab_size: int, specials: list[str], show_progress: bool) -> trainers.BpeTrainer:
    if kind == "bbpe":
        return trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=show_progress,
                                   initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    return trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=show_progress)


def check_vocab_size(vocab_size: int) -> None:
    """Refuse a size no corpus needs. A size above what the corpus can give is harmless: training stops when
    no pair is left to merge (1,000,000 on the 1 MB bundled corpus: 2 s, 90 MB, 23k tokens)."""
    if vocab_size > MAX_VOCAB_SIZE:
        raise UsageError(f"--vocab_size must be at most {MAX_VOCAB_SIZE:,} (got {vocab_size:,})")


def train_tokenizer(files: list[Path], kind: str, vocab_size: int, show_progress: bool = True,
                    bert_tokens: bool = False, end: int | None = None, text_field: str = TEXT_FIELD,
                    sample: int | None = None, reading: Reading | None = None) -> Tokenizer:
    """Learn BPE merges from the corpus, streamed; the same corpus always gives the same tokenizer.

    end: learn from the text before this byte offset only (data.val_start: the training split), so the merges
    owe nothing to the validation text. sample: at most this many bytes of it, spread evenly (--tokenizer_sample).
    reading: filled with what was read, file by file (Reading.learned_from).
    """
    if kind not in KINDS:
        raise UsageError(f"unknown tokenizer kind {kind!r}: choose bpe or bbpe")
    specials = special_tokens(kind, bert_tokens)
    minimum = (256 if kind == "bbpe" else 1) + len(specials)
    if vocab_size < minimum:
        raise UsageError(f"--vocab_size must be at least {minimum} for {kind} (got {vocab_size})")
    check_vocab_size(vocab_size)
    tok = _new_tokenizer(kind)
    # Counting the corpus's words is most of the time on a large corpus: show it in bytes (MB/s, ETA; in a log
    # file, a line every 30 s); the trainer's own bar (terminals only) then shows the merges. The pieces are
    # ~4 kB of characters: their number, for that bar's total, is about the corpus's bytes / READ_CHARS.
    total = sum(text_sizes(files, text_field))
    size = min(total if end is None else min(end, total), sample or total)
    with byte_progress(size, "reading corpus", show_progress) as bar:
        tok.train_from_iterator(_counted(iter_corpus(files, end, text_field, sample, reading), bar), _trainer(
            kind, vocab_size, specials, show_progress and sys.stderr.isatty()), length=size // READ_CHARS + 1)
    return Tokenizer(tok)


def _counted(pieces: Iterator[str], bar: Any) -> Iterator[str]:
    for piece in pieces:
        bar.update(len(piece.encode("utf-8")))
        yield piece
