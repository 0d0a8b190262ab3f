"""The corpus as text: the one reader that the tokenizer's training and the token cache both use, with its checks.

A corpus is a list of files read one after another, each holding documents:
    .txt                one document (any file named on the command line that is not one of the kinds below)
    .jsonl / .json      JSON lines: each record's text field (--text_field, default "text") is a document
    .parquet            each row's text column is a document (read a batch of rows at a time, never whole)
    .gz / .zst          any of the text kinds compressed (corpus.txt.gz, dump.jsonl.zst; a bare x.gz is text)
A folder stands for the files of these kinds inside it (sorted, subfolders included; other files are ignored).

Each document is read as lines, a line longer than CHUNK_BYTES in pieces cut between UTF-8 characters, so that
memory stays bounded whatever the corpus holds; the same document gives the same lines in every kind, and so the
same token files. The token cache and the tokenizer's sample take a text file's lines in Blocks (thousands of
lines per object, for speed): the same lines, checked the same way. Both uses refuse the same corpora, each with
a one-line UsageError: a path that is not a regular file, a file holding NUL bytes or that is not UTF-8 text, a
bad record (named by file and line, or row), a training text that is empty or only whitespace, and a corpus that
names a file twice.
"""

import functools
import gzip
import hashlib
import importlib
import io
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import IO, Any, NamedTuple

import numpy as np

from gptlab.errors import UsageError

CHUNK_BYTES = 1 << 20  # the longest piece of a line the reader holds (and the token cache's piece size)
BLOCK_BYTES = 8 * CHUNK_BYTES  # what a text file is read in when its lines are wanted as Blocks
TEXT_FIELD = "text"  # the default --text_field
PARQUET_ROWS = 1024  # rows read from a parquet file at a time
TEXT_KINDS = {".txt": "text", ".jsonl": "jsonl", ".json": "jsonl"}
COMPRESSIONS = (".gz", ".zst")


class Line(NamedTuple):
    """A line of a document, or a piece of at most CHUNK_BYTES of a longer one."""

    text: str
    size: int  # its length in UTF-8 bytes (for a text file: in the file)


class Block(NamedTuple):
    """Many whole lines of a text file at once, none longer than CHUNK_BYTES: the lines _lines would give, one
    object for thousands of them (readers that take Blocks handle them with bytes and numpy, not line by line)."""

    data: bytes  # UTF-8 text, checked as _lines checks it
    ends: np.ndarray  # where each line ends in data (the last: len(data))

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def text(self) -> str:
        return self.data.decode("utf-8")

    def lines(self, i: int, j: int) -> "Block":
        """Its lines i to j - 1."""
        first = int(self.ends[i - 1]) if i else 0
        return Block(self.data[first:int(self.ends[j - 1])], self.ends[i:j] - first)

    def split(self, at: int) -> tuple["Block", "Block"]:
        """The lines that end at or before byte `at` (a line end), and the rest."""
        k = int(np.searchsorted(self.ends, at, side="right"))
        return Block(self.data[:at], self.ends[:k]), Block(self.data[at:], self.ends[k:] - at)


def file_kind(path: Path) -> tuple[str, str | None]:
    """(kind, compression) from the file's name: kind is text, jsonl or parquet; compression .gz, .zst or None."""
    name, compression = path.name.lower(), None
    for suffix in COMPRESSIONS:
        if name.endswith(suffix):
            name, compression = name.removesuffix(suffix), suffix
    if name.endswith(".parquet"):
        if compression:
            raise UsageError(f"{path}: a parquet file is compressed inside; give it uncompressed")
        return "parquet", None
    return TEXT_KINDS.get(Path(name).suffix, "text"), compression


def _in_folder(path: Path) -> bool:
    name = path.name.lower()
    for suffix in COMPRESSIONS:
        name = name.removesuffix(suffix)
    return Path(name).suffix in TEXT_KINDS or (name == path.name.lower() and name.endswith(".parquet"))


def regular_file(path: Path) -> Path:
    """`path`, if it is a regular file: a FIFO or a device would be read forever, or as nothing."""
    if path.is_file():
        return path
    if path.exists():
        raise UsageError(f"corpus {path} is not a regular file: give a text file or a folder of .txt files")
    raise UsageError(f"corpus not found: {path}")


