"""BERT-style masked-language-model pretraining: the masking recipe, learning to fill masks, the fill-mask
command, and the errors a user can run into."""

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import playground
from config import parse_config
from gptlab.data import Masking, mask_tokens
from gptlab.errors import UsageError
from gptlab.tokenizer import MASK, train_tokenizer

REPO = Path(__file__).resolve().parent.parent
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet".split()
TINY = ["--objective", "mlm", "--embedding_dim", "32", "--num_of_layers", "2", "--num_of_heads", "2",
        "--block_size", "32", "--batch_size", "16", "--eval_iters", "4", "--warmup_iters", "10", "--lr", "3e-3",
        "--dropout", "0", "--sample_tokens", "0", "--tokenizer_kind", "bpe", "--vocab_size", "100"]


def test_masking_follows_the_15_80_10_10_recipe_and_never_touches_special_tokens():
    specials = (0, 1, 2, 3, 4)  # say end-of-text, <mask>, <pad>, <cls>, <sep>
    m = Masking(mask_id=1, special_ids=specials, vocab_size=100)
    rng = np.random.default_rng(0)
    tokens = torch.from_numpy(rng.integers(0, 100, size=(200, 500)))
    inputs, targets = mask_tokens(tokens, m, np.random.default_rng(1))
    special = torch.isin(tokens, torch.tensor(specials))
    chosen = targets != -1
    assert not (chosen & special).any()  # special and padding tokens are never chosen
    assert torch.equal(inputs[special], tokens[special])
    assert torch.equal(targets[chosen], tokens[chosen])  # targets are the original tokens
    assert torch.equal(inputs[~chosen], tokens[~chosen])  # nothing else changes
    assert chosen.sum() / (~special).sum() == pytest.approx(0.15, abs=0.005)
    n = chosen.sum()
    masked = inputs[chosen] == 1
    kept = inputs[chosen] == tokens[chosen]
    replaced = ~masked & ~kept
    assert masked.sum() / n == pytest.approx(0.8, abs=0.01)
    # a random replacement can draw the original token itself (1 in 95), which then counts as kept
    assert kept.sum() / n == pytest.approx(0.1 + 0.1 / 95, abs=0.01)
    assert replaced.sum() / n == pytest.approx(0.1 * 94 / 95, abs=0.01)
    assert not torch.isin(inputs[chosen][replaced], torch.tensor(specials)).any()  # replacements are ordinary


@pytest.fixture(scope="module")
def pattern_run(tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """A tiny encoder trained on lines that each repeat one word: a hidden word follows from its context."""
    folder = tmp_path_factory.mktemp("mlm")
    corpus = folder / "pattern.txt"
    rng = np.random.default_rng(0)
    corpus.write_text("".join(" ".join([str(rng.choice(WORDS))] * 30) + "\n" for _ in range(1500)), encoding="utf-8")
    checkpoint = folder / "mlm.tar"
    c, flags = parse_config([str(corpus), "--out_dir", str(folder / "runs"), "--checkpoint", str(checkpoint),
                             "--max_iters", "200", "--eval_interval", "200", *TINY])
    return checkpoint, playground.train(c, flags)


def test_a_tiny_encoder_learns_to_fill_masks_far_above_chance(pattern_run):
    _, final = pattern_run
    assert final["val_accuracy"] > 0.6  # chance: 1 in 10 words
    assert "val_bpb" not in final  # the loss covers masked tokens only: no bits per byte


def fill_mask_cli(checkpoint: Path, prompt: str) -> list[str]:
    """The best candidate for each mask, as generate.py prints it ("<mask> 1: ' delta' 0.981  ' golf' ...")."""
    out = subprocess.run([sys.executable, str(REPO / "generate.py"), "--checkpoint", str(checkpoint),
                          "--prompt", prompt, "--top_k", "3"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert all(line.startswith(f"{MASK} {n}: ") for n, line in enumerate(lines, start=1))
    return [ast.literal_eval(line.split(": ", 1)[1].split("  ")[0].rsplit(" ", 1)[0]) for line in lines]


def test_fill_mask_uses_context_on_both_sides(pattern_run):
    checkpoint, _ = pattern_run
    assert [b.strip() for b in fill_mask_cli(checkpoint, f"{MASK} delta delta delta delta")] == ["delta"]  # right
    assert [b.strip() for b in fill_mask_cli(checkpoint, f"golf golf golf golf {MASK}")] == ["golf"]  # left


@pytest.mark.smoke
def test_mlm_needs_a_tokenizer_with_a_mask_token(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(WORDS * 200), encoding="utf-8")
    plain = tmp_path / "plain.json"
    train_tokenizer([corpus], "bpe", 64, show_progress=False).save(plain)
    c, flags = parse_config([str(corpus), "--tokenizer", str(plain), "--out_dir", str(tmp_path / "runs"),
                             "--max_iters", "1",
                             *[a for a in TINY if a not in ("--vocab_size", "100", "--tokenizer_kind", "bpe")]])
    with pytest.raises(UsageError, match="--objective mlm needs the <mask> token.*--bert_tokens"):
        playground.train(c, flags)


def test_resuming_with_another_objective_is_refused(pattern_run):
    checkpoint, _ = pattern_run
    c, flags = parse_config(["--checkpoint", str(checkpoint), "--resume", "--objective", "clm"])
    with pytest.raises(UsageError, match="objective"):
        playground.train(c, flags)


def test_resume_reproduces_an_uninterrupted_masked_lm_run(tmp_path):
    """The masks, like the batches, are a function of (seed, step): 5 steps + 5 resumed = 10 steps at once."""
    corpus = tmp_path / "c.txt"
    corpus.write_text((" ".join(WORDS) + "\n") * 300, encoding="utf-8")

    def run(checkpoint: str, *extra: str) -> dict[str, float]:
        # a constant schedule, so that the learning rate of a step does not depend on max_iters
        c, flags = parse_config([str(corpus), "--out_dir", str(tmp_path / "runs"), "--checkpoint",
                                 str(tmp_path / checkpoint), "--eval_interval", "5", *TINY, "--dropout", "0.1",
                                 "--lr_schedule", "constant", "--warmup_iters", "2", *extra])
        return playground.train(c, flags)

    uninterrupted = run("a.tar", "--max_iters", "10")
    run("b.tar", "--max_iters", "5")
    resumed = run("b.tar", "--max_iters", "10", "--resume")
    assert resumed == uninterrupted  # the same val loss and masked-token accuracy at step 10
    a, b = torch.load(tmp_path / "a.tar", weights_only=True), torch.load(tmp_path / "b.tar", weights_only=True)
    assert b["iteration"] == 10
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
