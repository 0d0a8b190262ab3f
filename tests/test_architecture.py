"""The architecture switches of GPTConfig (position, norm, mlp, qk_norm, tie_embeddings, logit_softcap): each
piece equals its formula, both attention cores agree with every switch, causal models never look ahead,
cached generation equals uncached generation (rotary models: sliding-window attention, far past block_size),
parameter accounting, and the defaults are still GPT-2 exactly."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attention
import gpt
from attention import KVCache, MultiHeadAttention, RMSNorm, apply_rope, attention_mask, rope_cos_sin
from gpt import GPT, MLP, GPTConfig, SwiGLU, swiglu_hidden_size

SWITCHES = {  # one switch at a time, then all of them together
    "rope": dict(position="rope"),
    "nope": dict(position="none"),
    "rmsnorm": dict(norm="rmsnorm"),
    "swiglu": dict(mlp="swiglu"),
    "relu2": dict(mlp="relu2"),
    "qk_norm": dict(qk_norm=True),
    "untied": dict(tie_embeddings=False),
    "softcap": dict(logit_softcap=2.0),
    "all": dict(position="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, tie_embeddings=False,
                logit_softcap=2.0, bias=False),
}
BIDIRECTIONAL = [name for name in SWITCHES if name != "nope"]  # NoPE needs a causal mask to know order


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    defaults = dict(vocab_size=50, block_size=16, embedding_dim=32, num_of_layers=2, num_of_heads=2, dropout=0.0)
    return GPT(GPTConfig(**{**defaults, **kw})).eval()


def twin_models(**kw) -> tuple[GPT, GPT]:
    """The same weights, one model per attention core."""
    scratch, sdpa = tiny(attention="scratch", **kw), tiny(attention="sdpa", **kw)
    sdpa.load_state_dict(scratch.state_dict())
    return scratch, sdpa


def logits_and_grads(model: GPT, idx: torch.Tensor, **kw) -> list[torch.Tensor]:
    model.zero_grad()
    logits, _ = model(idx, **kw)
    (logits * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum().backward()  # touches every logit
    return [logits.detach()] + [p.grad for p in model.parameters()]


def assert_same_logits_and_grads(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    """Logits element by element; each gradient as a whole (relative norm), since a bias gradient sums
    thousands of terms of either sign, whose float32 rounding can exceed 1e-5 on a single small element."""
    torch.testing.assert_close(ours[0], ref[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(ours[1:], ref[1:], strict=True):
        assert (a - b).norm() <= 1e-5 * b.norm()


# ---------------------------------------------------------------------- both cores, causality, generation

@pytest.mark.parametrize("name, t", [(name, 16) for name in SWITCHES] + [("rope", 40), ("all", 40)])
def test_causal_scratch_equals_sdpa_in_logits_and_gradients(name, t):
    """t = 40 > block_size 16: rotary models attend over a sliding window, a banded mask."""
    scratch, sdpa = twin_models(**SWITCHES[name])
    idx = torch.randint(0, 50, (2, t), generator=torch.Generator().manual_seed(0))
    assert_same_logits_and_grads(logits_and_grads(scratch, idx), logits_and_grads(sdpa, idx))


@pytest.mark.parametrize("name", BIDIRECTIONAL)
def test_bidirectional_scratch_equals_sdpa_with_padding(name):
    scratch, sdpa = twin_models(causal=False, **SWITCHES[name])
    idx = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    padding = torch.tensor([[True] * 12, [True] * 7 + [False] * 5])
    assert_same_logits_and_grads(logits_and_grads(scratch, idx, padding_mask=padding),
                                 logits_and_grads(sdpa, idx, padding_mask=padding))


@pytest.mark.parametrize("name", SWITCHES)
def test_cached_pieces_equal_the_whole_sequence_in_both_cores(name):
    """Prefill 5 tokens, then 1, 4, 1 more through the KV cache: the final hidden states of the full
    sequence, in either core."""
    scratch, sdpa = twin_models(**SWITCHES[name])
    idx = torch.randint(0, 50, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = scratch.hidden_states(idx)
        for model in (scratch, sdpa):
            caches, pieces, start = model.new_caches(2, idx.device, torch.float32), [], 0
            for size in (5, 1, 4, 1):
                pieces.append(model.hidden_states(idx[:, start:start + size], caches=caches, start_pos=start))
                start += size
            torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", SWITCHES)
def test_a_causal_model_never_looks_ahead(name):
    model = tiny(**SWITCHES[name])
    idx = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(3))
    changed = idx.clone()
    changed[0, 7] = (idx[0, 7] + 1) % 50
    before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(before[:, :7], after[:, :7], atol=0, rtol=0)
    assert not torch.allclose(before[:, 7:], after[:, 7:])


@pytest.mark.parametrize("name", [*SWITCHES, "rope-scratch"])
@pytest.mark.parametrize("prompt_len", [3, 23])  # shorter and longer than block_size 16
def test_greedy_with_cache_equals_greedy_without_far_past_block_size(name, prompt_len):
    model = tiny(attention="scratch", position="rope") if name == "rope-scratch" else tiny(**SWITCHES[name])
    prompt = torch.randint(0, 50, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    cached = model.generate(prompt, 60, temperature=0, use_cache=True)  # 60 new tokens: up to 5x block_size
    uncached = model.generate(prompt, 60, temperature=0, use_cache=False)
    assert cached.shape == (2, prompt_len + 60)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("name", ["rope", "all"])
@pytest.mark.parametrize("core", ["scratch", "sdpa"])
def test_rotary_cache_slides_through_a_long_text_like_sliding_window_attention(name, core):
    """40 tokens (block_size 16) fed one at a time through the sliding caches give the hidden states of the
    whole text at once, where every token attends to itself and the 15 before it, in every layer."""
    model = tiny(attention=core, **SWITCHES[name])
    idx = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model.hidden_states(idx)
        caches = model.new_caches(2, idx.device, torch.float32)
        steps = [model.hidden_states(idx[:, i:i + 1], caches=caches, start_pos=i) for i in range(40)]
    assert caches[0].length == 16
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_a_rotary_tokens_state_depends_on_layers_times_window_tokens_back():
    """With 2 layers and block_size 16 the last token's state depends on the last 2 * 15 + 1 = 31 tokens,
    and not on the one before: what generation without a cache recomputes."""
    model = tiny(position="rope")
    idx = torch.randint(0, 50, (1, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        last = model.hidden_states(idx)[:, -1]
        torch.testing.assert_close(model.hidden_states(idx[:, -31:], start_pos=9)[:, -1], last, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model.hidden_states(idx[:, -30:], start_pos=10)[:, -1], last, atol=1e-4)
        changed = idx.clone()
        changed[0, 8] = (idx[0, 8] + 1) % 50  # 31 tokens before the last: out of reach
        torch.testing.assert_close(model.hidden_states(changed)[:, -1], last, atol=0, rtol=0)


def test_sliding_window_mask_is_a_band():
    """Query i (at position S - T + i) sees key j exactly when 0 <= (S - T + i) - j < window."""
    for t, s, window in [(5, 5, 3), (4, 9, 4), (1, 7, 7), (1, 8, 7), (6, 6, 10)]:
        mask = attention_mask(t, s, True, None, torch.device("cpu"), window)
        expected = torch.tensor([[0 <= (s - t + i) - j < window for j in range(s)] for i in range(t)])
        assert torch.equal(mask[0, 0], expected) if mask is not None else bool(expected.all())
    assert attention_mask(4, 4, False, None, torch.device("cpu"), 2) is None  # the window is for causal models


def test_rotary_logits_depend_on_relative_positions_only():
    """Shifting every position by the same amount changes nothing (up to rounding): why the rotary cache
    may slide instead of being rebuilt."""
    model = tiny(position="rope")
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model.hidden_states(idx, start_pos=1000), model.hidden_states(idx),
                                   atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="block_size"):  # a bidirectional rotary model has no sliding window
        tiny(position="rope", causal=False)(torch.zeros(1, 17, dtype=torch.long))


def test_a_sliding_cache_keeps_the_newest_positions_in_order():
    cache = KVCache(1, 1, 4, 2, torch.device("cpu"), torch.float32, slide=True)
    for step in range(6):
        value = torch.full((1, 1, 1, 2), float(step))
        k, v = cache.append(value, -value)
    assert cache.length == 4 and k[0, 0, :, 0].tolist() == [2.0, 3.0, 4.0, 5.0]
    assert v[0, 0, :, 0].tolist() == [-2.0, -3.0, -4.0, -5.0]
    with pytest.raises(ValueError, match="one token at a time"):  # a chunk would push out keys it needs
        cache.append(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    fixed = KVCache(1, 1, 4, 2, torch.device("cpu"), torch.float32)
    fixed.append(torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2))
    with pytest.raises(ValueError, match="holds 4 positions"):
        fixed.append(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))


def test_learned_positions_keep_the_jumping_window():
    """Learned positions: the window still jumps to the last block_size // 2 tokens (and the cache is rebuilt)."""
    model = tiny()
    assert not model.new_caches(1, torch.device("cpu"), torch.float32)[0].slide
    out = model.generate(torch.randint(0, 50, (1, 5)), 30, temperature=0)
    start = 0
    for length in range(5, 35):
        if length - start > 16:
            start = length - 8
        assert out[0, length] == model(out[:, start:length])[0][0, -1].argmax()