def corpus_files(paths: list[str | Path]) -> list[Path]:
    """The corpus arguments as a list of files: each path a file, or a folder of the corpus kinds (sorted).
    A file named twice (directly, through a folder or a link, or as a copy) is refused: its validation text
    would be the training text of its other copy."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and _in_folder(q))
            if not found:
                raise UsageError(f"no .txt files in folder {p} (nor .jsonl, .json, .parquet, .gz or .zst)")
            files.extend(found)
        else:
            files.append(regular_file(p))
    refuse_duplicates(files)
    return files


def refuse_duplicates(files: list[Path]) -> None:
    """One file named twice, by its resolved path, then by content (hashed only where sizes are equal; empty
    files hold no text and are allowed)."""
    by_path: dict[Path, Path] = {}
    for path in files:
        first = by_path.setdefault(path.resolve(), path)
        if first is not path:
            same = "is named twice" if first == path else f"and {path} are the same file"
            raise UsageError(f"the corpus names a file twice: {first} {same}; name it once")
    by_size: dict[int, list[Path]] = {}
    for path in files:
        by_size.setdefault(path.stat().st_size, []).append(path)
    for size, group in by_size.items():
        by_hash: dict[str, Path] = {}
        for path in group if size and len(group) > 1 else []:
            first = by_hash.setdefault(file_hash(path), path)
            if first is not path:
                raise UsageError(f"the corpus holds the same text twice: {first} and {path} have the same "
                                 f"content; keep one of them")


def file_hash(path: Path) -> str:
    """The file's blake2b (128 bits), computed once per process for a file of a given size and time."""
    stat = path.stat()
    return _file_hash(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _file_hash(path: Path, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def text_sizes(files: list[Path], text_field: str = TEXT_FIELD) -> list[int]:
    """Each file's text in UTF-8 bytes: a plain text file's size, else what reading it gives (which checks
    every record, so a bad one is refused before any training)."""
    sizes = []
    for path in files:
        stat = regular_file(path).stat()
        plain = file_kind(path) == ("text", None)
        sizes.append(stat.st_size if plain else _text_size(path, text_field, stat.st_size, stat.st_mtime_ns))
    return sizes


@functools.lru_cache(maxsize=4096)
def _text_size(path: Path, text_field: str, size: int, mtime_ns: int) -> int:
    return sum(line.size for line in file_lines(path, text_field) if line is not None)


class _Hashing(io.RawIOBase):
    """A file read through a hash: what was read, in the order it was read."""

    def __init__(self, f: IO[bytes], h: Any) -> None:
        self.f, self.h = f, h

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.f.readinto(buffer)
        if n:
            self.h.update(memoryview(buffer)[:n])
        return n


def file_lines(path: Path, text_field: str = TEXT_FIELD, digest: Any = None,
               blocks: bool = False) -> Iterator[Line | Block | None]:
    """The file's documents as lines, and None after each document. digest: a hashlib object that sees every
    byte of the file as it is read (read to its end, even where the caller stops early: close the generator).
    blocks: a text file's lines in Blocks (the same lines, many at a time)."""
    kind, compression = file_kind(path)
    rest = digest if kind != "parquet" else None  # a parquet file is hashed whole before it is read
    with open(path, "rb", buffering=0) as raw:
        try:
            yield from _documents(raw, path, text_field, digest, blocks)
        except GeneratorExit:
            _hash_rest(raw, rest)
            raise
        except _read_errors(compression, path) as e:
            raise UsageError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
        _hash_rest(raw, rest)


def _hash_rest(raw: IO[bytes], digest: Any) -> None:
    while digest is not None and (block := raw.read(CHUNK_BYTES)):
        digest.update(block)


def _documents(raw: IO[bytes], path: Path, text_field: str, digest: Any, blocks: bool) -> Iterator[Line | Block | None]:
    kind, compression = file_kind(path)
    if kind == "parquet":
        if digest is not None:  # pyarrow reads in its own order: hash the file through the same handle first
            _hash_rest(raw, digest)
            raw.seek(0)
        for row, text in _parquet_texts(raw, path, text_field):
            yield from _text_lines(text, f"{path} row {row}")
            yield None
        return
    hashed = _Hashing(raw, digest) if digest is not None else raw
    stream = _decompressed(io.BufferedReader(hashed, CHUNK_BYTES), path, compression)
    if kind == "text":
        yield from _blocks(stream, str(path)) if blocks else _lines(stream, str(path))
        yield None
        return
    for number, text in _jsonl_texts(stream, path, text_field):
        yield from _text_lines(text, f"{path} line {number}")
        yield None


def _read_errors(compression: str | None, path: Path) -> tuple[type[BaseException], ...]:
    """What reading a damaged (or truncated) file raises, besides our own UsageError."""
    codec = (optional_module("zstandard", path).ZstdError,) if compression == ".zst" else ()
    return (OSError, EOFError, zlib.error, *codec)


def _decompressed(stream: IO[bytes], path: Path, compression: str | None) -> IO[bytes]:
    if compression == ".gz":
        return gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[return-value]
    if compression == ".zst":
        zstandard = optional_module("zstandard", path)
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True),
                                 CHUNK_BYTES)
    return stream


