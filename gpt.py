"""The GPT: a stack of transformer blocks that predicts the next token (Radford et al. 2018, 2019).

    tokens (B, T) -> token embedding + position embedding -> dropout
                  -> num_of_layers x Block( attention, MLP, each with a residual connection and LayerNorm )
                  -> final LayerNorm -> linear head tied to the token embedding -> logits (B, T, vocab_size)

Pre-LayerNorm (GPT-2) normalises the input of each sub-layer; post-LayerNorm (the GPT-1 paper, as in the
original transformer) normalises after adding the residual.

GPTConfig's architecture switches swap in later ideas one at a time; their defaults are GPT-2 exactly:
    position        learned position embedding | rotary (RoPE, in attention) | none (NoPE, causal models)
    norm            LayerNorm | RMSNorm
    mlp             GELU | SwiGLU | ReLU^2
    qk_norm         RMS-normalised queries and keys per head
    tie_embeddings  the head reuses the token embedding, or has its own matrix
    logit_softcap   logits squashed smoothly into (-c, c)

Settings are declared with gptlab.cli's `setting()`; a bad one raises a plain ValueError, which CLIs print as `error:`.
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from attention import CORES, KVCache, MultiHeadAttention, RMSNorm
from gptlab.cli import FRACTION, NON_NEGATIVE, POSITIVE, Rule, check_fields, setting


@dataclass
class GPTConfig:
    """Every setting of the model, declared once: each is also a playground.py flag and YAML key of the same
    name (see gptlab/cli.py), except vocab_size (the tokenizer's) and causal (the training objective's). The defaults
    are GPT-2; the switches from `position` on swap in later ideas one at a time."""

    vocab_size: int = setting(8000, "tokens in the vocabulary", rule=POSITIVE, flag=False)
    block_size: int = setting(256, "context length in tokens", rule=POSITIVE, group="model")
    embedding_dim: int = setting(384, "width of the residual stream (n_embd)", rule=POSITIVE, group="model")
    num_of_layers: int = setting(4, "number of transformer blocks", rule=POSITIVE, group="model")
    num_of_heads: int = setting(4, "attention heads per block (must divide embedding_dim)", rule=POSITIVE,
                                group="model")
    dropout: float = setting(0.1, "dropout on embeddings, attention weights and residual branches", rule=FRACTION,
                             group="model")
    bias: bool = setting(True, "biases in linear layers and LayerNorms", group="model")
    attention: str = setting("sdpa", "sdpa: PyTorch's fused kernels; scratch: the from-scratch reference path",
                             choices=CORES, group="model")
    norm_position: str = setting("pre", "pre: LayerNorm before each sub-layer (GPT-2); post: after (GPT-1 paper)",
                                 choices=("pre", "post"), group="model")
    init: str = setting("gpt2", "gpt2: N(0, 0.02) with scaled residual projections; pytorch: PyTorch's default "
                        "init", choices=("gpt2", "pytorch"), group="model")
    causal: bool = setting(True, "True: a decoder (GPT) sees only the past; False: a bidirectional encoder (BERT)",
                           flag=False)
    position: str = setting("learned", "learned: GPT-2's position embedding; rope: rotary positions on queries and "
                            "keys (Su et al. 2021); none: no position signal (NoPE, causal models only)",
                            choices=("learned", "rope", "none"), group="model")
    rope_base: float = setting(10000.0, "rope only: the slowest feature pair turns once every 2 pi rope_base "
                               "positions", rule=Rule("greater than 1", lambda v: v > 1), group="model",
                               requires=("position", "rope"))
    norm: str = setting("layernorm", "layernorm, or rmsnorm (Zhang & Sennrich 2019: no mean, no bias), for every "
                        "normalisation", choices=("layernorm", "rmsnorm"), group="model")
    mlp: str = setting("gelu", "gelu: GPT-2's 4x MLP; swiglu: gated SiLU (Shazeer 2020), hidden size ~8E/3 for the "
                       "same parameter count; relu2: ReLU squared (So et al. 2021)",
                       choices=("gelu", "swiglu", "relu2"), group="model")
    qk_norm: bool = setting(False, "RMS-normalise each head's queries and keys before their dot product "
                            "(Dehghani et al. 2023)", group="model")
    tie_embeddings: bool = setting(True, "the output head reuses the token embedding matrix (GPT-2); "
                                   "--no-tie_embeddings gives it its own", group="model")
    logit_softcap: float = setting(0.0, "if > 0, logits = c * tanh(logits / c) (Gemma 2); 0 = off",
                                   rule=NON_NEGATIVE, group="model")
    activation_checkpointing: bool = setting(False, "keep only each block's input in training and recompute the "
                                             "block in the backward pass: far less memory for about a third more "
                                             "compute; the same results", group="model")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.embedding_dim % self.num_of_heads:
            raise ValueError(f"--embedding_dim {self.embedding_dim} is not divisible by --num_of_heads "
                             f"{self.num_of_heads}")
        if self.position == "none" and not self.causal:
            raise ValueError("position none (NoPE) needs causal=True: without positions or a causal mask, "
                             "a bidirectional model cannot tell the order of its tokens")
        if self.position == "rope" and (self.embedding_dim // self.num_of_heads) % 2:
            raise ValueError(f"position rope rotates feature pairs: the head size embedding_dim / num_of_heads = "
                             f"{self.embedding_dim // self.num_of_heads} must be even")


def make_norm(c: GPTConfig, dim: int) -> nn.Module:
    """The normalisation the config asks for: LayerNorm (GPT-2) or RMSNorm (no mean, no bias)."""
    return nn.LayerNorm(dim, bias=c.bias) if c.norm == "layernorm" else RMSNorm(dim)


def swiglu_hidden_size(embedding_dim: int) -> int:
    """SwiGLU's hidden width h, chosen so its three E x h matrices hold about as many weights as the GELU
    MLP's two E x 4E ones: 3 E h = 8 E^2 gives h = 8E/3, rounded to the nearest multiple of 8 (at least 8)
    for friendlier matrix shapes. E = 384 -> 1024, E = 768 -> 2048, E = 32 -> 88 (85.3 rounded)."""
    return max(8, 8 * round(embedding_dim / 3))  # 8E/3 / 8 = E/3 steps of 8


class ReLUSquared(nn.Module):
    """relu(x)^2, the activation the Primer search found (So et al. 2021)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).square()


