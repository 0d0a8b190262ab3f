#!/usr/bin/env bash
# Install what the tests need, lint, and run the test suite; then, in CI or where the torch in use is older than
# the newest that requirements.txt allows, the distributed tests once more on that newest torch, in their own
# environment (tests/newest_torch.sh; several GB the first time, said before it starts: SKIP_NEWEST_TORCH=1
# leaves it out). Fails loudly on any error.
set -euo pipefail
cd "$(dirname "$0")/.."
# A CPU build of torch when none is installed (a plain `pip install torch` pulls multi-GB CUDA wheels).
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -r requirements-dev.txt
python -m ruff check .
python -c "import torch; print(f'main suite on torch {torch.__version__}')"
# WANDB_MODE=disabled: tests never talk to the network. Two processes (pytest-xdist), a test file each at a time:
# every test runs on one thread, and a file's module fixtures are built once.
WANDB_MODE=disabled python -m pytest -q -n 2 --dist loadfile "$@"
if [ "${SKIP_NEWEST_TORCH:-0}" != 1 ] && python tests/newest_torch_needed.py; then
    bash tests/newest_torch.sh
fi