# ---------------------------------------------------------------------- each piece equals its formula

def test_rope_rotates_each_feature_pair_by_position_times_frequency():
    """Reference: pair i = (x[i], x[i + D/2]) as the complex number x[i] + j x[i + D/2], multiplied by
    exp(j * position * base^(-2i/D))."""
    b, h, t, d = 2, 3, 5, 8
    x = torch.randn(b, h, t, d, dtype=torch.float64)
    positions = torch.tensor([0, 1, 7, 100, 12345])
    cos, sin = rope_cos_sin(positions, d, base=500.0)
    ours = apply_rope(x.float(), cos, sin).double()
    freqs = 500.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    turn = torch.polar(torch.ones(t, d // 2, dtype=torch.float64), positions[:, None].double() * freqs)
    z = torch.complex(x[..., :d // 2], x[..., d // 2:]) * turn
    torch.testing.assert_close(ours, torch.cat([z.real, z.imag], dim=-1), atol=1e-4, rtol=1e-4)


def test_rotated_dot_products_depend_on_the_distance_only():
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m: int, n: int) -> torch.Tensor:
        cq, sq = rope_cos_sin(torch.tensor([m]), 16)
        ck, sk = rope_cos_sin(torch.tensor([n]), 16)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(9, 4), score(105, 100), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(9, 4), score(9, 5))


def test_rmsnorm_equals_its_formula():
    norm = RMSNorm(24)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24))
    x = torch.randn(3, 5, 24) * 4 + 1
    expected = x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_qk_norm_normalises_each_heads_queries_and_keys():
    """With QK-norm (gains 1), every head's query and key vectors have RMS 1 before the dot product: the
    scratch core sees them, so capture them there."""
    module = MultiHeadAttention(32, 4, attention="scratch", qk_norm=True)
    seen = {}
    original = attention.scratch_attention

    def spy(q, k, v, mask, dropout):
        seen["q"], seen["k"] = q, k
        return original(q, k, v, mask, dropout)

    attention.scratch_attention = spy
    try:
        module(torch.randn(2, 6, 32) * 10)
    finally:
        attention.scratch_attention = original
    for t in (seen["q"], seen["k"]):
        torch.testing.assert_close(t.pow(2).mean(-1), torch.ones(2, 4, 6), atol=1e-3, rtol=1e-3)
    assert [n for n, _ in module.named_parameters()] == ["qkv.weight", "qkv.bias", "proj.weight", "proj.bias",
                                                         "q_norm.weight", "k_norm.weight"]
    assert module.q_norm.weight.shape == (8,)  # one gain per head feature


