"""The one exception type for user mistakes, and the wrapper every CLI runs its main() in.

A UsageError means "the person running the command can fix this": a missing file,
a bad flag value, a checkpoint that does not match. It is printed as one line on
stderr and the process exits with status 2. Any other exception is a bug and keeps
its traceback.
"""

import argparse
import sys
from collections.abc import Callable


class UsageError(Exception):
    """A mistake in what the user asked for, with a message they can act on."""


class CliParser(argparse.ArgumentParser):
    """argparse whose mistakes (unknown flag, bad number) are a UsageError: one line, exit 2."""

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


def run_cli(main: Callable[[], None]) -> None:
    """Run a CLI entry point: UsageError -> 'error: ...' on stderr and exit 2; Ctrl-C -> exit 130.

    An OSError that reached here (disk full, read-only file system, no permission) is a problem with the
    machine, not a bug: one line naming the file too. Specific messages are raised where the file is known.
    """
    try:
        main()
    except UsageError as e:
        _say(f"error: {e}")
        sys.exit(2)
    except OSError as e:
        _say(f"error: {os_error_message(e)}")
        sys.exit(2)
    except KeyboardInterrupt:
        _say("interrupted")
        sys.exit(130)
