"""Training health (gptlab/health.py): bad steps are skipped on the step they happen, the per-layer telemetry is
what it says, a spike is rolled back, and the moving average of the weights resumes bit for bit."""

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

import playground
from config import TrainConfig, parse_config
from gpt import GPT, GPTConfig
from gptlab import checkpoint as checkpoint_module
from gptlab import health as health_module
from gptlab.checkpoint import load_checkpoint, model_from_checkpoint
from gptlab.data import TokenSplit, batch_rng, build_token_cache
from gptlab.errors import DIVERGED_EXIT, Diverged, UsageError, run_cli
from gptlab.health import Health
from gptlab.objectives import NextToken
from gptlab.runtime import Runtime
from gptlab.tokenizer import Tokenizer, corpus_files
from gptlab.training import Stepper, make_optimizer, train_step

TINY = ["--embedding_dim", "32", "--num_of_layers", "2", "--num_of_heads", "2", "--block_size", "32",
        "--batch_size", "8", "--eval_iters", "4", "--log_interval", "5", "--warmup_iters", "5", "--lr", "3e-3",
        "--sample_tokens", "0", "--dropout", "0"]
CPU = Runtime(torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def split(corpus, tokenizer_path, tmp_path_factory) -> TokenSplit:
    folder = tmp_path_factory.mktemp("cache")
    return build_token_cache(corpus_files([corpus]), Tokenizer.from_file(tokenizer_path), folder, 0.1)["train"]


def train(tmp_path: Path, corpus: Path, tokenizer: Path, *extra: str, name: str = "ckpt") -> dict[str, float]:
    c, set_by_flags = parse_config([str(corpus), "--tokenizer", str(tokenizer), "--out_dir", str(tmp_path / "runs"),
                                    "--checkpoint", str(tmp_path / f"{name}.tar"), *TINY, *extra])
    return playground.train(c, set_by_flags)


def metrics(tmp_path: Path, name: str = "ckpt") -> list[dict]:
    return [json.loads(line) for line in (tmp_path / f"{name}.metrics.jsonl").read_text().splitlines()]


def poison_training_loss(monkeypatch, bad_calls: set[int], value: float = math.nan) -> None:
    """The training loss of the given forward calls (0-based, training mode only) becomes `value`."""
    real_loss, calls = NextToken.loss, [0]

    def loss(self, model, x, y):
        logits, out = real_loss(self, model, x, y)
        if model.training:
            calls[0] += 1
            if calls[0] - 1 in bad_calls:
                out = out * value
        return logits, out

    monkeypatch.setattr(NextToken, "loss", loss)


def tiny_setup(c: TrainConfig) -> tuple[GPT, torch.optim.Optimizer, Health]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=320, block_size=32, embedding_dim=32, num_of_layers=2, num_of_heads=2,
                          dropout=0.0, tie_embeddings=c.model.tie_embeddings))
    optimizer = make_optimizer(model, c, CPU.device)
    return model, optimizer, Health(model, optimizer, c, CPU)


def state_of(model: GPT, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    moments = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return [t.clone() for t in [*model.parameters(), *moments]]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])  # skipped on the device (fused AdamW), or by the host
def test_a_non_finite_step_leaves_weights_and_optimizer_untouched(optimizer, split, monkeypatch):
    c = TrainConfig(optimizer=optimizer, batch_size=4, grad_clip=1.0).replace(block_size=32)
    model, opt, health = tiny_setup(c)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stepper = Stepper(model, opt, scaler, split, c, CPU, NextToken(), health=health)
    train_step(stepper, 0)  # the moments exist from here on
    before = state_of(model, opt)
    poison_training_loss(monkeypatch, {0}, math.inf)
    train_step(stepper, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, state_of(model, opt), strict=True))
    counts = health.counters()
    assert counts["skipped_steps"] == 1 and counts["nonfinite_steps"] == 1
    train_step(stepper, 2)  # and the next step trains again
    assert not torch.equal(before[0], next(model.parameters()))


def test_an_injected_nan_loss_is_skipped_and_training_continues(tmp_path, corpus, tokenizer_path, monkeypatch):
    poison_training_loss(monkeypatch, {7})
    final = train(tmp_path, corpus, tokenizer_path, "--max_iters", "30", "--eval_interval", "30")
    rows = metrics(tmp_path)
    assert math.isfinite(final["val_loss"]) and final["val_loss"] < rows[0]["loss"] - 0.5
    last = [r for r in rows if "skipped_steps" in r][-1]
    assert last["step"] == 30 and last["nonfinite_steps"] == 1 and last["skipped_steps"] == 1
    assert all(torch.isfinite(t).all() for t in load_checkpoint(tmp_path / "ckpt.tar")["model"].values())


