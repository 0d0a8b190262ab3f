"""The corpus as text: the one reader that the tokenizer's training and the token cache both use, with its checks.

A corpus is a list of files (documents) read one after another. Each is read as bytes, line by line, a line
longer than CHUNK_BYTES in pieces cut between UTF-8 characters, so that memory stays bounded whatever the file
holds. Both uses refuse the same corpora, each with a one-line UsageError: a path that is not a regular file, a
file holding NUL bytes or that is not UTF-8 text, a training text that is empty or only whitespace.
"""

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from gptlab.errors import UsageError

CHUNK_BYTES = 1 << 20  # the longest piece of a line the reader holds (and the token cache's piece size)


class Line(NamedTuple):
    """A line of a corpus file, or a piece of at most CHUNK_BYTES of a longer one."""

    text: str
    size: int  # its length in the file, in bytes


def regular_file(path: Path) -> Path:
    """`path`, if it is a regular file: a FIFO or a device would be read forever, or as nothing."""
    if path.is_file():
        return path
    if path.exists():
        raise UsageError(f"corpus {path} is not a regular file: give a text file or a folder of .txt files")
    raise UsageError(f"corpus not found: {path}")


def read_corpus(files: list[Path], end: int | None = None, past_end: bool = False) -> Iterator[Line | None]:
    """The corpus's lines, file after file, and None after each file (the end of a document).

    end: where the training text ends (data.val_start: a line start), in bytes of the files read one after
    another; None: at the corpus's end. The training text must hold more than whitespace, which is checked
    once it has all been read. Reading stops at `end` unless past_end (the token cache reads the validation
    text too).
    """
    for path in files:  # all of them first, before a FIFO among them blocks the reading
        regular_file(path)
    offset, blank, chars = 0, True, 0
    for path in files:
        for line in _lines(path):
            if end is None or offset < end:
                blank, chars = blank and line.text.isspace(), chars + len(line.text)
            else:
                _check_training_text(blank, chars, files, end)
                if not past_end:
                    return
            yield line
            offset += line.size
        yield None
    _check_training_text(blank, chars, files, end)


def _lines(path: Path) -> Iterator[Line]:
    carry = b""
    with open(path, "rb") as f:
        while piece := carry + f.readline(CHUNK_BYTES - len(carry)):
            carry = b""
            if not piece.endswith(b"\n"):  # part of a long line (or the file's end): keep characters whole
                cut = _whole_characters(piece)
                piece, carry = piece[:cut], piece[cut:]
            try:
                text = piece.decode("utf-8")
            except UnicodeDecodeError:
                raise UsageError(f"{path} is not UTF-8 text (a binary file?)") from None
            # Binary data can decode as UTF-8 (a token cache of small ids does), a sparse file is all NUL bytes.
            if "\0" in text:
                raise UsageError(f"{path} holds NUL bytes: a binary file, not text")
            yield Line(text, len(piece))


def _whole_characters(piece: bytes) -> int:
    """The length of `piece` without a UTF-8 character its end cuts (its rest comes with the next piece)."""
    for back in range(1, min(4, len(piece)) + 1):
        byte = piece[-back]
        if byte & 0xC0 != 0x80:  # the first byte of a character: how many bytes it announces
            size = 1 if byte < 0xC0 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(piece) - back if size > back and back < len(piece) else len(piece)
    return len(piece)


def _check_training_text(blank: bool, chars: int, files: list[Path], end: int | None) -> None:
    if blank:
        held = f"holds only whitespace ({chars:,} characters)" if chars else "holds nothing"
        before = "" if end is None else " before its validation text (the last --val_fraction of it)"
        raise UsageError(f"the corpus is empty: {', '.join(map(str, files))} {held}{before}")