def test_swiglu_equals_its_formula():
    config = GPTConfig(vocab_size=10, embedding_dim=48, num_of_heads=2, mlp="swiglu", dropout=0.0)
    torch.manual_seed(5)
    mlp = SwiGLU(config)
    x = torch.randn(2, 3, 48)
    z = x @ mlp.gate.weight.T + mlp.gate.bias
    silu = z * torch.sigmoid(z)
    expected = (silu * (x @ mlp.up.weight.T + mlp.up.bias)) @ mlp.proj.weight.T + mlp.proj.bias
    torch.testing.assert_close(mlp(x), expected)


def test_relu_squared_mlp_equals_its_formula():
    config = GPTConfig(vocab_size=10, embedding_dim=48, num_of_heads=2, mlp="relu2", dropout=0.0)
    torch.manual_seed(6)
    mlp = MLP(config)
    x = torch.randn(2, 3, 48)
    hidden = (x @ mlp.fc.weight.T + mlp.fc.bias).clamp(min=0) ** 2
    torch.testing.assert_close(mlp(x), hidden @ mlp.proj.weight.T + mlp.proj.bias)


@pytest.mark.parametrize("e, h", [(384, 1024), (768, 2048), (32, 88), (64, 168), (100, 264), (3, 8)])
def test_swiglu_hidden_size_is_8e_over_3_rounded_to_a_multiple_of_8(e, h):
    assert swiglu_hidden_size(e) == h and h % 8 == 0
    assert abs(h - 8 * e / 3) <= 4 or h == 8  # the nearest multiple of 8 (never below 8)
    config = GPTConfig(vocab_size=10, embedding_dim=e, num_of_heads=1, mlp="swiglu", bias=False)
    swiglu_params = sum(p.numel() for p in SwiGLU(config).parameters())
    assert swiglu_params == 3 * e * h
    if e >= 24:  # about the GELU MLP's 8 E^2 weights: off by at most 3 E * 4
        gelu_params = sum(p.numel() for p in MLP(GPTConfig(vocab_size=10, embedding_dim=e, num_of_heads=1,
                                                           bias=False)).parameters())
        assert gelu_params == 8 * e * e and abs(swiglu_params - gelu_params) <= 12 * e


