"""evaluate.py --benchmark blimp: each sentence's log-likelihood equals a token-by-token computation done apart
(a sentence longer than block_size included: a sliding window, not a cut), whatever the batch; a tie counts
wrong; one line per paradigm, the fields' and the overall means, and the same in --out's JSON; a damaged or
missing data folder is one error line. Tiny random models and a few pairs of BLiMP (tests/data/blimp_tiny)."""

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import run_main

import evaluate
from gpt import GPT, GPTConfig
from gptlab import blimp
from gptlab.checkpoint import save_checkpoint
from gptlab.tokenizer import Tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TINY_BLIMP = ROOT / "tests" / "data" / "blimp_tiny"
SHAKESPEARE = ROOT / "data" / "shakespeare.txt"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    corpus = tmp_path_factory.mktemp("corpus") / "slice.txt"
    corpus.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    return train_tokenizer([corpus], "bbpe", 300, show_progress=False)


def random_model(vocab_size: int, block_size: int = 64, **kw) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, embedding_dim=32, num_of_layers=2,
                          num_of_heads=2, dropout=0.0, **kw))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def write_checkpoint(path: Path, model: GPT, tokenizer: Tokenizer) -> Path:
    save_checkpoint({"model_config": asdict(model.config), "model": model.state_dict(),
                     "tokenizer": tokenizer.to_json(), "config": {}, "iteration": 0}, path)
    return path


@torch.no_grad()
def token_by_token(model: GPT, tokens: list[int]) -> float:
    """Each token's log-probability from its own forward pass over (at most block_size of) the tokens before it."""
    total = 0.0
    for i in range(1, len(tokens)):
        context = torch.tensor(tokens[max(0, i - model.config.block_size):i])[None]
        total += F.log_softmax(model(context)[0][0, -1].double(), -1)[tokens[i]].item()
    return total


def run_evaluate(argv: list[str], capsys) -> tuple[int, str, str]:
    return run_main(evaluate.main, argv, capsys)


@pytest.mark.parametrize("shape", ["gpt2", "qwen3"])
def test_sentence_scores_equal_a_token_by_token_computation_with_a_sliding_window(tokenizer, shape):
    settings = {} if shape == "gpt2" else dict(position="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True,
                                               bias=False, tie_embeddings=False)
    model = random_model(tokenizer.vocab_size, block_size=8, **settings)
    sentences = [s for p in blimp.read_paradigms(TINY_BLIMP) for pair in p.pairs for s in pair]
    sequences = sorted(blimp.sentence_tokens(tokenizer, sentences), key=len)[::6]  # short to long
    assert sequences[0][0] == tokenizer.eot_id and max(map(len, sequences)) > 2 * 8  # windows must slide
    expected = [token_by_token(model, seq) for seq in sequences]
    for batch_size in (1, 64):
        assert blimp.sentence_loglikelihoods(model, sequences, batch_size) == pytest.approx(expected, abs=1e-4)


def test_a_model_that_scores_both_sentences_alike_gets_every_pair_wrong(tmp_path, tokenizer, capsys):
    model = random_model(tokenizer.vocab_size)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every next token equally likely: a pair of equally long sentences ties
    # the same words in another order: the same tokens, each after a space, so the same count
    pairs = [("Who should Derek hug after shocking Richard?", "Who should Derek hug Richard after shocking?"),
             ("The dog saw a cat.", "The cat saw a dog.")]
    assert all(len(tokenizer.encode(" " + g)) == len(tokenizer.encode(" " + b)) for g, b in pairs)
    data = tmp_path / "blimp"
    data.mkdir()
    (data / "ties.jsonl").write_text("".join(json.dumps({"sentence_good": g, "sentence_bad": b, "field": "syntax",
                                                         "UID": "ties"}) + "\n" for g, b in pairs))
    checkpoint = write_checkpoint(tmp_path / "ck.tar", model, tokenizer)
    code, out, _ = run_evaluate(["--checkpoint", str(checkpoint), "--benchmark", "blimp", "--data", str(data),
                                 "--out", str(tmp_path / "r.json")], capsys)
    assert code == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["paradigms"] == [{"UID": "ties", "field": "syntax", "accuracy": 0.0, "correct": 0, "pairs": 2}]
    assert result["overall"] == 0.0


def test_one_line_per_paradigm_the_fields_and_overall_and_the_same_in_json(tmp_path, tokenizer, capsys):
    checkpoint = write_checkpoint(tmp_path / "ck.tar", random_model(tokenizer.vocab_size), tokenizer)
    code, out, err = run_evaluate(["--checkpoint", str(checkpoint), "--benchmark", "blimp", "--data",
                                   str(TINY_BLIMP), "--out", str(tmp_path / "out" / "r.json")], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "out" / "r.json").read_text())
    uids = sorted(p.stem for p in TINY_BLIMP.glob("*.jsonl"))
    assert [p["UID"] for p in result["paradigms"]] == uids
    # principle_A_case_2's records say syntax/semantics: the same field as the other syntax_semantics paradigms
    assert list(result["fields"]) == ["morphology", "syntax", "semantics", "syntax_semantics"]
    accuracy = {p["UID"]: p["accuracy"] for p in result["paradigms"]}
    assert result["overall"] == pytest.approx(sum(accuracy.values()) / len(accuracy))
    lines = out.splitlines()
    for uid in uids:
        assert sum(line.split()[0] == uid for line in lines) == 1
        assert f"{accuracy[uid]:.4f}" in next(line for line in lines if line.split()[0] == uid)
    low, high = result["overall_interval"]
    assert low <= result["overall"] <= high
    assert lines[-1].startswith("overall") and f"{result['overall']:.4f}  (95% bootstrap interval over paradigms " \
        f"{low:.4f}-{high:.4f})" in lines[-1]


def test_missing_or_damaged_data_is_one_error_line(tmp_path, tokenizer, capsys):
    checkpoint = write_checkpoint(tmp_path / "ck.tar", random_model(tokenizer.vocab_size), tokenizer)
    damaged = tmp_path / "damaged"
    shutil.copytree(TINY_BLIMP, damaged)
    with open(damaged / "adjunct_island.jsonl", "a") as f:
        f.write('{"sentence_good": "A cat.", "field": "syntax", "UID": "adjunct_island"}\n')
    (tmp_path / "empty").mkdir()
    cases = {"missing": ["--data", str(tmp_path / "nowhere")], "empty": ["--data", str(tmp_path / "empty")],
             "damaged": ["--data", str(damaged)], "text files too": ["--data", str(TINY_BLIMP), str(SHAKESPEARE)]}
    for name, argv in cases.items():
        code, out, err = run_evaluate(["--checkpoint", str(checkpoint), "--benchmark", "blimp", *argv], capsys)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (name, err)
    assert "adjunct_island.jsonl:5" in run_evaluate(["--checkpoint", str(checkpoint), "--benchmark", "blimp",
                                                     *cases["damaged"]], capsys)[2]
    code, _, err = run_evaluate(["--checkpoint", str(checkpoint), "--data", str(TINY_BLIMP), str(SHAKESPEARE)],
                                capsys)
    assert code == 2 and "--benchmark" in err
