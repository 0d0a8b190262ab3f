"""Multi-head self-attention, written out step by step (Vaswani et al. 2017, section 3.2).

For each head h, with d = head size:
    Attention(Q, K, V) = softmax(Q K^T / sqrt(d) + mask) V
and the heads' outputs are concatenated and projected back to the model width.

Two interchangeable cores compute the softmax(...) V part:
    "scratch"  every step as a tensor expression you can read and print      (the reference)
    "sdpa"     torch.nn.functional.scaled_dot_product_attention: fused kernels (flash attention on GPU)
tests/test_attention.py checks that both give the same outputs and gradients.

Shapes: B batch, T query positions, S key positions (S = T without a cache), E embedding_dim,
H num_of_heads, D = E / H head size.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

CORES = ("scratch", "sdpa")


class KVCache:
    """The keys and values of the tokens already seen, for one layer, so decoding a new token costs one
    position instead of the whole context. Preallocated to `max_len` positions: appending is a copy."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.k = torch.empty(batch, heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, H, T, D) new keys/values; return all keys/values so far, (B, H, length, D)."""
        end = self.length + k.size(2)
        if end > self.k.size(2):
            raise ValueError(f"KV cache holds {self.k.size(2)} positions, {end} asked for")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


def attention_mask(t: int, s: int, causal: bool, padding_mask: torch.Tensor | None,
                   device: torch.device) -> torch.Tensor | None:
    """Which keys each query may look at: bool (B or 1, 1, T, S), True = allowed; None = all allowed.

    causal:       the T queries are the last T of the S positions, so query i sits at position
                  S - T + i and sees keys 0 .. S - T + i (a lower triangle shifted right by S - T;
                  without a cache S = T and it is the usual triangle).
    padding_mask: (B, S) bool, True for real tokens: nobody attends to padding.
    """
    mask = None
    if causal and t > 1:  # a single newest query may see every key: no mask needed
        mask = torch.ones(t, s, dtype=torch.bool, device=device).tril(diagonal=s - t)[None, None]
    if padding_mask is not None:
        keys = padding_mask[:, None, None, :].bool()  # (B, 1, 1, S)
        mask = keys if mask is None else mask & keys
    return mask


def scratch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      dropout: nn.Dropout) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with the mask applied before the softmax. (B, H, T, D) -> (B, H, T, D)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, T, S): how well query t matches key s
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # exp(-inf) = 0: masked keys get no weight
    weights = F.softmax(scores.float(), dim=-1).to(q.dtype)  # each row sums to 1 (softmax in fp32 for safety)
    weights = dropout(weights)
    return weights @ v  # (B, H, T, D): a weighted average of the values


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   dropout: nn.Dropout, causal_square: bool) -> torch.Tensor:
    """The same computation in one fused PyTorch call. `causal_square` (plain causal, no cache, no padding)
    lets it use is_causal=True, which the flash kernel needs instead of an explicit mask."""
    p = dropout.p if dropout.training else 0.0
    if causal_square:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)


class MultiHeadAttention(nn.Module):
    def __init__(self, embedding_dim: int, num_of_heads: int, dropout: float = 0.0, bias: bool = True,
                 attention: str = "sdpa", causal: bool = True) -> None:
        super().__init__()
        if embedding_dim % num_of_heads:
            raise ValueError(f"embedding_dim {embedding_dim} is not divisible by num_of_heads {num_of_heads}")
        if attention not in CORES:
            raise ValueError(f"attention must be one of {CORES}, got {attention!r}")
        self.num_of_heads, self.attention, self.causal = num_of_heads, attention, causal
        self.qkv = nn.Linear(embedding_dim, 3 * embedding_dim, bias=bias)  # W_Q, W_K, W_V in one matmul
        self.proj = nn.Linear(embedding_dim, embedding_dim, bias=bias)  # W_O: mixes the heads' outputs
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, E) -> (B, H, T, D): each head works on its own D-wide slice."""
        b, t, e = x.shape
        return x.view(b, t, self.num_of_heads, e // self.num_of_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """x: (B, T, E). padding_mask: (B, S) True for real tokens. cache: keys/values of earlier tokens,
        extended in place with this call's T tokens."""
        b, t, e = x.shape
        q, k, v = (self.split_heads(z) for z in self.qkv(x).split(e, dim=2))  # 3 x (B, H, T, D)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, H, S, D), S = cached + T
        s = k.size(2)
        mask = attention_mask(t, s, self.causal, padding_mask, x.device)
        if self.attention == "scratch":
            y = scratch_attention(q, k, v, mask, self.attn_dropout)
        else:
            causal_square = self.causal and padding_mask is None and s == t and t > 1
            y = sdpa_attention(q, k, v, mask, self.attn_dropout, causal_square)
        y = y.transpose(1, 2).reshape(b, t, e)  # merge heads: (B, H, T, D) -> (B, T, E)
        return self.resid_dropout(self.proj(y))
