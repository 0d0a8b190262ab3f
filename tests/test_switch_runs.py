"""The architecture and optimizer switches through the whole tool chain: a run with all of them saves them in
its checkpoint; generate, evaluate, finetune and --resume rebuild the same model from it; a switch that changes
the model cannot change on resume; configs/modern.yaml trains."""

import json
from pathlib import Path

import pytest
import torch
from conftest import corpus_slice

import evaluate
import finetune
import generate
import playground
from config import parse_config
from gptlab.checkpoint import load_checkpoint, model_from_checkpoint
from gptlab.errors import UsageError
from gptlab.tokenizer import corpus_files, train_tokenizer

REPO = Path(__file__).resolve().parent.parent
TINY = ["--embedding_dim", "32", "--num_of_layers", "2", "--num_of_heads", "2", "--block_size", "16",
        "--batch_size", "4", "--eval_iters", "1", "--warmup_iters", "2", "--lr", "3e-3", "--sample_tokens", "5",
        "--dropout", "0", "--device", "cpu"]
SWITCHES = ["--position", "rope", "--norm", "rmsnorm", "--mlp", "swiglu", "--qk_norm", "--no-tie_embeddings",
            "--logit_softcap", "30", "--no-bias", "--optimizer", "muon"]
SAVED = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": True, "tie_embeddings": False,
         "logit_softcap": 30.0, "bias": False}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(checkpoint, corpus, tokenizer) of a 4-step run with every switch on."""
    tmp = tmp_path_factory.mktemp("switches")
    corpus = corpus_slice(tmp, 30_000)
    tokenizer = tmp / "tokenizer.json"
    train_tokenizer(corpus_files([corpus]), "bbpe", 300, show_progress=False, bert_tokens=True).save(tokenizer)
    c, flags = parse_config([str(corpus), "--tokenizer", str(tokenizer), "--out_dir", str(tmp / "runs"),
                             "--checkpoint", str(tmp / "ckpt.tar"), *TINY, *SWITCHES, "--max_iters", "4",
                             "--eval_interval", "4"])
    playground.train(c, flags)
    return tmp / "ckpt.tar", corpus, tokenizer


def test_every_switch_is_saved_and_rebuilds_the_same_model(trained):
    ckpt_path, _, _ = trained
    ckpt = load_checkpoint(ckpt_path)
    assert {k: ckpt["model_config"][k] for k in SAVED} == SAVED
    assert ckpt["config"]["optimizer"] == "muon"
    model, _ = model_from_checkpoint(ckpt)
    assert {k: getattr(model.config, k) for k in SAVED} == SAVED
    assert "lm_head.weight" in model.state_dict() and model.lm_head.weight is not model.wte.weight


def test_generate_evaluate_and_finetune_use_the_saved_switches(trained, tmp_path, capsys):
    ckpt, corpus, _ = trained
    generate.main(["--checkpoint", str(ckpt), "--prompt", "ROMEO:", "--max_new_tokens", "40", "--temperature",
                   "0", "--device", "cpu"])  # 40 new tokens: past block_size 16, through the sliding cache
    assert capsys.readouterr().out.startswith("ROMEO:")
    evaluate.main(["--checkpoint", str(ckpt), str(corpus), "--device", "cpu"])
    assert "bits/byte" in capsys.readouterr().out
    rows = [{"text": f"line {i} {'thee' if i % 2 else 'you'}", "label": i % 2} for i in range(8)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    finetune.main(["--checkpoint", str(ckpt), "--train", str(data), "--val", str(data), "--epochs", "1",
                   "--batch_size", "4", "--out", str(tmp_path / "ft.tar"), "--predictions",
                   str(tmp_path / "p.jsonl"), "--device", "cpu"])
    tuned = load_checkpoint(tmp_path / "ft.tar")
    assert {k: tuned["model_config"][k] for k in SAVED} == SAVED


@pytest.mark.parametrize("flag", [["--position", "learned"], ["--norm", "layernorm"], ["--mlp", "gelu"],
                                  ["--no-qk_norm"], ["--tie_embeddings"], ["--logit_softcap", "0"]])
def test_a_switch_that_changes_the_model_cannot_change_on_resume(trained, flag):
    ckpt, _, _ = trained
    c, flags = parse_config(["--resume", "--checkpoint", str(ckpt), "--max_iters", "6", *flag])
    with pytest.raises(UsageError, match="differs from the checkpoint's"):
        playground.train(c, flags)


def test_resume_keeps_the_switches(trained, tmp_path):
    ckpt, _, _ = trained
    copy = tmp_path / "ckpt.tar"
    copy.write_bytes(ckpt.read_bytes())
    c, flags = parse_config(["--resume", "--checkpoint", str(copy), "--max_iters", "6"])
    playground.train(c, flags)
    resumed = load_checkpoint(copy)
    assert resumed["iteration"] == 6 and {k: resumed["model_config"][k] for k in SAVED} == SAVED


def test_modern_config_trains(tmp_path, trained):
    _, corpus, tokenizer = trained
    c, flags = parse_config(["--config", str(REPO / "configs" / "modern.yaml"), str(corpus), "--tokenizer",
                             str(tokenizer), "--vocab_size", "300", "--out_dir", str(tmp_path / "runs"),
                             "--checkpoint", str(tmp_path / "m.tar"), *TINY, "--max_iters", "3",
                             "--eval_interval", "3"])
    assert (c.model.position, c.model.norm, c.optimizer) == ("rope", "rmsnorm", "muon")
    final = playground.train(c, flags)
    assert torch.isfinite(torch.tensor(final["val_loss"]))