def test_softcap_bounds_the_logits_and_equals_its_formula(monkeypatch):
    capped, plain = tiny(logit_softcap=2.0), tiny()
    plain.load_state_dict(capped.state_dict())
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        plain.lm_head.weight.mul_(10.0)  # raw logits beyond the cap
        capped.lm_head.weight.mul_(10.0)
        raw, logits = plain(idx)[0], capped(idx)[0]
    assert 4 < raw.abs().max() < 12  # beyond the cap, not so far that tanh rounds to exactly 1 in float32
    torch.testing.assert_close(logits, 2.0 * torch.tanh(raw / 2.0))
    assert logits.abs().max() < 2.0
    seen = []  # generation samples from the capped logits too

    def spy(logits, *args, **kwargs):
        seen.append(logits)
        return logits.argmax(-1)

    monkeypatch.setattr(gpt, "sample_next", spy)
    capped.generate(idx[:1, :4], 3)
    assert len(seen) == 3 and all(s.abs().max() < 2.0 for s in seen)


# ---------------------------------------------------------------------- parameters and accounting

DEFAULT_KEYS = ["wte.weight", "wpe.weight", "blocks.0.ln_1.weight", "blocks.0.ln_1.bias", "blocks.0.attn.qkv.weight",
                "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias",
                "blocks.0.ln_2.weight", "blocks.0.ln_2.bias", "blocks.0.mlp.fc.weight", "blocks.0.mlp.fc.bias",
                "blocks.0.mlp.proj.weight", "blocks.0.mlp.proj.bias", "ln_f.weight", "ln_f.bias", "lm_head.weight"]


def test_defaults_are_still_gpt2_with_the_same_weights():
    """The state-dict names and, for a fixed seed, the initial weights and logits are those the model had
    before the switches existed (values recorded at commit 21bc470): old checkpoints load unchanged."""
    model = tiny(num_of_layers=1)
    assert list(model.state_dict()) == DEFAULT_KEYS
    assert model.lm_head.weight is model.wte.weight
    block = model.blocks[0]
    assert type(block.ln_1) is nn.LayerNorm and type(model.ln_f) is nn.LayerNorm
    assert type(block.mlp) is MLP and isinstance(block.mlp.act, nn.GELU) and block.mlp.act.approximate == "tanh"
    assert block.attn.q_norm is None and not block.attn.rope
    sd = model.state_dict()
    recorded = {"wte.weight": (-0.0023173084, 0.7307037711), "wpe.weight": (-0.0111981938, -0.2618246377),
                "blocks.0.attn.qkv.weight": (0.0126361828, -1.1501175165),
                "blocks.0.mlp.proj.weight": (-0.0073982258, 1.3718976975)}
    for name, (first, total) in recorded.items():
        assert sd[name].flatten()[0].item() == pytest.approx(first, abs=1e-7)
        assert sd[name].sum().item() == pytest.approx(total, abs=1e-5)
    with torch.no_grad():
        logits, _ = model(torch.arange(10)[None])
    assert logits.sum().item() == pytest.approx(1.9462172985, abs=1e-4)
    assert logits.abs().sum().item() == pytest.approx(44.5815162659, abs=1e-4)


