"""A fast engine for encoding a corpus, giving exactly the ids of the reference engine (Hugging Face `tokenizers`).

    encoder_for(tokenizer).encode_batch(texts) -> one list of ids per text

A byte-level BPE (the bbpe kind) is run through `tiktoken`, which encodes the same text 6-9x faster on 2 cores
(docs/speed.md) and releases the GIL, so threads use every core. tiktoken takes a vocabulary of byte strings
ranked by merge priority, split by a regex: the tokenizer's vocabulary (GPT-2's byte-to-unicode table inverted)
with rank = token id, and GPT-2's regex, which is the one the ByteLevel pre-tokenizer splits by. That gives the
same ids only when what follows holds, so each is checked and anything else (the bpe kind, a normalizer, an
unusual setting) keeps the reference engine, whose name the log prints:
  - nothing before or after the split (no normalizer, no prefix space) and a plain BPE model (no dropout, unknown
    token, word prefix or suffix, byte fallback); all 256 byte symbols in the vocabulary;
  - merges in id order, one per token: tiktoken merges the adjacent pair whose concatenation has the lowest id,
    `tokenizers` the pair that comes first in its merges list;
  - no token reachable through another pair than its own merge: tiktoken would merge any adjacent pair whose
    concatenation is in the vocabulary (see _merge_reachable);
  - added tokens (<|endoftext|>, <mask>, ...) cut out of the text before encoding as `tokenizers` does: leftmost
    longest match, tokens that are not normalized first, <mask>'s lstrip taking the whitespace before it.
"""

import json
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any, Protocol

import tiktoken

from gptlab.tokenizer import Tokenizer

# The ByteLevel pre-tokenizer's split (GPT-2's regex, tokenizers/src/pre_tokenizers/byte_level.rs).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# What an added token's lstrip takes: Rust's `\s` (Unicode White_Space), which Python's str.isspace() is not.
WHITE_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
              "\u2028\u2029\u202f\u205f\u3000"


class Encoder(Protocol):
    name: str  # the engine: "tiktoken" or "tokenizers"
    reason: str  # why this engine: what the log says

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...


class ReferenceEncoder:
    """The tokenizer's own engine (Hugging Face `tokenizers`), which spreads a batch over every core itself."""

    name = "tokenizers"

    def __init__(self, tokenizer: Tokenizer, reason: str) -> None:
        self.tokenizer, self.reason = tokenizer, reason

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer.encode_batch(texts)


class TiktokenEncoder:
    """A byte-level BPE through tiktoken, the texts of a batch on threads (tiktoken releases the GIL), in order."""

    name = "tiktoken"
    reason = "byte-level BPE, converted exactly"

    def __init__(self, ranks: dict[bytes, int], added: list[dict[str, Any]], threads: int) -> None:
        self.bpe = tiktoken.Encoding("converted", pat_str=GPT2_SPLIT, mergeable_ranks=ranks, special_tokens={})
        # Two passes, as tokenizers cuts them: tokens that are not normalized out of the text, then the others
        # out of what is left between them (they would differ only under a normalizer).
        self.passes = [_AddedTokens([t for t in added if t["normalized"] == normalized])
                       for normalized in (False, True)]
        self.threads = threads

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece, token_id in self._pieces(text, 0):
            if token_id is None:
                ids.extend(self.bpe.encode_ordinary(piece))
            else:
                ids.append(token_id)
        return ids

    def _pieces(self, text: str, depth: int) -> Iterator[tuple[str, int | None]]:
        """The text cut into (ordinary text, None) and (added token, its id) pieces, pass after pass."""
        if depth == len(self.passes):
            yield text, None
            return
        for piece, token_id in self.passes[depth].split(text):
            if token_id is None:
                yield from self._pieces(piece, depth + 1)
            else:
                yield piece, token_id

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.threads < 2 or len(texts) < 2:
            return [self.encode(t) for t in texts]
        with ThreadPoolExecutor(min(self.threads, len(texts))) as pool:  # a batch holds megabytes: starting
            return list(pool.map(self.encode, texts))  # its threads costs nothing in comparison


class _AddedTokens:
    """Cuts added tokens out of a text as tokenizers' AddedVocabulary.find_matches does."""

    def __init__(self, tokens: list[dict[str, Any]]) -> None:
        self.ids = {t["content"]: t["id"] for t in tokens}
        self.lstrip = {t["content"] for t in tokens if t["lstrip"]}
        # Longest first: at one position the regex takes the first alternative that matches, Aho-Corasick's
        # LeftmostLongest the longest one.
        contents = sorted(self.ids, key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, contents))) if contents else None

    def split(self, text: str) -> Iterator[tuple[str, int | None]]:
        if self.pattern is None or not any(c in text for c in self.ids):  # the common case: a plain search
            yield text, None
            return
        done = 0  # where the text not yet yielded starts
        for match in self.pattern.finditer(text):
            start = match.start()
            if match.group() in self.lstrip:  # the whitespace before it, not what an earlier token took
                while start > done and text[start - 1] in WHITE_SPACE:
                    start -= 1
            if done < start:
                yield text[done:start], None
            yield text[start:match.end()], self.ids[match.group()]
            done = match.end()
        if done < len(text):
            yield text[done:], None


