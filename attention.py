"""Multi-head self-attention, written out step by step (Vaswani et al. 2017, section 3.2).

For each head h, with d = head size:
    Attention(Q, K, V) = softmax(Q K^T / sqrt(d) + mask) V
and the heads' outputs are concatenated and projected back to the model width.

Two interchangeable cores compute the softmax(...) V part:
    "scratch"  every step as a tensor expression you can read and print      (the reference)
    "sdpa"     torch.nn.functional.scaled_dot_product_attention: fused kernels (flash attention on GPU)
tests/test_attention.py checks that both give the same outputs and gradients.

Two optional steps change the queries and keys before either core sees them, so both cores get the same inputs:
    QK-norm  each head's query and key vectors are RMS-normalised (Dehghani et al. 2023), which bounds the
             attention logits and keeps large models' training stable
    RoPE     rotary position embedding (Su et al. 2021): each pair of query/key features is rotated by an
             angle proportional to the token's position, so q . k depends only on how far apart they are
A causal module may also limit each query to the last `window` keys (sliding-window attention), which lets
a rotary model's KV cache slide past the training length instead of being rebuilt.

Shapes: B batch, T query positions, S key positions (S = T without a cache), E embedding_dim,
H num_of_heads, D = E / H head size.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

CORES = ("scratch", "sdpa")


class RMSNorm(nn.Module):
    """Root-mean-square normalisation (Zhang & Sennrich 2019): LayerNorm without the mean subtraction or bias,
        y = x / sqrt(mean(x^2) + eps) * gain
    over the last dimension. Computed in float32 whatever the input precision, returned in the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # the gain, learned per feature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        rms = torch.sqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (x32 / rms * self.weight).type_as(x)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles for tokens at the given absolute positions (T,): two (T, D) tensors.

    Feature pair i (i = 0 .. D/2 - 1) turns at frequency base^(-2i / D) radians per position, from one turn
    every 2 pi positions (i = 0) down to very slow ones, so both near and far distances stay distinguishable.
    Any position works: nothing is precomputed for a maximum length.
    """
    inv_freq = base ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2): the angle of pair i at each position
    angles = torch.cat([angles, angles], dim=-1)  # (T, D): pair i is features (i, i + D/2), both share its angle
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1), the halves of the last dimension: a 90-degree turn of every pair (x1[i], x2[i])."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each feature pair of x (B, H, T, D) by its position's angle (cos, sin: (T, D)):
        (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin),   i.e.   x * cos + rotate_half(x) * sin.
    A query rotated by angle m and a key by angle n then have q . k depending on m - n only."""
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).type_as(x)


