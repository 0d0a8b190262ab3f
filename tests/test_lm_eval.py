"""A checkpoint exported with `export.py --format hf` evaluates in EleutherAI's lm-evaluation-harness as it is, in
the GPT-2 and the Llama shape: on a HellaSwag-style multiple-choice task written in the harness's own task format
(a YAML over a local JSONL file), lm_eval's per-ending log-likelihoods, acc and acc_norm equal those computed
here with our model. One context is longer than the model's block_size, so the harness must read max_length
from the export (and crop the context from the left as our model's window does). Offline: no download."""

import json
import math
import random
from dataclasses import asdict
from pathlib import Path

import lm_eval
import pytest
import torch
import torch.nn.functional as F
from lm_eval.tasks import TaskManager

import evaluate
import export
from gpt import GPT, GPTConfig
from gptlab import blimp
from gptlab.checkpoint import save_checkpoint
from gptlab.tokenizer import Tokenizer, train_tokenizer

SHAKESPEARE = Path(__file__).resolve().parent.parent / "data" / "shakespeare.txt"
BLOCK_SIZE = 64
LLAMA = dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)

# lm-eval's task format: contexts in `ctx`, candidate endings in `endings`, the right one's index in `label`.
# The harness scores each ending as the continuation target_delimiter (" ") + ending of doc_to_text.
TASK_YAML = """\
task: tiny_hellaswag
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
  cache_dir: {cache}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def hellaswag_items(n: int = 16) -> list[dict]:
    """Contexts cut from the corpus, each with its true next words and three endings taken from elsewhere, of
    varied lengths; some endings hold non-ASCII letters (their characters and bytes differ in number)."""
    rng = random.Random(0)
    words = SHAKESPEARE.read_text(encoding="utf-8")[:200_000].split()
    extras = ["café señor", "naïve Æthelred — ō", "déjà vu"]
    items = []
    for i in range(n):
        start = rng.randrange(len(words) - 400)
        ctx_words = 120 if i == 0 else rng.randrange(4, 15)  # the first context is longer than block_size
        ctx = " ".join(words[start:start + ctx_words])
        true = " ".join(words[start + ctx_words:start + ctx_words + rng.randrange(1, 6)])
        endings = [" ".join(words[(s := rng.randrange(len(words) - 10)):s + rng.randrange(1, 8)]) for _ in range(3)]
        endings[rng.randrange(3)] += " " + rng.choice(extras)
        label = rng.randrange(4)
        endings.insert(label, true)
        items.append({"ctx": ctx, "endings": endings, "label": label})
    return items


def random_model(vocab_size: int, **kw) -> GPT:
    """Every weight random and large enough that the endings' log-likelihoods differ by far more than float
    error (so no argmax is a near tie)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=BLOCK_SIZE, embedding_dim=32, num_of_layers=2,
                          num_of_heads=2, dropout=0.0, **kw))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


@torch.no_grad()
def our_loglikelihood(model: GPT, tokenizer: Tokenizer, context: str, continuation: str) -> float:
    """log P(continuation | context) under our model. The split into tokens is the harness's convention for
    causal models: encode context + continuation whole, and the tokens past those of the context alone are the
    continuation's; the model sees at most its last block_size tokens before each prediction."""
    whole = tokenizer.encode(context + continuation)
    n_context = len(tokenizer.encode(context))
    inputs = torch.tensor(whole[:-1][-BLOCK_SIZE:])
    targets = torch.tensor(whole[1:][-BLOCK_SIZE:])
    logits, _ = model(inputs[None])
    logprobs = F.log_softmax(logits[0].float(), dim=-1).gather(1, targets[:, None])[:, 0]
    n_continuation = len(whole) - n_context
    return logprobs[-n_continuation:].sum().item()


def pick(loglikelihoods: list[float], lengths: list[float]) -> int:
    """The ending with the highest log-likelihood per unit of length (lm-eval's argmax: the first on a tie)."""
    return max(range(len(lengths)), key=lambda i: (loglikelihoods[i] / lengths[i], -i))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    corpus = tmp_path_factory.mktemp("corpus") / "slice.txt"
    corpus.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return train_tokenizer([corpus], "bbpe", 300, show_progress=False)


