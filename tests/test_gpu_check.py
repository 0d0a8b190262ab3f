"""gpu_check.py without a GPU: --dry_run walks every part (each in its own process, with an injected compile
failure and an injected hang) and keeps each part's row and whole log under --out; the table survives any
message; the internal flags stay internal."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpu_check
from gptlab.errors import UsageError

REPO = Path(__file__).resolve().parent.parent


def table_rows(text: str) -> list[list[str]]:
    """The cells of each data row of the markdown tables in `text` (a \\| inside a cell is not a border)."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.replace("\\|", "\0").strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("part", "---"):
            rows.append([c.replace("\0", "|") for c in cells])
    return rows


def test_the_dry_run_writes_one_row_per_part_with_its_whole_log_and_reports_the_injected_failures(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    r = subprocess.run([sys.executable, str(REPO / "gpu_check.py"), "--dry_run", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    names = [part.name for part in gpu_check.parts(gpu_check.dry_plan())]
    rows = table_rows((out / "table.md").read_text())
    assert [row[0] for row in rows] == names  # in order: train first, pytest last
    assert table_rows(r.stdout) == rows  # printed as each part ended, the same rows
    result = {row[0]: row[1] for row in rows}
    for name in ("train 4x32", "train 2x32", "train 8x32"):
        assert "tokens/s" in result[name] and result[name].endswith("EAGER: compile failed"), result[name]
        assert "attention kernel: flash" in dict((row[0], row[2]) for row in rows)[name]
    assert result["hang (injected)"] == "FAILED (no result within its 15 s limit: stopped; see hang_injected.log)"
    assert "hanging on purpose" in (out / "hang_injected.log").read_text()  # what it printed before it hung
    assert "injected compile failure" in (out / "train_4x32.log").read_text()  # the traceback
    others = [name for name in names if name != "hang (injected)"]
    assert all("FAILED" not in result[name] for name in others), result
    assert "1 process, gloo" in result["ddp"]
    pytest_log = (out / "gpu_tests.log").read_text()
    assert "test_loss_falls_on_cuda_in_bfloat16" in pytest_log  # pytest's whole output, not its last line
    assert "test_export.py" not in pytest_log  # only the files that hold GPU tests are collected


def test_a_failing_check_gives_a_failed_row_and_a_spent_budget_skips_the_part(tmp_path, capsys):
    def broken(plan, device):
        raise RuntimeError("out of\nmemory")

    plan = gpu_check.dry_plan()
    row = gpu_check.run_part_here(gpu_check.Part("train", broken, 1.0), plan)
    assert row == gpu_check.Row("train", "FAILED (RuntimeError: out of memory)")
    assert "RuntimeError: out of" in capsys.readouterr().err  # the traceback, for the part's log
    skipped = gpu_check.run_part(gpu_check.parts(plan)[0], plan, tmp_path, seconds_left=5.0)
    assert skipped.result == "skipped (time budget used up)" and not list(tmp_path.iterdir())


def test_a_bar_or_a_newline_in_a_message_stays_inside_its_cell():
    row = gpu_check.Row("ddp", "FAILED (RuntimeError: a | b)", "line one\nline | two", 3.0)
    assert table_rows(gpu_check.table_row(row)) == [["ddp", "FAILED (RuntimeError: a | b)", "line one line | two",
                                                     "3"]]


def test_a_gpu_missing_from_the_peak_table_is_told_how_to_add_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Imaginary X1")
    peak, text = gpu_check.spec_peak(torch.device("cuda", 0), torch.bfloat16)
    assert peak is None
    assert text == ("none: 'NVIDIA Imaginary X1' is not in GPU_PEAK_FLOPS in gptlab/runtime.py; add its dense "
                    "(no sparsity) bf16 and fp32 peaks from its datasheet, under that exact name")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert gpu_check.spec_peak(torch.device("cuda", 0), torch.bfloat16)[0] == 989e12


def test_the_internal_flag_is_hidden_and_refused_outside_torchrun(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--help"])
    shown = capsys.readouterr().out
    assert "--out" in shown and "--ddp_worker" not in shown
    with pytest.raises(UsageError, match="--ddp_worker is internal"):
        gpu_check.main(["--dry_run", "--ddp_worker", "result.json"])


def test_no_test_file_imports_transformers_at_the_top():
    for path in (REPO / "tests").glob("*.py"):
        top_level = [line for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith(" ")]
        assert not any(line.startswith(("import transformers", "from transformers")) for line in top_level), path


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no GPU")
def test_gpu_check_without_a_gpu_is_a_one_line_error():
    r = subprocess.run([sys.executable, str(REPO / "gpu_check.py")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: torch sees no CUDA GPU here: run `python gpu_check.py --dry_run` for the CPU rehearsal"]
