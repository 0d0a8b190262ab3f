"""Stopping a training run on Ctrl-C (SIGINT) or SIGTERM (what timeout, docker, Kubernetes and SLURM send):
save a checkpoint at the end of the current step, then exit 130 or 143."""

import contextlib
import signal
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from gptlab.runtime import Runtime


class StopRequest:
    """Set by a signal's handler; the loop asks `agreed(...)` once per step whether this step is the last."""

    def __init__(self, rt: Runtime) -> None:
        self.rt, self.requested, self.signal = rt, False, signal.SIGINT

    @contextlib.contextmanager
    def on_signals(self) -> Iterator[None]:
        """In a single process a second signal stops at once; under torchrun it is ignored, since torchrun
        forwards each signal it gets itself (and kills the ranks 30 s after the first)."""
        previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            if self.rt.distributed:
                return
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.requested, self.signal = True, signum
        if self.rt.is_main:
            again = "" if self.rt.distributed else " (again to stop at once)"
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step{again}",
                  file=sys.stderr)

    def agreed(self, log_step: bool) -> bool:
        """Whether this step is the last one. Under torchrun the signal reaches the ranks at different moments,
        so they agree at each log step (where the loss is synced anyway): all stop if one was asked."""
        if not self.rt.distributed:
            return self.requested
        if not log_step:
            return False
        flag = torch.tensor([int(self.requested)], device=self.rt.device if self.rt.device.type == "cuda" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def exit(self, step: int, checkpoint: str | None) -> None:
        """After the step's checkpoint is saved (None: it was not, its loss being non-finite): say so and exit as
        the signal asks."""
        if self.rt.is_main:
            saved = f"checkpoint {checkpoint} saved (continue with --resume)" if checkpoint else "nothing saved"
            print(f"stopped at step {step}; {saved}", file=sys.stderr)
        if self.signal == signal.SIGINT:
            raise KeyboardInterrupt  # exit status 130, as for any Ctrl-C
        raise SystemExit(128 + self.signal)  # 143 for SIGTERM: what schedulers expect


def exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM before or after the training loop: unwind like Ctrl-C (the run lock is released), exit 143."""
    raise SystemExit(128 + signum)
