"""playground.ipynb runs from top to bottom on the CPU with budgets shrunk through its parameters cell (as papermill
would inject them), and each step leaves what it promises: a live loss curve, finite bits/byte, a sample, the
experiment's report and curves, an exported folder that transformers' pipeline generates from. No network."""

import ast
import json
import math
import re
import subprocess
from pathlib import Path

import nbformat
from conftest import corpus_slice
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "playground.ipynb"

TINY = """
CORPUS = {corpus!r}
TRAIN_SECONDS = None
TRAIN_STEPS = 16
EVAL_INTERVAL = 8
EVAL_ITERS = 2
COMPARE_SECONDS = None
COMPARE_STEPS = 6
COMPARE_SEEDS = 1
MODEL = {{"vocab_size": 300, "block_size": 32, "embedding_dim": 32, "num_of_layers": 1, "num_of_heads": 2,
         "batch_size": 4, "warmup_iters": 2, "sample_tokens": 16}}
MAX_NEW_TOKENS = 24
WORK = {work!r}
"""


def text_of(cell) -> str:
    """A cell's printed output (stdout/stderr streams, and plain-text results)."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif "data" in out and "text/plain" in out["data"]:
            parts.append(out["data"]["text/plain"])
    return "".join(parts)


def cell_running(nb, snippet: str):
    cells = [c for c in nb.cells if c.cell_type == "code" and snippet in c.source]
    assert len(cells) == 1, snippet
    return cells[0]


def test_the_committed_notebook_has_no_outputs_and_one_parameters_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert [c.metadata.get("tags") for c in code].count(["parameters"]) == 1
    assert 'REPO_URL = "' in code[0].source and "google.colab" in code[0].source


def test_the_notebook_runs_end_to_end_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the kernel and the commands it starts inherit it
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"
    corpus = corpus_slice(tmp_path, 60_000)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(TINY.format(corpus=str(corpus), work=str(work)),
                                                      metadata={"tags": ["injected-parameters"]}))
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()

    assert "device: cpu" in text_of(nb.cells[1])

    # the live curve: a figure shown, and the run trained the 16 steps asked, evaluating on the way
    train = cell_running(nb, '["playground.py"')
    assert any("image/png" in out.get("data", {}) for out in train.outputs)
    rows = [json.loads(line) for line in (work / "model.metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [8, 16]

    # bits/byte on the held-out text: a finite number, and below a uniform guess over the 300 tokens
    said = text_of(cell_running(nb, '"evaluate.py"'))
    found = re.search(r"val\.txt: loss (\S+) nats/token, perplexity \S+, (\S+) bits/byte", said)
    assert found, said
    loss, bpb = float(found[1]), float(found[2])
    assert math.isfinite(bpb) and 0 < bpb and 0 < loss < math.log(300)

    said = text_of(cell_running(nb, "generate_text("))
    found = re.search(r"sample \((\d+) tokens; temperature 0.8, top_k 200, top_p 0.95\):\nROMEO:(.*)", said, re.S)
    assert found and int(found[1]) > 0 and found[2].strip(), said

    # the comparison: both variants trained, the report shown with both, and its curves
    compare = cell_running(nb, '"experiment.py"')
    report = work / "experiments" / "compare" / "report.md"
    assert report.is_file() and (report.parent / "curves.png").is_file()
    shown = "".join(out["data"].get("text/markdown", "") for out in compare.outputs if "data" in out)
    assert "adamw" in shown and "muon" in shown
    assert any("image/png" in out.get("data", {}) for out in compare.outputs)

    # the export: a transformers folder, loaded by pipeline("text-generation"), which generated text
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (work / "hf").iterdir()}
    said = text_of(cell_running(nb, "pipeline("))
    found = re.search(r"transformers pipeline \(LlamaForCausalLM\):\nROMEO:(.+)", said, re.S)
    assert found and found[1].strip(), said



def test_repo_url_is_the_origin_of_the_clone_the_notebook_runs_in(tmp_path, monkeypatch):
    """The setup cell's clone_origin(): `git remote get-url origin` inside a clone, None outside one."""
    setup = next(c for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code").source
    function = next(node for node in ast.parse(setup).body if getattr(node, "name", None) == "clone_origin")
    namespace = {"subprocess": subprocess}
    exec(compile(ast.Module([function], []), "setup cell", "exec"), namespace)
    clone = tmp_path / "clone"
    clone.mkdir()
    subprocess.run(["git", "init", "-q", str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "remote", "add", "origin", "https://github.com/someone/fork.git"],
                   check=True)
    monkeypatch.chdir(clone)
    assert namespace["clone_origin"]() == "https://github.com/someone/fork.git"
    outside = tmp_path / "outside"
    outside.mkdir()
    monkeypatch.chdir(outside)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no clone above tmp_path counts either
    assert namespace["clone_origin"]() is None
