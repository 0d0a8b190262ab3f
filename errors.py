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


def run_cli(main: Callable[[], None]) -> None:
    """Run a CLI entry point: UsageError -> 'error: ...' on stderr and exit 2; Ctrl-C -> exit 130."""
    try:
        main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
