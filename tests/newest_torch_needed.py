"""Whether tests/run.sh should run the distributed tests again on the newest torch that requirements.txt allows
(tests/newest_torch.sh builds an environment of several GB for it). Yes in CI; elsewhere only when the torch in
use is older than that newest one: a newcomer who installed requirements.txt already has it.

    python tests/newest_torch_needed.py    exit 0: needed (and says what it costs), 1: not needed (and why)
"""

import os
import re
import subprocess
import sys

LIMIT = (3,)  # requirements.txt: torch>=2.6,<3


def release(version: str) -> tuple[int, ...]:
    """2.13.0+cpu -> (2, 13, 0); pre-releases (2.14.0a0, 2.14.0.dev...) count as their release."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def newest_allowed(available: list[str]) -> str | None:
    final = [v for v in available if re.fullmatch(r"[\d.]+", v) and release(v) < LIMIT]
    return max(final, key=release) if final else None


def decide(installed: str, available: list[str], ci: bool) -> tuple[bool, str]:
    newest = newest_allowed(available)
    cost = "a second environment (.venv-newest) of several GB and a few minutes the first time"
    if ci:
        return True, f"CI: the distributed tests again on the newest allowed torch ({newest or 'unknown'}): {cost}"
    if newest is None:
        return False, "the newest allowed torch could not be looked up (offline?): skipping its distributed tests"
    if release(installed) >= release(newest):
        return False, f"torch {installed} in use is the newest requirements.txt allows: nothing more to test"
    return True, (f"torch {installed} in use is older than {newest}, the newest requirements.txt allows: the "
                  f"distributed tests again on {newest}, in {cost} (SKIP_NEWEST_TORCH=1 leaves this out)")


def available_versions() -> list[str]:
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "torch"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    match = re.search(r"Available versions: (.*)", out)
    return [v.strip() for v in match.group(1).split(",")] if match else []


def main() -> None:
    import torch

    needed, why = decide(torch.__version__, available_versions(), bool(os.environ.get("CI")))
    print(why)
    sys.exit(0 if needed else 1)


if __name__ == "__main__":
    main()
