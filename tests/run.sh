#!/usr/bin/env bash
# Install what the tests need, lint, and run the test suite. Fails loudly on any error.
set -euo pipefail
cd "$(dirname "$0")/.."
# A CPU build of torch when none is installed (a plain `pip install torch` pulls multi-GB CUDA wheels).
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -r requirements-dev.txt
python -m ruff check .
# WANDB_MODE=disabled: tests never talk to the network.
WANDB_MODE=disabled python -m pytest -q "$@"
