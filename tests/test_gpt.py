"""gpt.py: generation (cache == no cache, sampling rules), GPT-2 conversion both ways, learning,
initialisation, weight-decay groups, and configuration errors."""

import math

import pytest
import torch

from gpt import GPT, GPTConfig, sample_next
from gptlab.convert import gpt2_to_ours, to_hf_gpt2_state_dict


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    defaults = dict(vocab_size=50, block_size=16, embedding_dim=32, num_of_layers=2, num_of_heads=2, dropout=0.0)
    return GPT(GPTConfig(**{**defaults, **kw})).eval()


# ---------------------------------------------------------------------- generation

@pytest.mark.parametrize("prompt_len", [3, 16, 23])  # short, exactly block_size, longer than block_size
@pytest.mark.parametrize("attention", ["sdpa", "scratch"])
def test_greedy_with_cache_equals_greedy_without_across_the_block_boundary(prompt_len, attention):
    model = tiny(attention=attention)
    prompt = torch.randint(0, 50, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    cached = model.generate(prompt, 50, temperature=0, use_cache=True)  # crosses block_size 16 several times
    uncached = model.generate(prompt, 50, temperature=0, use_cache=False)
    assert cached.shape == (2, prompt_len + 50)
    assert torch.equal(cached, uncached)


def test_no_cache_window_is_the_documented_one():
    """Without a cache, each step's logits are the model's on the window the docstring describes."""
    model = tiny()
    idx = torch.randint(0, 50, (1, 5))
    out = model.generate(idx, 30, temperature=0, use_cache=False)
    start = 0
    for length in range(5, 35):
        if length - start > 16:
            start = length - 8  # keep the last block_size // 2 tokens
        logits, _ = model(out[:, start:length])
        assert out[0, length] == logits[0, -1].argmax()


def test_sampling_is_deterministic_under_a_seeded_generator():
    model = tiny()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    runs = [model.generate(prompt, 20, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_stops_at_end_of_text_and_finished_rows_keep_emitting_it():
    model = tiny()
    prompt = torch.zeros(3, 1, dtype=torch.long)
    greedy = model.generate(prompt[:1], 10, temperature=0)
    eos = int(greedy[0, 3])  # make the 3rd generated token the end-of-text
    out = model.generate(prompt[:1], 10, temperature=0, eos_id=eos)
    first_eos = int((greedy[0, 1:] == eos).nonzero()[0])
    assert out.shape[1] == 1 + first_eos + 1  # stopped right after producing it
    sampled = model.generate(prompt, 40, temperature=1.0, eos_id=eos, generator=torch.Generator().manual_seed(0))
    for row in sampled[:, 1:]:
        hits = (row == eos).nonzero()
        if len(hits):
            assert (row[int(hits[0]):] == eos).all()


def test_temperature_zero_and_top_k_one_are_argmax():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(sample_next(logits, temperature=1.5, top_k=1, generator=g), logits.argmax(-1))


def test_top_p_keeps_only_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(probs.log(), top_p=0.7, generator=g) for _ in range(2000)])
    assert set(draws.unique().tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3: the nucleus is {0, 1}
    assert 0.55 < (draws == 0).float().mean() < 0.70  # renormalised: 0.5 / 0.8 = 0.625
    draws = torch.stack([sample_next(probs.log(), top_p=0.4, generator=g) for _ in range(200)])
    assert set(draws.unique().tolist()) == {0}  # the top token alone already covers 0.4
    logits = torch.randn(3, 20, generator=g)
    assert torch.equal(sample_next(logits, top_p=0.0, generator=g), logits.argmax(-1))  # never an empty set


def test_top_k_keeps_only_the_k_most_likely():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, top_k=2, generator=g)) for _ in range(300)}
    assert draws == {1, 3}


# ---------------------------------------------------------------------- Hugging Face GPT-2

def hf_gpt2() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=50,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).eval()


def our_config_for_hf() -> GPTConfig:
    return GPTConfig(vocab_size=50, block_size=32, embedding_dim=32, num_of_layers=2, num_of_heads=2, dropout=0.0)


def test_hf_gpt2_weights_give_the_same_logits_in_our_model():
    hf = hf_gpt2()
    ours = GPT(our_config_for_hf())
    ours.load_state_dict(gpt2_to_ours(hf.state_dict(), our_config_for_hf()))
    ours.eval()
    idx = torch.randint(0, 50, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-4, rtol=1e-4)


