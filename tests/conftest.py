"""Tests marked `gpu` run only where CUDA is available (see the markers in pyproject.toml).

The suite is hermetic: every test runs in a temporary folder of its own (the process's working folder, which
the commands it starts inherit), so the files a user's runs left in the repository (model_checkpoint.tar,
runs/) cannot change a result, and a test that writes a default output path writes it there. The session fails
if the repository's working tree gained or lost a file while it ran."""

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from gptlab.errors import run_cli


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):  # not `"gpu" in item.keywords`: a checkout in a folder named gpu
            item.add_marker(skip)


REPO = Path(__file__).resolve().parent.parent
# What Python, pytest and pip may write in the working tree while the suite runs.
NOT_OUTPUTS = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".venv", ".venv-newest", ".whl"}
TREE_BEFORE = pytest.StashKey[set[str]]()


def working_tree() -> set[str]:
    """Every path under the repository but the caches above and installed metadata."""
    found = set()
    for folder, subfolders, files in os.walk(REPO):
        subfolders[:] = [d for d in subfolders if d not in NOT_OUTPUTS and not d.endswith(".egg-info")]
        found.update(os.path.relpath(os.path.join(folder, name), REPO) for name in files + subfolders)
    return found


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[TREE_BEFORE] = working_tree()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = session.config.stash.get(TREE_BEFORE, None)
    if before is None:
        return
    after = working_tree()
    changed = sorted((after - before) | (before - after))
    if changed:
        print(f"\nthe suite changed the repository's working tree (a test must write under its tmp_path): "
              f"{', '.join(changed[:20])}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True, scope="session")
def away_from_the_repository(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Module fixtures (and the commands they start) run in a folder of the session's, not where pytest started."""
    os.chdir(tmp_path_factory.mktemp("session_cwd"))


@pytest.fixture(autouse=True)
def own_working_folder(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test in an empty folder of its own: default output paths (model_checkpoint.tar, runs/) land there."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture
def transformers():
    """Hugging Face transformers, imported by the tests that use it and no test file at import: a GPU run
    (pytest -m gpu) collects without it, and a machine without it skips those tests."""
    return pytest.importorskip("transformers")


BUNDLED_CORPUS = REPO / "data" / "shakespeare.txt"


def corpus_slice(folder: Path, chars: int, name: str = "corpus.txt") -> Path:
    """The first `chars` characters of the bundled corpus, cut at a line end, as a file in `folder`."""
    text = BUNDLED_CORPUS.read_text(encoding="utf-8")[:chars]
    path = folder / name
    path.write_text(text[: text.rindex("\n") + 1], encoding="utf-8")
    return path


def run_main(main: Callable[[list[str]], object], argv: list[str],
             capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """A CLI's main as its script runs it (inside errors.run_cli), in this process: (exit status, stdout, stderr)."""
    try:
        run_cli(lambda: main(argv))
        status = 0
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 60 kB of the bundled corpus (cut at a line end); a test module may define its own."""
    return corpus_slice(tmp_path_factory.mktemp("corpus"), 60_000)


@pytest.fixture(scope="module")
def tokenizer_path(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE of 320 tokens trained on `corpus`, saved as tokenizer.json."""
    from gptlab.tokenizer import corpus_files, train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(corpus_files([corpus]), "bbpe", 320, show_progress=False).save(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tests run their tiny models on one thread: a second one only spins when other jobs share the cores
    (measured on a 2-core VM under a load of about 20: tests/test_finetune.py took 4 min with two threads, 17 s
    with one; test_mlm.py's 200-step run 452 s against 12 s; test_muon.py's 30 Muon steps 78 s against 0.5 s).
    Commands the tests start get OMP_NUM_THREADS=1 for the same reason."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
