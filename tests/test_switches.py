"""A model switch cannot be half-added: every GPTConfig switch, at each of its values, builds a model whose training
step the memory model estimates within its validated error (tests/test_memory.py), that the exporter either
exports (the weights map back to the same logits) or refuses naming the switch, and whose health telemetry runs
(the attention logit it reports is the largest one the attention computes). A new setting is either a size or
a switch with its values listed here. docs/architecture.md's "Adding a switch" checklist is what this enforces.

Tiny models (1 layer, 32 wide, block 32) and one training step per configuration keep it to seconds."""

import dataclasses
import functools
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from test_memory import estimated_peak, measured_peak, random_split

import attention
from config import TrainConfig
from gpt import GPT, GPTConfig
from gptlab.convert import FREE, TARGETS, architecture_for, as_flag, gpt2_to_ours, llama_to_ours, to_hf_state_dict
from gptlab.errors import UsageError
from gptlab.health import Health
from gptlab.objectives import NextToken
from gptlab.runtime import Runtime
from gptlab.training import Stepper, make_optimizer, train_step

# Settings that size the model rather than switch what it computes: any value of theirs works the same way.
SIZES = {"vocab_size", "block_size", "embedding_dim", "num_of_layers", "num_of_heads", "dropout", "rope_base"}
# Switches whose values their declaration does not list (a number): the values to check, off first.
NUMERIC = {"logit_softcap": (0.0, 30.0)}
SHAPE = {"vocab_size": 128, "block_size": 32, "embedding_dim": 32, "num_of_layers": 1, "num_of_heads": 2,
         "dropout": 0.0}
CPU = Runtime(torch.device("cpu"), torch.float32)


def values_of(f: dataclasses.Field) -> tuple[Any, ...] | None:
    """The values of a switch: its declared choices, both of a bool, or those NUMERIC lists; None: unknown."""
    if f.metadata["choices"]:
        return f.metadata["choices"]
    if isinstance(f.default, bool):
        return (False, True)
    return NUMERIC.get(f.name)


SWITCHES = [(f.name, value) for f in dataclasses.fields(GPTConfig) if f.name not in SIZES
            for value in values_of(f) or ()]


def base_for(name: str, value: Any) -> dict[str, Any]:
    """The settings of the first export target that computes this value (so a value that some target exports is
    exported), or GPT-2's defaults where none does."""
    for allowed in TARGETS.values():
        if value in allowed.get(name, ()):
            return {key: values[0] for key, values in allowed.items()}
    return {}


def test_every_model_setting_is_a_size_or_a_switch_with_its_values():
    unknown = [f.name for f in dataclasses.fields(GPTConfig) if f.name not in SIZES and values_of(f) is None]
    assert not unknown, f"list these settings in SIZES or give their values in NUMERIC: {unknown}"
    assert {name for name, _ in SWITCHES} >= {"position", "norm", "mlp", "qk_norm", "tie_embeddings", "causal"}


@functools.cache
def check_model(point: tuple[tuple[str, Any], ...]) -> None:
    """All four checks for one configuration (several switch values share the GPT-2 defaults: checked once)."""
    settings = dict(point)
    config = GPTConfig(**settings)
    torch.manual_seed(0)
    model = GPT(config)
    check_memory(settings)
    check_export(model)
    check_telemetry(model)


def check_memory(settings: dict[str, Any]) -> None:
    point = {**settings, "B": 2}
    measured, estimate = measured_peak(point), estimated_peak(point)
    assert estimate.peak == pytest.approx(measured, rel=0.05), f"{estimate}"  # test_memory.py's validated error


def check_export(model: GPT) -> None:
    """Refused: the refusal names each setting no target computes. Exported: the weights map back unchanged."""
    c = model.config
    try:
        target = architecture_for(c)
    except UsageError as e:
        unexportable = [f.name for f in dataclasses.fields(c) if f.name not in FREE
                        and all(getattr(c, f.name) not in allowed.get(f.name, ()) for allowed in TARGETS.values())]
        assert unexportable and all(as_flag(name, getattr(c, name)) in str(e) for name in unexportable), str(e)
        return
    hf = to_hf_state_dict(model)
    back = gpt2_to_ours(hf, c) if target == "gpt2" else llama_to_ours(hf, c)
    twin = GPT(c)
    twin.load_state_dict(back)
    x = torch.randint(0, c.vocab_size, (2, c.block_size))
    torch.testing.assert_close(twin.eval()(x)[0], model.eval()(x)[0], rtol=0, atol=0)


def check_telemetry(model: GPT) -> None:
    """One training step's per-layer telemetry, and its attention logit against the attention's own scores: the
    reference path (scratch core, same weights) records the largest logit it lets through its mask."""
    c = TrainConfig(model=model.config, health_interval=1, warmup_iters=0, batch_size=2)
    optimizer = make_optimizer(model, c, CPU.device)
    health = Health(model, optimizer, c, CPU)
    with tempfile.TemporaryDirectory() as folder:
        split = random_split(Path(folder), model.config.vocab_size)
        train_step(Stepper(model.train(), optimizer, torch.amp.GradScaler("cpu", enabled=False), split, c, CPU,
                           NextToken(), health=health), 0)
    row = health.take_row()
    assert all(math.isfinite(v) for v in row.values())
    assert {"grad_norm/block0", "update_ratio/block0", "act_rms/head", "attn_logit_max/block0"} <= set(row), sorted(row)
    x = torch.randint(0, model.config.vocab_size, (2, model.config.block_size))
    health.probe(x)
    row = health.take_row()
    reference = GPT(dataclasses.replace(model.config, attention="scratch"))
    reference.load_state_dict(model.state_dict())
    seen: list[float] = []
    real = attention.scratch_attention

    def spy(q, k, v, mask, dropout):
        scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.size(-1))
        seen.append((scores if mask is None else scores.masked_fill(~mask, -math.inf)).max().item())
        return real(q, k, v, mask, dropout)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "scratch_attention", spy)
        with torch.no_grad():
            reference.eval()(x)
    assert [row[f"attn_logit_max/block{i}"] for i in range(len(seen))] == pytest.approx(seen, rel=1e-5)


@pytest.mark.parametrize(("name", "value"), SWITCHES, ids=[f"{n}={v}" for n, v in SWITCHES])
def test_each_switch_value_builds_is_estimated_exported_or_refused_and_measured(name, value):
    settings = {**SHAPE, **base_for(name, value), name: value}
    check_model(tuple(sorted(settings.items())))
    if value == GPTConfig.__dataclass_fields__[name].default:  # the defaults are GPT-2 exactly: they export as it
        assert architecture_for(GPTConfig(**settings)) == "gpt2"