def test_switches_name_their_parameters():
    keys = list(tiny(num_of_layers=1, **SWITCHES["all"]).state_dict())
    assert keys == ["wte.weight", "blocks.0.ln_1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
                    "blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.weight", "blocks.0.ln_2.weight",
                    "blocks.0.mlp.gate.weight", "blocks.0.mlp.up.weight", "blocks.0.mlp.proj.weight",
                    "ln_f.weight", "lm_head.weight"]
    rms = tiny(num_of_layers=1, norm="rmsnorm")  # bias=True, but RMSNorm has no bias
    assert type(rms.blocks[0].ln_1) is RMSNorm and "blocks.0.ln_1.bias" not in rms.state_dict()
    assert "blocks.0.attn.qkv.bias" in rms.state_dict()


def test_gpt2_init_scales_the_swiglu_projection_and_inits_an_untied_head():
    model = GPT(GPTConfig(vocab_size=500, block_size=16, embedding_dim=192, num_of_layers=8, num_of_heads=4,
                          mlp="swiglu", tie_embeddings=False))
    assert model.blocks[2].mlp.gate.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[2].mlp.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_an_untied_head_is_its_own_parameter_and_is_counted_once():
    model = tiny(tie_embeddings=False)
    assert model.lm_head.weight is not model.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" in names and "wte.weight" in names
    n = sum(p.numel() for p in model.parameters())
    assert n == sum(p.numel() for p in tiny().parameters()) + 50 * 32  # exactly one more vocab x E matrix
    assert model.num_parameters(non_embedding=False) == n
    assert model.num_parameters() == n - 16 * 32 - 50 * 32  # lookups only: wpe and, untied, wte
    assert model.flops_per_token() == 6 * model.num_parameters() + 12 * 2 * 16 * 32
    x = torch.randint(0, 50, (2, 8))
    _, loss = model(x, x)
    loss.backward()
    assert model.lm_head.weight.grad is not None and model.wte.weight.grad is not None
    assert "lm_head.weight" in model.decay_parameter_names()[0]


@pytest.mark.parametrize("position", ["rope", "none"])
def test_models_without_learned_positions_have_no_position_table(position):
    model = tiny(position=position)
    assert model.wpe is None and not any(n.startswith("wpe") for n in model.state_dict())
    n = sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == model.num_parameters(non_embedding=False) == n
    assert n == sum(p.numel() for p in tiny().parameters()) - 16 * 32


def test_sdpa_causal_path_builds_no_mask(monkeypatch):
    """is_causal=True needs no T x T mask; the scratch core and the cached path still build theirs."""
    built = []
    real = attention.attention_mask
    monkeypatch.setattr(attention, "attention_mask", lambda *a: built.append(a[:2]) or real(*a))
    x = torch.randn(1, 8, 16)
    MultiHeadAttention(16, 2, attention="sdpa")(x)
    assert built == []
    MultiHeadAttention(16, 2, attention="scratch")(x)
    assert built == [(8, 8)]


def test_all_switches_together_learn():
    model = tiny(**SWITCHES["all"]).train()
    x = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)
    optimizer = torch.optim.AdamW(model.optimizer_groups(0.0), lr=3e-3)
    for _ in range(100):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # the soft-cap at 2.0 limits how confident it can be: with logits in (-2, 2), the best reachable loss is
    # -log(e^2 / (e^2 + 49 e^-2)) = 0.64
    best = -math.log(math.exp(2) / (math.exp(2) + 49 * math.exp(-2)))
    assert loss.item() < best + 0.3  # from ln(50) = 3.9


@pytest.mark.parametrize("kw, message", [
    (dict(position="alibi"), "position must be one of"),
    (dict(norm="batchnorm"), "norm must be one of"),
    (dict(mlp="geglu"), "mlp must be one of"),
    (dict(position="none", causal=False), "needs causal=True"),
    (dict(position="rope", embedding_dim=30, num_of_heads=10), "must be even"),
    (dict(rope_base=1.0), "rope_base must be greater than 1"),
    (dict(logit_softcap=-1.0), "logit_softcap must be a number >= 0"),
])
def test_invalid_switches_are_value_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(vocab_size=50, **kw)


def test_rmsnorm_matches_torch_functional():
    """A second reference besides the formula: PyTorch's own rms_norm."""
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16) + 0.5)
    x = torch.randn(4, 16)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (16,), norm.weight, eps=1e-5))