class MLP(nn.Module):
    """Position-wise feed-forward network: E -> 4E -> activation -> E. GELU (GPT-2) or ReLU^2."""

    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(c.embedding_dim, 4 * c.embedding_dim, bias=c.bias)
        # GELU in the tanh approximation GPT-1 and GPT-2 used
        self.act = nn.GELU(approximate="tanh") if c.mlp == "gelu" else ReLUSquared()
        self.proj = nn.Linear(4 * c.embedding_dim, c.embedding_dim, bias=c.bias)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


class SwiGLU(nn.Module):
    """Gated feed-forward network (Shazeer 2020): proj( silu(x W_gate) * (x W_up) ), hidden width from
    swiglu_hidden_size. One branch decides per feature how much of the other passes."""

    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        hidden = swiglu_hidden_size(c.embedding_dim)
        self.gate = nn.Linear(c.embedding_dim, hidden, bias=c.bias)  # W_1
        self.up = nn.Linear(c.embedding_dim, hidden, bias=c.bias)  # W_3
        self.proj = nn.Linear(hidden, c.embedding_dim, bias=c.bias)  # W_2
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.silu(self.gate(x)) * self.up(x)))


class Block(nn.Module):
    """One transformer block: attention lets positions exchange information, the MLP transforms each one."""

    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.pre_norm = c.norm_position == "pre"
        self.ln_1 = make_norm(c, c.embedding_dim)
        self.attn = MultiHeadAttention(c.embedding_dim, c.num_of_heads, c.dropout, c.bias, c.attention, c.causal,
                                       rope=c.position == "rope", rope_base=c.rope_base, qk_norm=c.qk_norm,
                                       window=c.block_size if c.position == "rope" else None)
        self.ln_2 = make_norm(c, c.embedding_dim)
        self.mlp = SwiGLU(c) if c.mlp == "swiglu" else MLP(c)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """The arguments as MultiHeadAttention.forward takes them, in its order."""
        if self.pre_norm:  # GPT-2: x + f(LN(x)), the residual path stays an identity
            x = x + self.attn(self.ln_1(x), padding_mask, cache, positions)
            return x + self.mlp(self.ln_2(x))
        x = self.ln_1(x + self.attn(x, padding_mask, cache, positions))  # GPT-1: LN(x + f(x))
        return self.ln_2(x + self.mlp(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = c = config
        self.wte = nn.Embedding(c.vocab_size, c.embedding_dim)  # token embedding
        # learned absolute positions; rotary ones live inside attention, and NoPE has none
        self.wpe = nn.Embedding(c.block_size, c.embedding_dim) if c.position == "learned" else None
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.num_of_layers))
        # Post-LN blocks already end in a LayerNorm; pre-LN needs one before the head.
        self.ln_f = make_norm(c, c.embedding_dim) if c.norm_position == "pre" else nn.Identity()
        self.lm_head = nn.Linear(c.embedding_dim, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # weight tying: one matrix reads and writes tokens
        if c.init == "gpt2":
            self.apply(self._init_gpt2)
            # GPT-2: residual projections scaled by 1/sqrt(2 * layers), since each block adds two of them
            # to the residual stream and its variance would otherwise grow with depth.
            for name, p in self.named_parameters():
                if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.num_of_layers))

    @staticmethod
    def _init_gpt2(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ forward

    def hidden_states(self, idx: torch.Tensor, padding_mask: torch.Tensor | None = None,
                      caches: list[KVCache] | None = None, start_pos: int = 0) -> torch.Tensor:
        """(B, T) token ids at positions start_pos .. start_pos + T - 1 -> (B, T, E) final hidden states.
        padding_mask (B, T), True for real tokens: no position attends to the others (padding).

        Learned positions stop at block_size. Rotary positions go on: a causal rotary model takes sequences
        of any length, each token attending to itself and the block_size - 1 tokens before it (sliding-window
        attention; the same as plain causal attention up to block_size tokens)."""
        t, c = idx.size(1), self.config
        if c.position == "rope":
            too_long = t > c.block_size and not c.causal
        else:
            too_long = start_pos + t > c.block_size
        if too_long:
            raise ValueError(f"sequence of {start_pos + t} tokens, but block_size is {c.block_size}")
        pos = torch.arange(start_pos, start_pos + t, device=idx.device)
        x = self.wte(idx) if self.wpe is None else self.wte(idx) + self.wpe(pos)  # (B, T, E)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            cache = caches[i] if caches is not None else None
            if self.config.activation_checkpointing and torch.is_grad_enabled() and cache is None:
                # non-reentrant: works with autocast, FSDP and compile; replays the block's dropout masks
                x = checkpoint(block, x, padding_mask, None, pos, use_reentrant=False)
            else:
                x = block(x, padding_mask, cache, pos)
        return self.ln_f(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states (..., E) -> logits (..., vocab_size), soft-capped if the config says so:
        c * tanh(logits / c) stays within (-c, c) and is close to the identity for |logits| much below c."""
        logits = self.lm_head(hidden)
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab_size) at every position (a decoder predicts the next token, an encoder the
        token hidden at that position); with targets (B, T), also the mean cross-entropy (targets of -1
        are ignored)."""
        logits = self.logits(self.hidden_states(idx, padding_mask=padding_mask))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    # ------------------------------------------------------------------ generation

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype keys and values are computed in: autocast's when it is on (so a KV cache in it is never cast
        per token), else the weights'."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.wte.weight.dtype

    def new_caches(self, batch: int, device: torch.device, dtype: torch.dtype) -> list[KVCache]:
        """One cache per layer, block_size positions each; rotary models' caches slide (see stream)."""
        c = self.config
        return [KVCache(batch, c.num_of_heads, c.block_size, c.embedding_dim // c.num_of_heads, device, dtype,
                        slide=c.position == "rope")
                for _ in range(c.num_of_layers)]

    @torch.inference_mode()
    def stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, eos_id: int | None = None, use_cache: bool = True,
               generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Yield max_new_tokens new tokens (B,) one at a time, continuing idx (B, T).

        Stops early once every row has produced eos_id; rows that finished first keep emitting eos_id.
        Runs without autograd (inference mode); call model.eval() first, or dropout stays on.

        Learned (and no) positions: the model sees the tokens from `start` on, its positions counted from
        there, so cached keys/values are only valid while that start stays put. When the tokens would exceed
        block_size, the window jumps forward to keep the last block_size // 2 tokens, which are run once to
        rebuild the cache (a "prefill"); the cached way pays the full price only once per jump.

        Rotary positions: token i sits at position i for good, and attention only sees position
        differences, so nothing cached goes stale and attention slides instead of jumping. In every layer,
        each token attends to itself and the block_size - 1 tokens before it (sliding-window attention,
        the same as in training up to block_size tokens); each layer's cache drops its oldest key/value as
        a new one arrives. The text starts at the prompt's last block_size tokens. A cached key in layer 2
        and up still carries what its token saw then, so the last token's state depends on up to
        num_of_layers * (block_size - 1) tokens back: without the cache, those are recomputed with the same
        sliding-window attention.

        Either way, cached or not, gives the same tokens.

        Rows of a batch (B > 1) are generated side by side and give the tokens each would give alone (up to
        the rounding of batched matmuls); the prompts share their length T. Per token, the work outside the
        model is one write into a preallocated buffer of the whole text (plus three small operations with
        eos_id), not a copy of the growing text.
        """
        if not self.config.causal:
            raise ValueError("an encoder (causal=False) fills masks; it does not generate left to right")
        rotary = self.config.position == "rope"
        block, keep = self.config.block_size, self.config.block_size // 2
        reach = self.config.num_of_layers * (block - 1) + 1  # rotary: the tokens the last one's state depends on
        batch, prompt_len = idx.shape
        tokens = idx.new_empty(batch, prompt_len + max_new_tokens)  # the prompt, then each new token in place
        tokens[:, :prompt_len] = idx
        start = max(0, prompt_len - block)
        caches: list[KVCache] | None = None
        cache_origin = -1
        finished = torch.zeros(batch, dtype=torch.bool, device=idx.device) if eos_id is not None else None
        for length in range(prompt_len, prompt_len + max_new_tokens):  # tokens[:, :length] are known
            if not rotary and length - start > block:
                start = length - keep
            origin = 0 if rotary else start  # token i sits at position i - origin
            if not use_cache:
                first = max(start, length - reach) if rotary else start
                hidden = self.hidden_states(tokens[:, first:length], start_pos=first - origin)
            elif cache_origin != origin:  # prefill: run the whole window once, filling fresh caches
                caches, cache_origin = self.new_caches(batch, idx.device, self.compute_dtype(idx.device)), origin
                hidden = self.hidden_states(tokens[:, start:length], caches=caches, start_pos=start - origin)
            else:  # one new token at its position, attending to the cache
                hidden = self.hidden_states(tokens[:, length - 1:length], caches=caches,
                                            start_pos=length - 1 - origin)
            logits = self.logits(hidden[:, -1])  # only the last position predicts the next token
            next_id = sample_next(logits, temperature, top_k, top_p, generator)
            if finished is not None:
                next_id.masked_fill_(finished, eos_id)  # rows that are done keep emitting eos_id
                finished |= next_id == eos_id
            tokens[:, length] = next_id
            yield next_id
            if finished is not None and bool(finished.all()):
                return

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_id: int | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """idx (B, T) followed by up to max_new_tokens generated tokens: (B, T + n). See stream()."""
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache, generator))
        return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx

    # ------------------------------------------------------------------ accounting and optimisation

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Parameters, each once (a tied head is the token embedding). non_embedding leaves out the tables
        that are only looked up, as is usual: the position embedding, and the token embedding when the head
        has its own matrix. A tied token embedding stays, since it does compute as the head."""
        n = sum(p.numel() for p in self.parameters())
        if not non_embedding:
            return n
        if self.wpe is not None:
            n -= self.wpe.weight.numel()
        if not self.config.tie_embeddings:
            n -= self.wte.weight.numel()
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs per token, forward + backward (PaLM paper, appendix B): 6N for the weights
        (2 per multiply-add forward, 4 backward) plus 12 * layers * block_size * embedding_dim for the
        attention scores and weighted sums over a full context."""
        c = self.config
        return 6 * self.num_parameters() + 12 * c.num_of_layers * c.block_size * c.embedding_dim

    def decay_parameter_names(self) -> tuple[list[str], list[str]]:
        """(decayed, not decayed): weight decay (the GPT-1 paper's L2 on non-bias weights) applies to
        matrices and embeddings, never to biases or LayerNorm gains, which only shift and scale."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            (decay if p.dim() >= 2 else no_decay).append(name)
        return decay, no_decay

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        params = dict(self.named_parameters())
        decay, no_decay = self.decay_parameter_names()
        return [{"params": [params[n] for n in decay], "weight_decay": weight_decay},
                {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token from logits (B, V) -> (B,).

    temperature 0 is greedy (argmax); otherwise logits are divided by the temperature (< 1 sharpens),
    top_k keeps the k most likely tokens, and top_p (nucleus sampling, Holtzman et al. 2019) keeps the
    smallest set of most likely tokens whose probabilities add up to at least p.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the tokens ranked above
        drop_sorted = mass_before >= top_p  # the nucleus is already full without this token
        drop_sorted[:, 0] = False  # the most likely token always stays, whatever p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        probs = probs.masked_fill(drop, 0.0)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # multinomial renormalises