def optional_module(name: str, path: Path) -> ModuleType:
    """A package only some corpora need (pyarrow, zstandard), imported when such a file is read."""
    try:
        return importlib.import_module(name)
    except ImportError:
        package = name.split(".")[0]
        raise UsageError(f"reading {path} needs the {package} package: pip install {package}") from None


def _lines(stream: IO[bytes], where: str) -> Iterator[Line]:
    carry = b""
    while piece := carry + stream.readline(CHUNK_BYTES - len(carry)):
        carry = b""
        if not piece.endswith(b"\n"):  # part of a long line (or the file's end): keep characters whole
            cut = _whole_characters(piece)
            piece, carry = piece[:cut], piece[cut:]
        yield Line(_checked_text(piece, where), len(piece))


def _checked_text(data: bytes, where: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{where} is not UTF-8 text (a binary file?)") from None
    # Binary data can decode as UTF-8 (a token cache of small ids does), a sparse file is all NUL bytes.
    if "\0" in text:
        raise UsageError(f"{where} holds NUL bytes: a binary file, not text")
    return text


def _blocks(stream: IO[bytes], where: str) -> Iterator[Line | Block]:
    """The lines _lines gives, as a Block of the whole lines of each read of BLOCK_BYTES; from a line longer than
    CHUNK_BYTES on (rare), the rest of the stream through _lines itself, which cuts such lines."""
    carry = b""
    while chunk := stream.read(BLOCK_BYTES):
        data = carry + chunk
        whole = data.rfind(b"\n") + 1  # the bytes of the whole lines
        ends = np.flatnonzero(np.frombuffer(data, np.uint8, whole) == ord("\n")) + 1
        long = np.flatnonzero(np.diff(ends, prepend=0) > CHUNK_BYTES)
        if long.size or len(data) - whole >= CHUNK_BYTES:  # a long line starts at `stop`
            stop = (int(ends[long[0] - 1]) if long[0] else 0) if long.size else whole
            if stop:
                _check_block(data[:stop], where)
                yield Block(data[:stop], ends[ends <= stop])
            yield from _lines(_Prefixed(data[stop:], stream), where)
            return
        if whole:
            _check_block(data[:whole], where)
            yield Block(data[:whole], ends)
        carry = data[whole:]
    if carry:  # a last line without its line end
        yield from _lines(io.BytesIO(carry), where)


def _check_block(data: bytes, where: str) -> None:
    try:
        _checked_text(data, where)
    except UsageError:
        for _ in _lines(io.BytesIO(data), where):  # the error of its first bad line, as _lines would say it
            pass
        raise


class _Prefixed:
    """`head`, then the rest of `stream`, for readline."""

    def __init__(self, head: bytes, stream: IO[bytes]) -> None:
        self.head, self.stream = io.BytesIO(head), stream

    def readline(self, limit: int) -> bytes:
        line = self.head.readline(limit)
        if len(line) < limit and not line.endswith(b"\n"):
            line += self.stream.readline(limit - len(line))
        return line


def _text_lines(text: str, where: str) -> Iterator[Line]:
    """A record's text cut as a text file holding it would be (the same lines, so the same token files)."""
    if not text:
        return
    if "\0" in text:
        raise UsageError(f"{where}: the text holds a NUL character")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{where}: the text holds a lone surrogate (\\ud800-\\udfff), not a character") from None
    if len(data) <= CHUNK_BYTES and "\n" not in text[:-1]:  # one line: the common case, without a second pass
        yield Line(text, len(data))
    else:
        yield from _lines(io.BytesIO(data), where)


def _jsonl_texts(stream: IO[bytes], path: Path, text_field: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each record; blank lines are skipped."""
    for number, raw in enumerate(stream, 1):
        if raw.strip():
            yield number, _record_text(raw, f"{path} line {number}", text_field)


def _record_text(raw: bytes, where: str, text_field: str) -> str:
    try:
        record = json.loads(raw)
    except UnicodeDecodeError:
        raise UsageError(f"{where}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        problem = e.msg.removesuffix(" at")  # "Invalid control character at": the column follows
        raise UsageError(f"{where}: invalid JSON ({problem}, column {e.colno}): give one JSON object per "
                         f"line") from None
    if not isinstance(record, dict):
        raise UsageError(f"{where}: a JSON {_json_type(record)}, not an object with a {text_field!r} field")
    if text_field not in record:
        fields = ", ".join(map(repr, list(record)[:10])) or "none"
        raise UsageError(f"{where}: no field {text_field!r} (its fields: {fields}): name the text's field with "
                         f"--text_field")
    text = record[text_field]
    if not isinstance(text, str):
        raise UsageError(f"{where}: field {text_field!r} is a JSON {_json_type(text)}, not a string")
    return text


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _parquet_texts(raw: IO[bytes], path: Path, text_field: str) -> Iterator[tuple[int, str]]:
    """(row number, text) of each row."""
    pa = optional_module("pyarrow", path)
    pq = optional_module("pyarrow.parquet", path)
    try:
        parquet = pq.ParquetFile(raw)
    except (pa.ArrowException, OSError) as e:
        raise UsageError(f"{path} is not a parquet file: {e}") from None
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise UsageError(f"{path}: no column {text_field!r} (its columns: {', '.join(map(repr, schema.names))}): "
                         f"name the text's column with --text_field")
    column_type = schema.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise UsageError(f"{path}: column {text_field!r} holds {column_type}, not strings")
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_ROWS, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                raise UsageError(f"{path} row {row}: {text_field!r} is null, not a string")
            yield row, text


def read_corpus(files: list[Path], end: int | None = None, past_end: bool = False, text_field: str = TEXT_FIELD,
                digests: dict[Path, str] | None = None, blocks: bool = False) -> Iterator[Line | Block | None]:
    """The corpus's lines, document after document, and None after each document.

    end: where the training text ends (data.val_start: a line start), in bytes of the documents read one after
    another; None: at the corpus's end. The training text must hold more than whitespace, which is checked
    once it has all been read. Reading stops at `end` unless past_end (the token cache reads the validation
    text too). digests: filled with the blake2b of each file read, hashed as it was read (to its end). blocks:
    text files' lines in Blocks (file_lines), one cut at `end` if it spans it.
    """
    for path in files:  # all of them first, before a FIFO among them blocks the reading
        regular_file(path)
    offset, training = 0, _TrainingText(files, end)
    for path in files:
        digest = hashlib.blake2b(digest_size=16) if digests is not None else None
        lines = file_lines(path, text_field, digest, blocks)
        for item in lines:
            if item is None:
                yield None
                continue
            for line in _cut_at(item, None if end is None else end - offset):
                if end is None or offset < end:
                    training.read(line)
                else:
                    training.check()
                    if not past_end:
                        lines.close()  # reads the rest of the file into its hash
                        if digests is not None:
                            digests[path] = digest.hexdigest()
                        return
                yield line
                offset += line.size
        if digests is not None:
            digests[path] = digest.hexdigest()
    training.check()


def _cut_at(item: Line | Block, at: int | None) -> tuple[Line | Block, ...]:
    """A Block that spans byte `at` (a line start) as its two parts; anything else as it is."""
    if isinstance(item, Block) and at is not None and 0 < at < item.size:
        return item.split(at)
    return (item,)


def _whole_characters(piece: bytes) -> int:
    """The length of `piece` without a UTF-8 character its end cuts (its rest comes with the next piece)."""
    for back in range(1, min(4, len(piece)) + 1):
        byte = piece[-back]
        if byte & 0xC0 != 0x80:  # the first byte of a character: how many bytes it announces
            size = 1 if byte < 0xC0 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(piece) - back if size > back and back < len(piece) else len(piece)
    return len(piece)


class _TrainingText:
    """Whether the training text read so far holds only whitespace (refused once it has all been read)."""

    def __init__(self, files: list[Path], end: int | None) -> None:
        self.files, self.end = files, end
        self.blank, self.chars = True, 0  # chars: only counted (and reported) while blank

    def read(self, line: Line | Block) -> None:
        if self.blank:
            text = line.text
            self.blank, self.chars = text.isspace(), self.chars + len(text)

    def check(self) -> None:
        if self.blank:
            held = f"holds only whitespace ({self.chars:,} characters)" if self.chars else "holds nothing"
            before = "" if self.end is None else " before its validation text (the last --val_fraction of it)"
            raise UsageError(f"the corpus is empty: {', '.join(map(str, self.files))} {held}{before}")
