"""How fast a run trains, and --time_budget: the number of steps that fits a wall-clock budget.

The first steps (allocations, caches warming up) are slower than the rest, so the step time is measured over
TIMED_STEPS steps after UNTIMED_STEPS; max_iters is planned then, and planned again BUDGET_CHECKS - 1 times, at
quarters of the steps left (a machine's speed drifts by 10-20% over minutes). After the last plan the run is
an ordinary one of that length: the config saved in checkpoints holds it, so resume stays exact.
"""

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

UNTIMED_STEPS, TIMED_STEPS, BUDGET_CHECKS = 3, 20, 4


class Throughput:
    """Tokens per second of training steps alone, and the mean seconds per step since start_timing: evaluations
    and checkpoint writes (inside `paused()`) are left out of both."""

    def __init__(self) -> None:
        self.tokens, self.since = 0, time.perf_counter()
        self.timing_from, self.timing_step, self.excluded = self.since, 0, 0.0

    def start_timing(self, step: int) -> None:
        self.timing_from, self.timing_step, self.excluded = time.perf_counter(), step, 0.0

    def step_seconds(self, step: int) -> float:
        return (time.perf_counter() - self.timing_from - self.excluded) / max(1, step - self.timing_step)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        since = time.perf_counter()
        yield
        self.excluded += time.perf_counter() - since
        self.restart()

    def restart(self) -> None:
        self.tokens, self.since = 0, time.perf_counter()

    def rate(self) -> float:
        """Tokens per second since the last restart (each log restarts it)."""
        return self.tokens / max(time.perf_counter() - self.since, 1e-9)


@dataclass
class TimeBudget:
    """--time_budget SECONDS, counted from the command's start (resumed runs' time included). The loop asks it
    one question after each step, `check(step, max_iters)`: the max_iters to train to from here."""

    seconds: float
    eval_interval: int
    meter: Throughput
    spent: Callable[[], float]  # seconds spent so far
    evaluation_seconds: Callable[[], float]  # seconds of one evaluation (train and val batches)
    agree: Callable[[int], int]  # rank 0's value on every rank
    say: Callable[[str], None]
    log: Callable[[dict[str, float | None]], None]
    cap: int | None = None  # a --max_iters typed with the budget: the plans stop there
    checks: int = 0
    next_check: int = 0
    done: bool = False  # planned for the last time: from here on an ordinary run

    def start(self, step: int) -> None:
        self.next_check = step + UNTIMED_STEPS + TIMED_STEPS

    def check(self, step: int, max_iters: int) -> int:
        if self.done:
            return max_iters
        if step == self.next_check - TIMED_STEPS and not self.checks:
            self.meter.start_timing(step)
        return self.plan(step) if step == self.next_check else max_iters

    def plan(self, step: int) -> int:
        """The largest max_iters whose steps and evaluations end within the budget, at the measured speed."""
        step_seconds, eval_seconds = self.meter.step_seconds(step), self.evaluation_seconds()
        left = self.seconds - self.spent()

        def cost(n: int) -> float:  # seconds from now until step n and its final evaluation are done
            evaluations = n // self.eval_interval - step // self.eval_interval + (n % self.eval_interval != 0)
            return (n - step) * step_seconds + evaluations * eval_seconds

        n = step + max(0, int(left / step_seconds))
        while n > step and cost(n) > left:
            n -= max(1, (n - step) // 50)
        n = self.agree(max(min(n, self.cap or n), step))
        if cost(step) > left:  # even stopping now, the final evaluation ends past the budget: say so
            self.say(f"time budget {self.seconds:g}s cannot be met: {self.spent():.1f}s are spent (tokenizer, data, "
                     f"{step} steps) and the final evaluation takes {eval_seconds:.1f}s, so the run stops at step "
                     f"{n}; --time_budget {self.spent() + eval_seconds + 100 * step_seconds:.0f} would train 100 "
                     f"steps more ({step_seconds * 1e3:.1f} ms per step)")
        self.checks += 1
        self.done = self.checks == BUDGET_CHECKS or n - step < 4 * TIMED_STEPS
        self.next_check = step + (n - step) // 4
        self.say(f"time budget {self.seconds:g}s: {step_seconds * 1e3:.1f} ms/step, {eval_seconds:.2f}s per "
                 f"evaluation, {left:.1f}s left -> max_iters {n}")
        self.log({"planned_max_iters": n, "time_budget": self.seconds})
        return n
