"""The blimp_local task's data: every BLiMP paradigm file (*.jsonl) in the folder named by --metadata's
blimp_dir (or the BLIMP_DIR environment variable), in file order, as one split. Standalone (lm-eval imports
it by path), so it reads the files itself; evaluate.py's reader is gptlab/blimp.py."""

import json
import os
from pathlib import Path
from typing import Any

import datasets

SUMMARY_FILE = "models_summary.jsonl"  # the paper's scores, beside the paradigms in some copies
KEYS = ("sentence_good", "sentence_bad", "field", "UID", "pairID")


def load(blimp_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    folder = Path(blimp_dir or os.environ.get("BLIMP_DIR", ""))
    files = sorted(p for p in folder.glob("*.jsonl") if p.name != SUMMARY_FILE) if folder.is_dir() else []
    if not files:
        raise ValueError(f"no BLiMP paradigm files (*.jsonl) in {str(folder)!r}: pass --metadata "
                         f"'{{\"blimp_dir\": \"DIR\"}}' or set BLIMP_DIR")
    rows = [{k: str(record.get(k, "")) for k in KEYS}
            for path in files for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
            for record in [json.loads(line)]]
    return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})