@pytest.mark.parametrize("tied", [True, False])
def test_layer_telemetry_equals_norms_computed_by_hand(tied, split):
    c = TrainConfig(batch_size=4, grad_clip=0.0, health_interval=1, lr=1e-2).replace(block_size=32,
                                                                                      tie_embeddings=tied)
    model, opt, health = tiny_setup(c)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for it in range(2):  # at step 1 AdamW has moments: an ordinary update
        x, y = NextToken().batch(split, 4, 32, batch_rng(0, 0, it))
        _, loss = model(x, y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        norm = torch.nn.utils.get_total_norm(list(grads.values()))
        assert health.before_update(it, loss.detach(), norm, opt, scaler)
        opt.step()
        health.after_update(it, opt)
        opt.zero_grad(set_to_none=True)
        row = health.take_row()
    layers = {"embed": ("wte.", "wpe."), "block0": ("blocks.0.",), "block1": ("blocks.1.",),
              "head": ("ln_f.", "lm_head.")}
    for layer, prefixes in layers.items():
        names = [n for n in grads if n.startswith(prefixes)]
        grad = torch.cat([grads[n].flatten() for n in names]).norm()
        weight = torch.cat([before[n].flatten() for n in names]).norm()
        delta = torch.cat([(dict(model.named_parameters())[n].detach() - before[n]).flatten() for n in names]).norm()
        assert row[f"grad_norm/{layer}"] == pytest.approx(grad.item(), rel=1e-5)
        assert row[f"weight_norm/{layer}"] == pytest.approx(weight.item(), rel=1e-5)
        assert row[f"update_ratio/{layer}"] == pytest.approx((delta / weight).item(), rel=1e-4)
    assert ("lm_head.weight" in grads) == (not tied)  # tied: the head's matrix is counted under embed


def spike_lr_at(monkeypatch, step: int) -> None:
    """One step at 1000x the learning rate: the loss spikes on the next step and stays up."""
    real = playground.learning_rate
    monkeypatch.setattr(playground, "learning_rate", lambda it, m, c: real(it, m, c) * (1000 if it == step else 1))


def test_rollback_undoes_an_injected_spike_that_ruins_an_unprotected_run(tmp_path, corpus, tokenizer_path,
                                                                         monkeypatch):
    monkeypatch.setattr(health_module, "SPIKE_WINDOW", 20)  # judge spikes after 20 steps, not 50
    common = ("--max_iters", "60", "--eval_interval", "60")
    clean = train(tmp_path, corpus, tokenizer_path, *common, name="clean")["val_loss"]
    spike_lr_at(monkeypatch, 40)
    with pytest.raises(Diverged, match="final loss at step 60 is"):  # skipping cannot undo the damaging step
        train(tmp_path, corpus, tokenizer_path, *common, "--on_spike", "skip", name="skip")
    assert not (tmp_path / "skip.tar").exists()  # the blown-up weights are not saved as if good
    rolled = train(tmp_path, corpus, tokenizer_path, *common, "--on_spike", "rollback", "--snapshot_interval", "20",
                   name="rollback")["val_loss"]
    assert rolled == pytest.approx(clean, abs=0.05)
    events = [r for r in metrics(tmp_path, "rollback") if r.get("event") == "rollback"]
    assert [(e["step"], e["to_step"]) for e in events] == [(45, 40)]  # seen at the next log step
    assert metrics(tmp_path, "rollback")[-2]["rollbacks"] == 1


def test_resume_after_a_rollback_with_an_ema_is_bit_exact(tmp_path, corpus, tokenizer_path, monkeypatch):
    """Rollback at step 45 (lr halved until 65), EMA on; the step-50 checkpoint resumed to 60 ends with the same
    weights, average, health state and losses as the run that went straight through."""
    monkeypatch.setattr(health_module, "SPIKE_WINDOW", 20)
    spike_lr_at(monkeypatch, 40)
    args = ("--max_iters", "60", "--eval_interval", "30", "--checkpoint_interval", "25", "--snapshot_interval", "20",
            "--on_spike", "rollback", "--rollback_lr_factor", "0.5", "--ema_decay", "0.9")
    real_save = checkpoint_module.save_checkpoint

    def save_and_keep_step_50(state, path):
        real_save(state, path)
        if state["iteration"] == 50:
            shutil.copy(path, tmp_path / "step50.tar")

    monkeypatch.setattr(playground, "save_checkpoint", save_and_keep_step_50)
    train(tmp_path, corpus, tokenizer_path, *args)
    monkeypatch.setattr(playground, "save_checkpoint", real_save)
    straight = load_checkpoint(tmp_path / "ckpt.tar")
    assert straight["health"]["rollbacks"] == 1 and "ema_val_loss" in metrics(tmp_path)[-1]
    c, set_by_flags = parse_config(["--resume", "--checkpoint", str(tmp_path / "step50.tar"),
                                    "--out_dir", str(tmp_path / "runs")])
    playground.train(c, set_by_flags)
    resumed = load_checkpoint(tmp_path / "step50.tar")
    for part in ("model", "ema"):
        assert all(torch.equal(t, resumed[part][name]) for name, t in straight[part].items()), part
    assert torch.equal(straight["health"]["detector"]["losses"], resumed["health"]["detector"]["losses"])
    losses = {r["step"]: r["loss"] for r in metrics(tmp_path) if "loss" in r and r["step"] > 50}
    assert losses == {r["step"]: r["loss"] for r in metrics(tmp_path, "step50") if "loss" in r and r["step"] > 50}


def test_the_average_is_what_checkpoint_users_get_unless_they_ask_for_the_raw_weights(tmp_path, corpus,
                                                                                       tokenizer_path):
    train(tmp_path, corpus, tokenizer_path, "--max_iters", "10", "--eval_interval", "10", "--ema_decay", "0.9")
    ckpt = load_checkpoint(tmp_path / "ckpt.tar")
    averaged, _ = model_from_checkpoint(ckpt)
    raw, _ = model_from_checkpoint(ckpt, raw_weights=True)
    assert torch.equal(averaged.wte.weight, ckpt["ema"]["wte.weight"])
    assert torch.equal(raw.wte.weight, ckpt["model"]["wte.weight"])
    assert not torch.equal(averaged.wte.weight, raw.wte.weight)
    with pytest.raises(UsageError, match="--ema_decay 0: .* holds a moving average of the weights"):
        train(tmp_path, corpus, tokenizer_path, "--resume", "--max_iters", "12", "--ema_decay", "0")


SPIKED_PLAYGROUND = '''import sys
sys.path.insert(0, {repo!r})
import playground
from gptlab import health
health.SPIKE_WINDOW = 20
real = playground.learning_rate
playground.learning_rate = lambda it, m, c: real(it, m, c) * (1000 if it == 40 else 1)
playground.run_cli(playground.main)
'''


def test_two_ranks_roll_back_as_one_process_does(tmp_path, corpus, tokenizer_path):
    """Under DDP (2 gloo ranks) the spike is judged on the loss averaged over the ranks, so both ranks roll back at
    the same step, and the run equals one process with the same global batch: same losses, events, weights and
    per-layer gradient norms and update ratios."""
    from test_distributed import REPO, assert_same_weights, run, torchrun
    script = tmp_path / "spiked_playground.py"
    script.write_text(SPIKED_PLAYGROUND.format(repo=str(REPO)))
    common = [str(corpus), "--tokenizer", str(tokenizer_path), *TINY, "--device", "cpu", "--batch_size", "4",
              "--max_iters", "50", "--eval_interval", "50", "--snapshot_interval", "20", "--on_spike", "rollback",
              "--health_interval", "10"]
    for name, accum in (("one", "2"), ("two", "1")):
        args = [*common, "--grad_accum_steps", accum, "--out_dir", str(tmp_path / name / "runs"),
                "--checkpoint", str(tmp_path / name / "ckpt.tar")]
        launcher = [sys.executable] if name == "one" else torchrun(2)[:-1]  # torchrun(2) ends with playground.py
        run([*launcher, str(script), *args])
    rows = {name: [json.loads(line) for line in (tmp_path / name / "ckpt.metrics.jsonl").read_text()
                   .splitlines()] for name in ("one", "two")}
    events = {name: [(r["step"], r["to_step"]) for r in rows[name] if r.get("event") == "rollback"] for name in rows}
    assert events["one"] == events["two"] == [(45, 40)]
    for a, b in zip(rows["one"], rows["two"], strict=True):
        for key in a.keys() & b.keys():
            if key.startswith(("loss", "grad_norm", "update_ratio", "weight_norm", "spike_steps")):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert_same_weights(tmp_path / "one" / "ckpt.tar", tmp_path / "two" / "ckpt.tar", tol=1e-4)


NAN_AT_STEP_8_PLAYGROUND = '''import math, sys
sys.path.insert(0, {repo!r})
import playground
from gptlab.objectives import NextToken
real, calls = NextToken.loss, [0]

def loss(self, model, x, y):
    logits, out = real(self, model, x, y)
    calls[0] += model.training
    return logits, out * math.nan if model.training and calls[0] == 8 else out

NextToken.loss = loss
playground.run_cli(playground.main)
'''


def test_fsdp_ranks_roll_back_their_shards(tmp_path, corpus, tokenizer_path):
    """Under FSDP (2 gloo ranks) the snapshot holds each rank's shards and a rollback restores them in place."""
    from test_distributed import TINY as DISTRIBUTED
    from test_distributed import run, torchrun
    script = tmp_path / "nan_playground.py"
    script.write_text(NAN_AT_STEP_8_PLAYGROUND.format(repo=str(Path(playground.__file__).parent)))
    run([*torchrun(2)[:-1], str(script), str(corpus), "--tokenizer", str(tokenizer_path), *DISTRIBUTED, "--fsdp",
         "--batch_size", "2", "--max_iters", "10", "--eval_interval", "10", "--on_spike", "rollback",
         "--snapshot_interval", "5", "--health_interval", "0", "--out_dir", str(tmp_path / "runs"),
         "--checkpoint", str(tmp_path / "ckpt.tar")])
    rows = [json.loads(line) for line in (tmp_path / "ckpt.metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["to_step"]) for r in rows if r.get("event") == "rollback"] == [(8, 5)]
    assert all(torch.isfinite(t).all() for t in load_checkpoint(tmp_path / "ckpt.tar")["model"].values())


def test_the_benchmark_times_the_guard_and_the_telemetry_it_is_asked_for():
    """bench.py train --health_interval N steps through the training loop's guard (every step counted) and
    records telemetry on every N-th step; without the flag the step has no guard at all."""
    from gptlab.speed import trainer

    config = GPTConfig(vocab_size=64, block_size=16, embedding_dim=32, num_of_layers=2, num_of_heads=2, dropout=0.0)
    bare, guarded = trainer(config, 4, CPU), trainer(config, 4, CPU, health_interval=2)
    rows = []
    for _ in range(4):
        bare.step()
        guarded.step()
        rows.append(guarded.health.take_row())
    assert bare.health is None
    assert int(guarded.health.counts[0]) == 4  # COUNTS[0]: steps judged
    assert [bool(r) for r in rows] == [False, True, False, True]
    assert {"grad_norm/block0", "update_ratio/head"} <= set(rows[1])


def test_a_blow_up_far_above_the_first_loss_is_a_spike_from_the_first_step():
    """Before the window of SPIKE_WINDOW losses is full, a loss far above the run's first one is judged at once
    (and never joins the window); an ordinary rise is not."""
    detector = health_module.SpikeDetector(6.0, torch.device("cpu"))
    judged = [tuple(bool(b) for b in detector.observe(torch.tensor(x))) for x in (5.7, 7.0, 45_000.0, 5.0, 1e9)]
    assert judged == [(False, False), (False, False), (True, True), (False, False), (True, True)]
    assert 45_000.0 not in detector.losses.tolist() and int(detector.written) == 3


def test_updates_being_skipped_are_shown_and_a_run_whose_final_loss_is_nan_is_neither_saved_nor_a_success(
        tmp_path, corpus, tokenizer_path, monkeypatch, capsys):
    poison_training_loss(monkeypatch, set(range(1, 100)))  # every step after the first
    with pytest.raises(Diverged, match=r"final loss at step 5 is nan \(4 updates were skipped\).*; no checkpoint of "
                                       r"this run was written"):
        train(tmp_path, corpus, tokenizer_path, "--max_iters", "5", "--eval_interval", "5")
    assert "step 5: 4 of the last 5 updates skipped (4 non-finite, 0 loss spikes)" in capsys.readouterr().out
    assert not (tmp_path / "ckpt.tar").exists()


def test_a_diverged_run_stops_saying_truthfully_which_checkpoint_is_left(tmp_path, corpus, tokenizer_path,
                                                                        monkeypatch):
    monkeypatch.setattr(health_module, "SPIKE_WINDOW", 10)
    poison_training_loss(monkeypatch, set(range(3, 100)))  # steps 4 on
    with pytest.raises(Diverged, match=r"the last 1\d steps up to step 1\d all had a non-finite loss.*ckpt.tar holds "
                                       r"step 2, the last saved with a sound loss"):
        train(tmp_path, corpus, tokenizer_path, "--max_iters", "100", "--checkpoint_interval", "2")
    assert load_checkpoint(tmp_path / "ckpt.tar")["iteration"] == 2  # steps 4.. had NaN losses: never saved


def test_on_spike_stop_says_no_checkpoint_was_written_when_none_was(tmp_path, corpus, tokenizer_path, monkeypatch):
    poison_training_loss(monkeypatch, {1})
    with pytest.raises(Diverged, match=r"1 bad step\(s\) .* by step 5, and --on_spike stop; no checkpoint of this run "
                                       r"was written$"):
        train(tmp_path, corpus, tokenizer_path, "--max_iters", "10", "--on_spike", "stop")


def test_a_diverged_run_exits_3_not_2_which_means_a_mistake(capsys):
    def diverging() -> None:
        raise Diverged("the run diverged")

    with pytest.raises(SystemExit) as e:
        run_cli(diverging)
    assert e.value.code == DIVERGED_EXIT == 3 and capsys.readouterr().err == "stopped: the run diverged\n"