def test_our_weights_load_into_hf_gpt2_with_the_same_logits():
    torch.manual_seed(1)
    ours = GPT(our_config_for_hf()).eval()
    hf = hf_gpt2()
    missing, unexpected = hf.load_state_dict(to_hf_gpt2_state_dict(ours), strict=False)
    assert unexpected == []
    assert all(k.endswith((".attn.bias", ".attn.masked_bias")) for k in missing)  # buffers, not weights
    idx = torch.randint(0, 50, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------- learning, init, optimiser groups

def test_a_tiny_model_overfits_one_batch():
    model = tiny().train()
    x = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)
    optimizer = torch.optim.AdamW(model.optimizer_groups(0.0), lr=3e-3)
    for _ in range(200):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05  # from ln(50) = 3.9


def test_targets_of_minus_one_are_ignored():
    model = tiny()
    x = torch.randint(0, 50, (1, 8))
    y = torch.randint(0, 50, (1, 8))
    masked = y.clone()
    masked[0, 4:] = -1
    logits, loss = model(x, masked)
    expected = torch.nn.functional.cross_entropy(logits[0, :4], y[0, :4])
    torch.testing.assert_close(loss, expected)


def test_gpt2_init_scales_residual_projections():
    model = GPT(GPTConfig(vocab_size=500, block_size=64, embedding_dim=256, num_of_layers=8, num_of_heads=4))
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    scaled = 0.02 / math.sqrt(2 * 8)
    assert model.blocks[3].attn.proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert model.blocks[3].mlp.proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert (model.blocks[0].attn.qkv.bias == 0).all()
    default = GPT(GPTConfig(vocab_size=500, block_size=64, embedding_dim=256, num_of_layers=8, num_of_heads=4,
                            init="pytorch"))
    assert default.wte.weight.std().item() == pytest.approx(1.0, rel=0.05)  # nn.Embedding's N(0, 1)
    assert (default.blocks[0].attn.qkv.bias != 0).any()


def test_weight_decay_groups():
    model = tiny(num_of_layers=1)
    decay, no_decay = model.decay_parameter_names()
    assert decay == ["wte.weight", "wpe.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
                     "blocks.0.mlp.fc.weight", "blocks.0.mlp.proj.weight"]  # lm_head is wte: counted once
    assert no_decay == ["blocks.0.ln_1.weight", "blocks.0.ln_1.bias", "blocks.0.attn.qkv.bias",
                        "blocks.0.attn.proj.bias", "blocks.0.ln_2.weight", "blocks.0.ln_2.bias",
                        "blocks.0.mlp.fc.bias", "blocks.0.mlp.proj.bias", "ln_f.weight", "ln_f.bias"]
    groups = model.optimizer_groups(0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_post_layernorm_variant_differs_and_has_no_final_norm():
    pre, post = tiny(), tiny(norm_position="post")
    assert isinstance(post.ln_f, torch.nn.Identity)
    post.load_state_dict({k: v for k, v in pre.state_dict().items() if not k.startswith("ln_f")})
    idx = torch.randint(0, 50, (1, 8))
    assert not torch.allclose(pre(idx)[0], post(idx)[0])


def test_parameter_count_and_flops():
    model = tiny()
    n = sum(p.numel() for p in model.parameters())
    assert model.num_parameters(non_embedding=False) == n
    assert model.num_parameters() == n - 16 * 32
    assert model.flops_per_token() == 6 * model.num_parameters() + 12 * 2 * 16 * 32


@pytest.mark.parametrize("kw, message", [
    (dict(embedding_dim=30, num_of_heads=4), "not divisible"),
    (dict(attention="flash"), "attention must be one of"),
    (dict(norm_position="middle"), "norm_position must be one of"),
    (dict(block_size=0), "block_size must be a positive integer"),
    (dict(init="xavier"), "init must be one of"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(dropout=float("nan")), "dropout must be a finite number"),
])
def test_invalid_config_is_a_value_error(kw, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{"vocab_size": 10, **kw})


def test_sequence_longer_than_block_size_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


# ---------------------------------------------------------------------- encoder (causal=False)

def test_encoder_position_0_sees_the_last_token_and_the_decoder_does_not():
    idx = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[0, -1] = (idx[0, -1] + 1) % 50
    for causal, should_change in ((False, True), (True, False)):
        model = tiny(causal=causal)
        first, _ = model(idx)
        first_changed, _ = model(changed)
        assert (not torch.allclose(first[0, 0], first_changed[0, 0])) == should_change


def test_encoder_ignores_padding_tokens():
    model = tiny(causal=False)
    idx = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(1))
    real = torch.tensor([[True] * 9 + [False] * 3])
    other_padding = idx.clone()
    other_padding[0, 9:] = 7
    a, _ = model(idx, padding_mask=real)
    b, _ = model(other_padding, padding_mask=real)
    torch.testing.assert_close(a[:, :9], b[:, :9], atol=0, rtol=0)


def test_an_encoder_does_not_generate():
    with pytest.raises(ValueError, match="does not generate"):
        tiny(causal=False).generate(torch.zeros(1, 1, dtype=torch.long), 3)