class KVCache:
    """The keys and values of the tokens already seen, for one layer, so decoding a new token costs one
    position instead of the whole context. Preallocated to `max_len` positions: appending is a copy.

    slide=False: appending past max_len is an error. slide=True (sliding-window attention over max_len
    positions): a full cache drops its oldest position to make room for one new token, shifting the rest
    down. That is only valid when each cached key carries its own position, as rotary keys do (they are
    stored already rotated); learned absolute positions would have to be recomputed.
    """

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, device: torch.device,
                 dtype: torch.dtype, slide: bool = False) -> None:
        self.k = torch.empty(batch, heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.length = 0
        self.slide = slide

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, H, T, D) new keys/values; return all keys/values held, (B, H, length, D)."""
        max_len = self.k.size(2)
        overflow = self.length + k.size(2) - max_len
        if overflow > 0 and self.slide and k.size(2) == 1:
            self.drop_oldest(overflow)
        elif overflow > 0:  # (a chunk would push out keys its own earlier queries still need)
            raise ValueError(f"KV cache holds {max_len} positions, {self.length + k.size(2)} asked for"
                             + (" (a full sliding cache takes one token at a time)" if self.slide else ""))
        self.k.narrow(2, self.length, k.size(2)).copy_(k)
        self.v.narrow(2, self.length, v.size(2)).copy_(v)
        self.length += k.size(2)
        return self.k.narrow(2, 0, self.length), self.v.narrow(2, 0, self.length)

    def drop_oldest(self, n: int) -> None:
        """Forget the n oldest positions: shift the others to the front (a copy of at most max_len positions,
        no more than the attention over them costs anyway)."""
        keep = self.length - n
        self.k[:, :, :keep] = self.k[:, :, n:self.length].clone()  # clone: source and target overlap
        self.v[:, :, :keep] = self.v[:, :, n:self.length].clone()
        self.length = keep


def attention_mask(t: int, s: int, causal: bool, padding_mask: torch.Tensor | None, device: torch.device,
                   window: int | None = None) -> torch.Tensor | None:
    """Which keys each query may look at: bool (B or 1, 1, T, S), True = allowed; None = all allowed.

    causal:       the T queries are the last T of the S positions, so query i sits at position
                  S - T + i and sees keys 0 .. S - T + i (a lower triangle shifted right by S - T;
                  without a cache S = T and it is the usual triangle).
    window:       causal only: query i sees at most `window` keys, S - T + i - window + 1 .. S - T + i
                  (sliding-window attention: a band below the diagonal); None, or S <= window: no limit.
    padding_mask: (B, S) bool, True for real tokens: nobody attends to padding.
    """
    mask = None
    banded = window is not None and s > window
    if causal and (t > 1 or banded):  # a single newest query may see every key (within the window): no mask
        allowed = torch.ones(t, s, dtype=torch.bool, device=device).tril(diagonal=s - t)
        if banded:
            allowed = allowed.triu(diagonal=s - t - window + 1)
        mask = allowed[None, None]
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
                 attention: str = "sdpa", causal: bool = True, rope: bool = False, rope_base: float = 10000.0,
                 qk_norm: bool = False, window: int | None = None) -> None:
        """rope: rotate queries and keys by their positions (rope_base sets the slowest frequency).
        qk_norm: RMS-normalise each head's queries and keys. window (causal only): each query sees itself and
        at most window - 1 keys before it (sliding-window attention); None = the whole past."""
        super().__init__()
        if embedding_dim % num_of_heads:
            raise ValueError(f"embedding_dim {embedding_dim} is not divisible by num_of_heads {num_of_heads}")
        if attention not in CORES:
            raise ValueError(f"attention must be one of {CORES}, got {attention!r}")
        head_dim = embedding_dim // num_of_heads
        if rope and head_dim % 2:
            raise ValueError(f"rotary positions rotate feature pairs: head size {head_dim} must be even")
        self.num_of_heads, self.attention, self.causal = num_of_heads, attention, causal
        self.rope, self.rope_base, self.window = rope, rope_base, window
        self.qkv = nn.Linear(embedding_dim, 3 * embedding_dim, bias=bias)  # W_Q, W_K, W_V in one matmul
        self.proj = nn.Linear(embedding_dim, embedding_dim, bias=bias)  # W_O: mixes the heads' outputs
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        if qk_norm:  # one gain per head feature, shared by all heads
            self.q_norm, self.k_norm = RMSNorm(head_dim), RMSNorm(head_dim)
        else:
            self.q_norm = self.k_norm = None

    def queries_keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, E) -> q, k, v, each (B, H, T, D): one matmul makes all three, and each head works on its own
        D-wide slice of them (views of the matmul's output, no copies)."""
        b, t, e = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.num_of_heads, e // self.num_of_heads)  # (B, T, 3, H, D)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, D)

    def attention_inputs(self, x: torch.Tensor, positions: torch.Tensor | None = None, start: int = 0
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, H, T, D) as both cores see them: projected, then QK-norm, then RoPE at the given (T,)
        positions (default start .. start + T - 1). The health telemetry (gptlab/health.py) measures attention
        logits from these too, so an attention switch changes both in one place."""
        q, k, v = self.queries_keys_values(x)
        if self.q_norm is not None:  # QK-norm: unit-RMS queries and keys (times a gain) bound q . k
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            if positions is None:
                positions = torch.arange(start, start + x.size(1), device=x.device)
            cos, sin = rope_cos_sin(positions, q.size(-1), self.rope_base)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, E). padding_mask: (B, S) True for real tokens. cache: keys/values of earlier tokens,
        extended in place with this call's T tokens. positions: (T,) absolute positions of x's tokens, for
        rotary models; by default they follow the cached tokens (0 .. T - 1 without a cache), which is wrong
        once a sliding cache has dropped some: pass them then."""
        b, t, e = x.shape
        q, k, v = self.attention_inputs(x, positions, start=cache.length if cache is not None else 0)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, H, S, D), S = cached + T; keys are cached already rotated
        s = k.size(2)
        if self.attention == "scratch":
            y = scratch_attention(q, k, v, attention_mask(t, s, self.causal, padding_mask, x.device, self.window),
                                  self.attn_dropout)
        else:
            causal_square = (self.causal and padding_mask is None and s == t and t > 1
                             and (self.window is None or s <= self.window))
            # is_causal=True needs no mask: building a T x T one would only cost memory
            mask = None if causal_square else attention_mask(t, s, self.causal, padding_mask, x.device,
                                                             self.window)
            y = sdpa_attention(q, k, v, mask, self.attn_dropout, causal_square)
        y = y.transpose(1, 2).reshape(b, t, e)  # merge heads: (B, H, T, D) -> (B, T, E)
        return self.resid_dropout(self.proj(y))
