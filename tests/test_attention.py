"""attention.py: the from-scratch core equals PyTorch's fused SDPA core (outputs and gradients), with every
kind of mask and with a KV cache; and causal attention never looks ahead."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from attention import KVCache, MultiHeadAttention

SHAPES = [(2, 7, 16, 2), (3, 13, 32, 4), (1, 32, 48, 3)]  # (B, T, E, H)


def twin_modules(e: int, h: int, causal: bool) -> tuple[MultiHeadAttention, MultiHeadAttention]:
    """Two attention modules with identical weights, one per core."""
    torch.manual_seed(0)
    scratch = MultiHeadAttention(e, h, dropout=0.0, attention="scratch", causal=causal)
    sdpa = MultiHeadAttention(e, h, dropout=0.0, attention="sdpa", causal=causal)
    sdpa.load_state_dict(scratch.state_dict())
    return scratch, sdpa


def random_padding(b: int, t: int) -> torch.Tensor:
    """(B, T) True for real tokens: each row keeps a random-length prefix (at least one token)."""
    lengths = torch.randint(1, t + 1, (b,))
    return torch.arange(t)[None, :] < lengths[:, None]


def outputs_and_grads(module: MultiHeadAttention, x: torch.Tensor, **kw) -> list[torch.Tensor]:
    x = x.clone().requires_grad_(True)
    module.zero_grad()
    y = module(x, **kw)
    (y * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum().backward()  # a loss touching every output
    return [y.detach(), x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("b, t, e, h", SHAPES)
@pytest.mark.parametrize("mask", ["causal", "bidirectional", "padding", "causal+padding"])
def test_scratch_equals_sdpa_in_outputs_and_gradients(b, t, e, h, mask):
    scratch, sdpa = twin_modules(e, h, causal=mask.startswith("causal"))
    x = torch.randn(b, t, e)
    kw = {"padding_mask": random_padding(b, t)} if "padding" in mask else {}
    for ours, ref in zip(outputs_and_grads(scratch, x, **kw), outputs_and_grads(sdpa, x, **kw), strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_sdpa_runs_the_flash_kernel_in_bfloat16_and_equals_scratch(device):
    """Training's case (causal, no padding, 64-wide heads, bf16 autocast): SDPA can take the flash kernel
    (forced here: an error if it could not), and agrees with the scratch core to bf16 precision."""
    scratch, sdpa = (m.to(device) for m in twin_modules(128, 2, causal=True))
    x = torch.randn(4, 64, 128, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        reference = outputs_and_grads(scratch, x)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash = outputs_and_grads(sdpa, x)
    for ours, ref in zip(flash, reference, strict=True):  # bf16 rounding: compare whole tensors, by norm
        assert (ours.float() - ref.float()).norm() <= 2e-2 * ref.float().norm()


@pytest.mark.parametrize("core", ["scratch", "sdpa"])
def test_kv_cache_gives_the_full_sequence_output(core):
    """Prefill 5 tokens, then 1, 1, a chunk of 4, then 1: the same as running all 12 at once."""
    torch.manual_seed(1)
    module = MultiHeadAttention(32, 4, attention=core).eval()
    x = torch.randn(2, 12, 32)
    full = module(x)
    cache = KVCache(2, 4, 16, 8, x.device, x.dtype)
    pieces, start = [], 0
    for size in (5, 1, 1, 4, 1):
        pieces.append(module(x[:, start:start + size], cache=cache))
        start += size
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_paths_agree_between_cores():
    scratch, sdpa = twin_modules(24, 3, causal=True)
    x = torch.randn(2, 9, 24)
    outs = []
    for module in (scratch, sdpa):
        cache = KVCache(2, 3, 9, 8, x.device, x.dtype)
        outs.append(torch.cat([module(x[:, :6], cache=cache), module(x[:, 6:], cache=cache)], dim=1))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("core", ["scratch", "sdpa"])
def test_causal_attention_never_looks_ahead(core):
    torch.manual_seed(2)
    module = MultiHeadAttention(16, 2, attention=core).eval()
    x = torch.randn(1, 10, 16)
    changed = x.clone()
    changed[:, 6:] = torch.randn(1, 4, 16)  # change positions 6..9
    before, after = module(x), module(changed)
    torch.testing.assert_close(before[:, :6], after[:, :6], atol=0, rtol=0)  # earlier positions: untouched
    assert not torch.allclose(before[:, 6:], after[:, 6:])


@pytest.mark.parametrize("core", ["scratch", "sdpa"])
def test_bidirectional_attention_looks_both_ways_but_never_at_padding(core):
    torch.manual_seed(3)
    module = MultiHeadAttention(16, 2, attention=core, causal=False).eval()
    x = torch.randn(1, 8, 16)
    changed = x.clone()
    changed[:, -1] += 1.0
    assert not torch.allclose(module(x)[:, 0], module(changed)[:, 0])  # position 0 sees the last token
    padding = torch.tensor([[True] * 6 + [False] * 2])
    changed_padding = x.clone()
    changed_padding[:, 6:] = torch.randn(1, 2, 16)
    torch.testing.assert_close(module(x, padding_mask=padding)[:, :6],
                               module(changed_padding, padding_mask=padding)[:, :6], atol=0, rtol=0)


def test_attention_dropout_is_active_in_training_only():
    torch.manual_seed(4)
    module = MultiHeadAttention(16, 2, dropout=0.5, attention="scratch")
    x = torch.randn(2, 8, 16)
    assert not torch.allclose(module(x), module(x))  # two different dropout masks
    module.eval()
    torch.testing.assert_close(module(x), module(x))