@pytest.mark.parametrize("shape", ["gpt2", "llama"])
def test_lm_eval_scores_an_export_as_our_model_does(tmp_path, tokenizer, shape):
    model = random_model(tokenizer.vocab_size, **({} if shape == "gpt2" else LLAMA))
    checkpoint = tmp_path / "model.tar"
    save_checkpoint({"model_config": asdict(model.config), "model": model.state_dict(),
                     "tokenizer": tokenizer.to_json(), "config": {}, "iteration": 0}, checkpoint)
    export.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf"), "--format", "hf"])

    items = hellaswag_items()
    assert len(tokenizer.encode(items[0]["ctx"])) > BLOCK_SIZE
    # Ours: each ending's log-likelihood; acc picks the most likely ending, acc_norm the most likely per character
    # of the ending (lm-eval's choice: len(ending); its acc_bytes would divide by UTF-8 bytes instead). Where
    # characters and bytes pick different endings, the one per character is made the right answer, so that
    # dividing by bytes would lose those points.
    ours = [[our_loglikelihood(model, tokenizer, item["ctx"], " " + ending) for ending in item["endings"]]
            for item in items]
    best = [pick(ll, [1.0] * 4) for ll in ours]
    per_char = [pick(ll, [len(e) for e in item["endings"]]) for ll, item in zip(ours, items, strict=True)]
    per_byte = [pick(ll, [len(e.encode()) for e in item["endings"]]) for ll, item in zip(ours, items, strict=True)]
    for item, c, b in zip(items, per_char, per_byte, strict=True):
        if c != b:
            item["label"] = c
    assert best != per_char and per_char != per_byte  # the items tell acc_norm from acc, and characters from bytes

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    (tasks / "tiny_hellaswag.yaml").write_text(TASK_YAML.format(data=tasks / "items.jsonl",
                                                                cache=tmp_path / "datasets-cache"))
    # As the CLI: lm_eval --model hf --model_args pretrained=DIR --tasks tiny_hellaswag --include_path TASKS
    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'hf'}",
                                      tasks=["tiny_hellaswag"], device="cpu", batch_size=8, bootstrap_iters=0,
                                      task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                                      log_samples=True)

    samples = sorted(results["samples"]["tiny_hellaswag"], key=lambda s: s["doc_id"])
    assert len(samples) == len(items)
    for item, sample, ll, b, c in zip(items, samples, ours, best, per_char, strict=True):
        assert [theirs for theirs, _ in sample["filtered_resps"]] == pytest.approx(ll, abs=2e-3)
        assert (sample["acc"], sample["acc_norm"]) == (b == item["label"], c == item["label"])
    labels = [item["label"] for item in items]
    acc = sum(b == label for b, label in zip(best, labels, strict=True)) / len(items)
    acc_norm = sum(c == label for c, label in zip(per_char, labels, strict=True)) / len(items)
    scores = results["results"]["tiny_hellaswag"]
    assert math.isclose(scores["acc,none"], acc) and math.isclose(scores["acc_norm,none"], acc_norm)


ROOT = Path(__file__).resolve().parent.parent
TINY_BLIMP = ROOT / "tests" / "data" / "blimp_tiny"
QWEN3 = {**LLAMA, "qk_norm": True}


@pytest.mark.parametrize("shape", ["gpt2", "qwen3"])
def test_the_shipped_blimp_task_scores_each_pair_as_evaluate_py_does(tmp_path, tokenizer, shape):
    """lm_eval --include_path configs/lm_eval --tasks blimp_local on the export: every sentence's log-likelihood
    equal to evaluate.py's (to 1e-6 of its size: lm-eval sums in float32) and the same accuracy (this random
    model ties on no pair: lm-eval counts a tie right, evaluate.py wrong); evaluate.py on the exported folder
    gives the checkpoint's numbers."""
    model = random_model(tokenizer.vocab_size, **({} if shape == "gpt2" else QWEN3))
    checkpoint = tmp_path / "model.tar"
    save_checkpoint({"model_config": asdict(model.config), "model": model.state_dict(),
                     "tokenizer": tokenizer.to_json(), "config": {}, "iteration": 0}, checkpoint)
    export.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf"), "--format", "hf"])
    scores = blimp.score_paradigms(model, tokenizer, blimp.read_paradigms(TINY_BLIMP))
    ours = [ll for s in scores for pair in s.loglikelihoods for ll in pair]
    assert all(good != bad for s in scores for good, bad in s.loglikelihoods)

    # As the CLI: lm_eval --model hf --model_args pretrained=DIR --include_path configs/lm_eval --tasks blimp_local
    #                     --metadata '{"blimp_dir": "tests/data/blimp_tiny"}'
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tmp_path / 'hf'}", tasks=["blimp_local"], device="cpu",
        batch_size=16, bootstrap_iters=0, log_samples=True,
        task_manager=TaskManager(include_path=str(ROOT / "configs/lm_eval"), include_defaults=False,
                                 metadata={"blimp_dir": str(TINY_BLIMP)}))
    samples = sorted(results["samples"]["blimp_local"], key=lambda s: s["doc_id"])
    theirs = [ll for sample in samples for ll, _ in sample["filtered_resps"]]
    assert theirs == pytest.approx(ours, rel=1e-6)
    summary = blimp.summary(scores)  # every paradigm has as many pairs: the mean over pairs is that over paradigms
    assert math.isclose(results["results"]["blimp_local"]["acc,none"], summary["overall"])

    if shape == "gpt2":
        evaluate.main(["--checkpoint", str(tmp_path / "hf"), "--benchmark", "blimp", "--data", str(TINY_BLIMP),
                       "--out", str(tmp_path / "hf.json")])
        assert json.loads((tmp_path / "hf.json").read_text())["paradigms"] == summary["paradigms"]
