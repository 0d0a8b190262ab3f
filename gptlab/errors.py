"""The one exception type for user mistakes, and the wrapper every CLI runs its main() in.

A UsageError means "the person running the command can fix this": a missing file,
a bad flag value, a checkpoint that does not match. It is printed as one line on
stderr and the process exits with status 2. A Diverged run (training went bad beyond
repair) is not a mistake in what was asked: `stopped: ...` and exit status 3. Any other
exception is a bug and keeps its traceback. Under torchrun every process meets the same
mistake; rank 0 says it once.
"""

import argparse
import os
import re
import sys
import time
from collections.abc import Callable


class UsageError(Exception):
    """A mistake in what the user asked for, with a message they can act on."""


DIVERGED_EXIT = 3  # the exit status of a run stopped because its training went bad (2: a user mistake)


class Diverged(Exception):
    """A training run stopped by its health checks: it diverged (or --on_spike stop met a bad step)."""


class CliParser(argparse.ArgumentParser):
    """argparse whose mistakes (unknown flag, bad number) are a UsageError: one line, exit 2.

    A value that starts with a minus and a digit (`--lr -1e-3`, `--max_memory -1GB`) is the flag's value, which
    its own check then refuses by name; argparse alone takes only `-1` and `-1.5` so, and calls the rest a flag
    ("expected one argument"). No flag of ours starts with a digit."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"-\.?\d")

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _say(message: str) -> None:
    """Print one line on stderr, on a line of its own even when a progress bar is drawn on the current one."""
    try:
        from tqdm import tqdm
        bar_shown = any(not getattr(bar, "disable", True) for bar in list(getattr(tqdm, "_instances", ())))
    except ImportError:
        bar_shown = False
    sys.stderr.write(("\n" if bar_shown else "") + message + "\n")
    sys.stderr.flush()


def os_error_message(e: OSError) -> str:
    """What a file-system failure no specific check caught means, in one line naming the file."""
    reason = e.strerror or str(e) or type(e).__name__
    return f"cannot access {e.filename}: {reason}" if e.filename else f"file system error: {reason}"


# Under torchrun, how long a rank other than 0 waits before saying its mistake: rank 0 meets the same one and
# exits first, and torchrun then stops the others, so 8 GPUs print one line, not 8. torchrun checks its
# processes every 0.1 s; a mistake rank 0 does not share (a file missing on one node) is still said, late.
OTHER_RANKS_WAIT_S = 3.0


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))  # torchrun sets RANK; a single process is rank 0


def _exit(message: str, status: int) -> None:
    if _rank():
        time.sleep(OTHER_RANKS_WAIT_S)
        message = f"[rank {_rank()}] {message}"
    _say(message)
    sys.exit(status)


def run_cli(main: Callable[[], None]) -> None:
    """Run a CLI entry point: UsageError -> 'error: ...' on stderr and exit 2; Diverged -> 'stopped: ...' and exit
    3; Ctrl-C -> exit 130.

    An OSError that reached here (disk full, read-only file system, no permission) is a problem with the
    machine, not a bug: one line naming the file too. Specific messages are raised where the file is known.
    """
    try:
        main()
    except UsageError as e:
        _exit(f"error: {e}", 2)
    except Diverged as e:
        _exit(f"stopped: {e}", DIVERGED_EXIT)
    except OSError as e:
        _exit(f"error: {os_error_message(e)}", 2)
    except KeyboardInterrupt:  # every process got the Ctrl-C: rank 0 says so, none waits
        if not _rank():
            _say("interrupted")
        sys.exit(130)
