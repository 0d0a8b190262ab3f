"""Progress of the long phases before training (the tokenizer's corpus pass, the token cache), in bytes: a tqdm
bar on a terminal; in a log file (SLURM, nohup), where a bar would be noise, a plain line at most every
LOG_EVERY_S seconds, so that a phase of minutes is never silent."""

import sys
import time
from typing import Any

from tqdm import tqdm

LOG_EVERY_S = 30.0


class LogLines:
    """A tqdm stand-in for log files: update(n) counts bytes; a line (done, MB/s, ETA) every LOG_EVERY_S."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.done = total, desc, 0
        self.start = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= LOG_EVERY_S:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("inf")
            print(f"{self.desc}: {self.done / 1e6:,.0f} of {self.total / 1e6:,.0f} MB "
                  f"({self.done / max(self.total, 1):.0%}), {rate / 1e6:.1f} MB/s, about {eta:.0f} s left",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        pass

    def __enter__(self) -> "LogLines":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def byte_progress(total: int, desc: str, show: bool = True) -> Any:
    """A context manager with update(bytes): a bar on a terminal, log lines elsewhere, nothing when not show."""
    if show and not sys.stderr.isatty():
        return LogLines(total, desc)
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False, disable=not show)
