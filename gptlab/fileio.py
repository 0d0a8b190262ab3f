"""Writing files safely: atomic writes, output-path checks before any work, and the run lock.

    atomic_write(path, write, what)   a temporary file beside `path`, fsync'ed, then renamed over it: a crash,
                                      a full disk or a kill at any moment leaves the old file or the new one
    atomic_files(paths, what)         the same for several files written side by side (the token cache's two)
    atomic_write_folder(out, fill)    the same for a whole folder (an export)
    check_output(path, flag, ...)     before any work: can this output be written, and is it none of the inputs?
    check_output_dir(path, flag)      the same for an output folder (created when missing)
    RunLock(path)                     one run at a time on a checkpoint (an OS lock: a killed run never leaves it stuck)

Every file the project writes for the user goes through the first three, except append-only logs (the metrics
JSONL, a run's log, gpu_check's table), which are appended line by line and read torn-line-safe, and scratch
files in temporary folders (benchmarks). Failures a user can act on (disk full, read-only file system, no
permission, a folder in the way) become one UsageError naming the file and the reason.
"""

import contextlib
import errno
import fcntl
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from gptlab.errors import UsageError


def _tmp_name(path: Path, pid: int) -> Path:
    return path.with_name(f"{path.name}.tmp{pid}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, but belongs to someone else
        return True
    return True


def remove_stale_temps(path: Path) -> None:
    """Delete `<name>.tmp<pid>` files left beside `path` by processes that no longer run (killed mid-write)."""
    pattern = re.compile(re.escape(path.name) + r"\.tmp(\d+)")
    try:
        candidates = list(path.parent.iterdir())
    except OSError:
        return  # the write itself will report what is wrong with the folder
    for p in candidates:
        m = pattern.fullmatch(p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            try:
                p.unlink()
            except OSError:
                pass


# How torch's zip writer reports a failed write (a full disk, most often): a RuntimeError, not an OSError.
TORCH_WRITE_FAILURES = ("inline_container", "PytorchStreamWriter", "file write failed")


def _torch_write_failure(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and any(marker in str(e) for marker in TORCH_WRITE_FAILURES)


def _reason(e: BaseException) -> str:
    """The part of an error worth showing: the OS's words, or torch's write failure in brief."""
    if _torch_write_failure(e):
        return "the write failed (is the disk full?)"
    if isinstance(e, OSError):
        return e.strerror or str(e) or type(e).__name__
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


@contextlib.contextmanager
def atomic_files(paths: Sequence[str | Path], what: str) -> Iterator[list[BinaryIO]]:
    """Open a temporary file beside each of `paths` for the block to write; when it ends without an error,
    flush them to disk and rename each over its path. Each path then holds its old file or its new one, never a
    torn one (the set is not renamed as one: a reader that needs all of them checks a file written last, as the
    token cache's meta.json). Temporary files are named by the process id, so two processes writing the same
    paths at once do not meet, and ones left by killed processes are removed.

    On any failure the temporary files are removed; a failing removal (a read-only file system) never hides the
    original error. Write failures become one UsageError: "cannot write <what> <path>: <reason>" (for several
    paths, "in <their folder>"). `what` names the file for the user: "checkpoint", "tokenizer", "predictions".
    """
    paths = [Path(p) for p in paths]
    for path in paths:
        remove_stale_temps(path)
    tmps = [_tmp_name(path, os.getpid()) for path in paths]
    try:
        with contextlib.ExitStack() as stack:
            files = [stack.enter_context(open(tmp, "wb")) for tmp in tmps]
            yield files
            for f in files:
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in zip(tmps, paths, strict=True):
            os.replace(tmp, path)
    except BaseException as e:
        for tmp in tmps:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass  # e.g. EROFS: the temp was never created; the error that matters is `e`
        if isinstance(e, OSError) or _torch_write_failure(e):
            where = str(paths[0]) if len(paths) == 1 else f"in {paths[0].parent}"
            if isinstance(e, IsADirectoryError) or any(path.is_dir() for path in paths):
                raise UsageError(f"cannot write {what} {where}: it is a folder") from None
            raise UsageError(f"cannot write {what} {where}: {_reason(e)}") from None
        raise


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], what: str) -> None:
    """Call write(f) on a temporary file beside `path`, flush it to disk, then rename it over `path`: a crash,
    a full disk or a kill at any moment leaves the old file or the new one (see atomic_files)."""
    with atomic_files([path], what) as (f,):
        write(f)


def atomic_write_text(path: str | Path, text: str, what: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")), what)


def atomic_write_folder(out: str | Path, fill: Callable[[Path], None]) -> None:
    """Run fill(folder) on a new temporary folder beside `out`, then put it in out's place: on any failure,
    nothing is left behind and an old `out` is kept. The files inside are written plainly: the folder is what
    appears whole. OSErrors pass through for the caller to name."""
    out = Path(os.path.abspath(out))  # "." or "a/..": the folder they name, which has a name to put beside
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _make_folder(folder: Path, flag: str, path: str | Path) -> None:
    """Create `folder` (and its parents) as nanoGPT does with its out_dir; a clear error where it cannot be."""
    for parent in (folder, *folder.parents):
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"{flag} {path}: {parent} is a file, not a folder")
        if parent.exists():
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot create folder {folder}: {_reason(e)}") from None


def check_output(path: str | Path, flag: str, inputs: Iterable[tuple[str, str | Path | None]] = (),
                 other_outputs: Iterable[tuple[str, str | Path | None]] = (), overwrite: bool | None = None) -> None:
    """Fail before any work, not after it, when `path` cannot be written or would overwrite an input.

    inputs / other_outputs: (flag, path) pairs; a None path is skipped. A missing parent folder is created.
    overwrite=False: an existing file is refused too (an earlier run's work), True lets it be replaced; None
    for outputs that are meant to be rewritten in place.
    """
    p = Path(path)
    if str(path) == "":
        raise UsageError(f"{flag} is empty: give a file name")
    if p.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name inside it")
    for kind, pairs in (("input", inputs), ("output", other_outputs)):
        for other_flag, other in pairs:
            if other is not None and str(other) != "" and _same_file(p, Path(other)):
                which = "the input" if kind == "input" else "also"
                raise UsageError(f"{flag} {path} is {which} {other_flag}: choose another file so it is not "
                                 f"overwritten")
    if overwrite is False and (p.exists() or p.is_symlink()):  # after the inputs: the more precise message
        raise UsageError(f"{flag} {path} already exists: choose another file, or replace it with --overwrite")
    folder = p.absolute().parent
    _make_folder(folder, flag, path)
    _probe(p, flag, path)


def _probe(path: Path, flag: str, shown: str | Path) -> None:
    """Create and delete the temporary file a write would use: the one test that a read-only mount, a missing
    permission (root included) or a full inode table cannot fool. `path` itself is never touched."""
    probe = _tmp_name(path, os.getpid())
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        return  # ours from an earlier check of the same path: the folder is writable
    except OSError as e:
        raise UsageError(f"{flag} {shown}: cannot write in folder {path.absolute().parent}: {_reason(e)}") from None
    try:
        probe.unlink()
    except OSError:
        pass


def check_output_dir(path: str | Path, flag: str) -> None:
    """An output folder: created when missing; an error when it is a file or cannot be written in."""
    p = Path(path)
    if str(path) == "":
        raise UsageError(f"{flag} is empty: give a folder")
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a folder")
    _make_folder(p.absolute(), flag, path)
    _probe(p / ".write_test", flag, path)


class RunLock:
    """An exclusive lock on `<path>.lock` for as long as a run uses `path` (its checkpoint).

    flock is released by the OS when the process ends however it ends (kill -9 included), so a lock is never
    left stuck; the file itself may stay behind and is harmless. The holder's pid is written in it for the
    message another run gets.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        while True:  # retry if the holder removed the file between our open and our lock (a new inode)
            fd = self._open_and_lock()
            try:
                if os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def _open_and_lock(self) -> int:
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UsageError(f"cannot create lock file {self.lock_path}: {_reason(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UsageError(f"another run is using {self.path} (lock {self.lock_path} held by pid {holder}); "
                                 f"wait for it or use another --checkpoint") from None
            raise UsageError(f"cannot lock {self.lock_path}: {_reason(e)}") from None
        return fd

    def __exit__(self, *exc: object) -> None:
        if self._fd is None:
            return
        try:
            self.lock_path.unlink(missing_ok=True)  # still ours: nobody else can hold it while we do
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
