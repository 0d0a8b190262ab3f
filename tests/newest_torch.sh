#!/usr/bin/env bash
# The distributed tests on the newest torch that requirements.txt allows, installed the way the README's first
# command installs it (`pip install -r requirements.txt`: on Linux the CUDA build, several GB), in an environment
# of its own (.venv-newest, reused and brought up to date when present), so that the main suite keeps its fast
# CPU build. A newcomer's machine gets this torch; a race at the end of FSDP runs showed on it and not on 2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-newest
[ -x "$venv/bin/python" ] || python -m venv "$venv"
# -U: a reused environment moves to a newer torch once one is out, as a fresh install would.
"$venv/bin/python" -m pip install -q -U -r requirements.txt "$(grep '^pytest>' requirements-dev.txt)"
"$venv/bin/python" -c "import torch; print(f'distributed tests on the newest allowed torch: {torch.__version__}')"
WANDB_MODE=disabled "$venv/bin/python" -m pytest -q tests/test_distributed.py