def encoder_for(tokenizer: Tokenizer, threads: int | None = None) -> Encoder:
    """The fastest engine that gives exactly the tokenizer's ids: tiktoken for a convertible byte-level BPE, else
    the reference engine; threads: how many texts of a batch are encoded at once (default: every core)."""
    threads = threads or os.cpu_count() or 1
    spec = json.loads(tokenizer.to_json())
    reason = _not_convertible(spec)
    ranks = tiktoken_ranks(spec) if reason is None else reason
    if isinstance(ranks, str):
        return ReferenceEncoder(tokenizer, ranks)
    return TiktokenEncoder(ranks, spec["added_tokens"], threads)


def _not_convertible(spec: dict[str, Any]) -> str | None:
    """Why tiktoken cannot run this tokenizer as it is (its settings), or None."""
    pre = spec.get("pre_tokenizer") or {}
    model = spec.get("model") or {}
    if pre.get("type") != "ByteLevel" or model.get("type") != "BPE":
        return "not a byte-level BPE"
    if pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return "a ByteLevel pre-tokenizer with a prefix space or without GPT-2's split"
    if spec.get("normalizer") is not None:
        return "a normalizer"
    if (spec.get("post_processor") or {"type": "ByteLevel"})["type"] != "ByteLevel":
        return "a post-processor that may add tokens"
    if any(model.get(k) for k in ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix",
                                  "byte_fallback")):
        return "a BPE model with dropout, an unknown token, a word prefix or suffix, or byte fallback"
    if any(t["single_word"] or t["rstrip"] for t in spec["added_tokens"]):
        return "an added token with single_word or rstrip"
    return None


@lru_cache(maxsize=1)
def _byte_of_symbol() -> dict[str, int]:
    """GPT-2's byte-to-unicode table inverted: the symbol a byte-level vocabulary writes for each byte -> the byte.
    Printable bytes stand for themselves; the others (control characters, space, ...) are shifted to 256 + n."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


def tiktoken_ranks(spec: dict[str, Any]) -> dict[bytes, int] | str:
    """The vocabulary as tiktoken's mergeable ranks (token bytes -> id), or why it cannot be one."""
    symbols = _byte_of_symbol()
    added = {t["id"] for t in spec["added_tokens"]}
    ranks: dict[bytes, int] = {}
    for token, token_id in spec["model"]["vocab"].items():
        if token_id in added:
            continue  # cut out of the text before the BPE sees it
        if not all(c in symbols for c in token):
            return f"vocabulary token {token!r} is not byte-level"
        ranks[bytes(symbols[c] for c in token)] = token_id
    if len(set(ranks.values())) != len(ranks):  # (distinct byte-level strings are distinct bytes)
        return "two vocabulary tokens with one id"
    if any(bytes([b]) not in ranks for b in range(256)):
        return "a byte missing from the vocabulary"
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in spec["model"]["merges"]]
    return _check_merges(merges, ranks, symbols) or ranks


def _check_merges(merges: list[list[str]], ranks: dict[bytes, int], symbols: dict[str, int]) -> str | None:
    """Why tiktoken's merging by rank would differ from tokenizers' merges list, or None.

    Each merge must make a new token, with ids growing along the list, and every token of two or more bytes must
    come from one. Then tiktoken, merging by lowest id, could still join an adjacent pair (x, y) into a token t
    made by another merge (l, r). By induction over t's merges, that happens exactly when tiktoken's own merging
    of t's bytes, stopped before id(t), ends elsewhere than at [l, r]; checking every token rules it out."""
    made: dict[bytes, tuple[bytes, bytes]] = {}
    last = -1
    for left, right in merges:
        if not all(c in symbols for c in left + right):
            return f"merge {left!r} {right!r} is not byte-level"
        pair = (bytes(symbols[c] for c in left), bytes(symbols[c] for c in right))
        token = pair[0] + pair[1]
        if token not in ranks or token in made or ranks[token] <= last:
            return "merges out of id order, or two merges making one token"
        made[token], last = pair, ranks[token]
    if len(made) != sum(len(t) > 1 for t in ranks):
        return "a vocabulary token that no merge makes"
    for token, pair in made.items():
        if _merge_reachable(token, ranks) != pair:
            return f"token {token!r} reachable through another pair than its merge"
    return None


def _merge_reachable(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, ...]:
    """tiktoken's merging of `token`'s bytes (the adjacent pair whose concatenation has the lowest rank, the
    leftmost of equals), stopped before the token's own rank: the parts it ends at."""
    parts = [bytes([b]) for b in token]
    limit = ranks[token]
    while len(parts) > 1:
        found = [(ranks.get(parts[i] + parts[i + 1], limit), i) for i in range(len(parts) - 1)]
        rank, i = min(found)
        if rank >= limit:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return tuple(parts)
