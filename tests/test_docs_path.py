"""The docs' commands a user is most likely to copy (baselines, masked LM, fine-tuning, export, speed) run as
written: the commands of each document in its order, in one fresh copy of the repository, with only budget
flags appended, each exiting with status 0 and leaving the files it names. A command not run here (it needs a
GPU, nanoGPT or the network, or repeats one that runs and would only cost time) has None and the reason beside
it; a command without an entry fails the test, so a new docs command is checked from the day it is added. The
README's own path is test_readme_path.py's."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from command_path import (
    FEW_STEPS,
    REPO,
    Budgets,
    budget_for,
    commands_in,
    isolate,
    run_checked,
    tracked_copy,
    unmarked_commands,
)

# Walked in this order, in one copy: each document's inputs come from the ones before it, as they say
# (finetuning.md fine-tunes baselines.md's quick-start model_checkpoint.tar and masked-lm.md's mlm.tar;
# export.md exports model_checkpoint.tar).
DOCS = ["docs/baselines.md", "docs/masked-lm.md", "docs/finetuning.md", "docs/export.md"]
# Walked beside them, in the same copy: it reads nothing they leave and leaves nothing in the copy.
BESIDE = ["docs/speed.md"]

# What is appended to each docs command, found by the first of these strings it contains; None: not run here.
BUDGETS: Budgets = [
    # baselines.md's correction: the quick start just above again, with one thread and its files in /tmp; it would
    # add 6 s and nothing the quick start does not run.
    ("--checkpoint /tmp/quickstart.tar", None),
    ("--objective mlm", FEW_STEPS),
    ("configs/cpu_quickstart.yaml", FEW_STEPS),  # the model shape as documented: fine-tuning and export use it
    ("playground.py tinyshakespeare.txt", FEW_STEPS),  # nanoGPT's recipe (baselines.md (b)), see SUBSTITUTES
    ("generate.py", ["--max_new_tokens", "20"]),
    ("make_finetune_example.py", ["--per_play", "10"]),
    # finetuning.md's worked example: two runs differ from the ones that run only by flag values, 4 s each (the
    # synopsis's fine-tuning runs the same decoder; --lr 1e-3 --out --predictions run with ft_mlm.tar's).
    ("--out ft_paper.tar", None),
    ("--out ft_lr.tar", None),
    ("finetune.py", ["--epochs", "1"]),
    ("save_checkpoint(", []),  # finetuning.md's randomly initialised model of the quick start's shape
    ("export.py", []),
    ("ollama ", None),  # Ollama is not installed here; tests/test_export.py checks the Modelfile it reads
    ("git worktree add", None),  # speed.md's baseline checkout: needs git history (a copy has none), writes outside
    ("git clone", None),  # network: nanoGPT from GitHub
    ("cd ../nanoGPT", None),  # nanoGPT: its data preparation, in the clone above
    ("bench.py peers", None),  # nanoGPT and the checkout above; minutes of whole training runs of each
    ("bench.py attention", ["--sizes", "16,1,32,2", "--vocab_size", "64", "--warmup", "0", "--iters", "1"]),
    ("bench_tokenizer.py", ["--mb", "1", "--vocab_size", "300"]),
    ("--sample_mb 100 --encode_mb 100", None),  # the benchmark below again, at other sizes: once is enough here
    ("bench_encoding.py", ["--mb", "2", "--sample_mb", "1", "--encode_mb", "1", "--heldout_mb", "1",
                           "--vocab_size", "300"]),
    ("gpu_check.py", None),  # GPU: refused without one; tests/test_gpu_check.py runs its CPU rehearsal, --dry_run
]

# Replaced in a command before it runs: stand-ins that change nothing the command exercises.
SUBSTITUTES = [
    # Tiny Shakespeare is the reader's download (network); the bundled plays are the same kind of text file.
    ("tinyshakespeare.txt", "data/shakespeare.txt"),
    # the placeholders of baselines.md (b): one row of its table
    ("--tokenizer_kind KIND --vocab_size N", "--tokenizer_kind bbpe --vocab_size 512"),
]

# The files a command's text (its comment, or the sentence about it) says it leaves, beyond those its flags name.
LEAVES = [
    ("make_finetune_example.py", ["train.csv", "val.csv"]),
    ("save_checkpoint(", ["scratch.tar"]),
    ("--format gguf", ["my-gguf/model.gguf", "my-gguf/Modelfile"]),
    ("export.py", ["my-model/config.json", "my-model/model.safetensors", "my-model/tokenizer.json"]),
]


def substituted(command: str) -> str:
    for old, new in SUBSTITUTES:
        command = command.replace(old, new)
    return command


def leaves(command: str) -> list[str]:
    return next((files for key, files in LEAVES if key in command), [])


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's tracked files, as a fresh clone has them."""
    return tracked_copy(tmp_path_factory.mktemp("clone"))


@pytest.mark.parametrize("doc", DOCS + BESIDE)
def test_every_command_of_the_doc_has_a_budget_or_a_reason(doc):
    commands = commands_in(REPO / doc)
    assert commands, f"{doc} has no ```bash block: nothing of it is checked"
    for command in commands:
        budget_for(command, BUDGETS, doc)
    # A command in a block not marked ```bash (and not shown as `$ command`) would escape the walk.
    assert not unmarked_commands(REPO / doc), f"{doc}: mark these blocks ```bash: {unmarked_commands(REPO / doc)}"


def test_a_new_command_without_an_entry_fails():
    with pytest.raises(AssertionError, match="without a budget"):
        budget_for("python new_tool.py --out x", BUDGETS, "docs/new.md")


def walk(docs: list[str], copy: Path) -> dict[str, str]:
    """Runs the commands of `docs`, in order, in `copy`; returns each one's stdout."""
    ran = {}
    for doc in docs:
        for command in commands_in(REPO / doc):
            flags = budget_for(command, BUDGETS, doc)
            if flags is not None:
                ran[command] = run_checked(substituted(command), flags, copy, leaves(command))
    return ran


@pytest.mark.slow
def test_the_docs_commands_run_as_written_in_order(fresh_copy, monkeypatch):
    isolate(monkeypatch, fresh_copy)
    # The commands use one thread each (OMP_NUM_THREADS=1): a second core walks BESIDE meanwhile.
    with ThreadPoolExecutor(max_workers=2) as pool:
        walks = [pool.submit(walk, docs, fresh_copy) for docs in (DOCS, BESIDE)]
        ran = {**walks[0].result(), **walks[1].result()}
    mlm = next(out for command, out in ran.items() if "generate.py --checkpoint mlm.tar" in command)
    assert mlm.startswith("<mask> 1: ")  # an encoder fills the mask, as masked-lm.md shows
    attention = next(out for command, out in ran.items() if "bench.py attention" in command)
    assert "| block | layers | width | heads | batch |" in attention
    assert len(ran) == 17
