"""errors.run_cli: a user mistake is one `error:` line and exit status 2, said once under torchrun; the model's
plain exceptions about its settings become such a line in every CLI."""

import ast
import importlib
import json
from pathlib import Path

import pytest

from gpt import GPTConfig
from gptlab import errors
from gptlab.checkpoint import save_checkpoint
from gptlab.errors import UsageError, run_cli


def mistake() -> None:
    raise UsageError("--batch_size must be a positive integer, got 0")


def exit_status(capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        run_cli(mistake)
    return e.value.code, capsys.readouterr().err


@pytest.mark.smoke
def test_a_mistake_is_one_line_and_status_2(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    assert exit_status(capsys) == (2, "error: --batch_size must be a positive integer, got 0\n")
    monkeypatch.setenv("RANK", "0")  # torchrun's rank 0 says it as a single process does
    assert exit_status(capsys) == (2, "error: --batch_size must be a positive integer, got 0\n")


def test_under_torchrun_other_ranks_wait_for_rank_0_to_say_it(monkeypatch, capsys):
    """Rank 0 meets the same mistake and exits first; torchrun then stops the other ranks while they wait, so
    they print nothing. A mistake only a later rank meets is still said, with its rank."""
    monkeypatch.setenv("RANK", "3")

    def stopped_by_torchrun(seconds: float) -> None:
        assert seconds == errors.OTHER_RANKS_WAIT_S >= 1  # well above torchrun's 0.1 s check
        raise SystemExit(-15)

    monkeypatch.setattr(errors.time, "sleep", stopped_by_torchrun)
    assert exit_status(capsys) == (-15, "")
    monkeypatch.setattr(errors.time, "sleep", lambda seconds: None)  # rank 0 did not fail: nobody stops rank 3
    assert exit_status(capsys) == (2, "[rank 3] error: --batch_size must be a positive integer, got 0\n")


def test_ctrl_c_under_torchrun_is_said_by_rank_0_and_no_rank_waits(monkeypatch, capsys):
    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(errors.time, "sleep", lambda seconds: pytest.fail("a Ctrl-C must not wait"))
    for rank, said in (("0", "interrupted\n"), ("1", "")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as e:
            run_cli(interrupted)
        assert (e.value.code, capsys.readouterr().err) == (130, said)


# ---------------------------------------------------------------------- the model's plain exceptions

REPO = Path(__file__).resolve().parent.parent
BAD_MODEL = ["--embedding_dim", "130", "--num_of_heads", "4"]  # 4 heads do not divide 130


def test_the_model_files_raise_plain_exceptions_not_the_clis():
    for name in ("gpt.py", "attention.py"):
        tree = ast.parse((REPO / name).read_text(encoding="utf-8"))
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "gptlab.errors" not in modules, name
    with pytest.raises(ValueError, match="130 is not divisible by --num_of_heads 4"):
        GPTConfig(embedding_dim=130, num_of_heads=4)


@pytest.fixture(scope="module")
def bad_model(tmp_path_factory) -> dict[str, str]:
    """A checkpoint and a Hugging Face folder whose model settings GPTConfig refuses, and a text file."""
    folder = tmp_path_factory.mktemp("bad")
    config = {"embedding_dim": 130, "num_of_heads": 4, "vocab_size": 10}
    save_checkpoint({"model_config": config, "model": {}, "tokenizer": "{}"}, folder / "bad.tar")
    (folder / "hf").mkdir()
    hf = {"model_type": "gpt2", "n_embd": 130, "n_head": 4, "n_layer": 1, "n_positions": 16, "vocab_size": 10}
    (folder / "hf" / "config.json").write_text(json.dumps(hf))
    (folder / "text.txt").write_text("some text\n")
    (folder / "spec.yaml").write_text(f"base: {{corpus: {folder / 'text.txt'}, embedding_dim: 130, "
                                      f"num_of_heads: 4}}\nvariants: {{a: {{}}}}\nseeds: 1\nbudget: {{max_iters: 1}}\n")
    return {key: str(folder / name) for key, name in
            (("ckpt", "bad.tar"), ("hf", "hf"), ("text", "text.txt"), ("spec", "spec.yaml"))}


@pytest.mark.parametrize("script, argv", [
    ("playground", [*BAD_MODEL, "--device", "cpu"]),
    ("generate", ["--checkpoint", "{ckpt}", "--prompt", "x", "--device", "cpu"]),
    ("generate", ["--checkpoint", "{hf}", "--prompt", "x", "--device", "cpu"]),
    ("evaluate", ["--checkpoint", "{ckpt}", "{text}", "--device", "cpu"]),
    ("finetune", ["--checkpoint", "{ckpt}", "--train", "{text}", "--val", "{text}", "--out", "{text}.tar",
                  "--predictions", "{text}.jsonl", "--device", "cpu"]),
    ("export", ["--checkpoint", "{ckpt}", "--out", "{text}.out"]),
    ("experiment", ["{spec}"]),
    ("bench", ["train", *BAD_MODEL]),
    ("bench", ["generate", *BAD_MODEL]),
    ("bench", ["attention", "--sizes", "16,1,65,2"]),  # 2 heads for a width of 65
])
def test_a_bad_model_setting_is_one_error_line_in_every_cli(script, argv, bad_model, capsys, monkeypatch):
    """GPTConfig's ValueError reaches no user as a traceback: each CLI says it in one line and exits 2.
    (gpu_check.py builds its models from configs/gpt2_small.yaml and fixed shapes, never from a user's.)"""
    monkeypatch.delenv("RANK", raising=False)
    main = importlib.import_module(script).main
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main([a.format(**bad_model) for a in argv]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "not divisible by --num_of_heads" in lines[0], lines
