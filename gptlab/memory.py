"""How much memory one training step holds at its peak, and the micro-batch plan that fits a budget.

The estimate counts tensor bytes, the way torch's allocator counts them (torch.cuda.max_memory_allocated):
    weights       every parameter, in float32
    gradients     float32, one per parameter
    optimizer     AdamW: two float32 moments per parameter; Muon: one momentum buffer per block matrix, AdamW's two
                  moments for the rest
    activations   what autograd saves in the forward pass for the backward pass (see block_activation_bytes)
    transient     what is made around the peak and freed soon after (see moments)
The weights, gradients and optimizer state are known exactly (a copy of the model on the meta device, which
holds no memory, lists the parameters). The activations are derived from what each operation of gpt.py and
attention.py keeps for its backward pass, and checked against measured peaks of real training steps
(tests/test_memory.py, docs/memory.md). The peak is the largest of four moments of a step (see moments).
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from gpt import GPT, GPTConfig
from gptlab.cli import format_size, parse_size
from gptlab.errors import UsageError
from gptlab.runtime import Runtime, check_fits

if TYPE_CHECKING:
    from config import TrainConfig

FP32 = 4  # bytes of a float32: weights, gradients, optimizer state, the residual stream, softmax outputs
INDEX = 8  # bytes of an int64 token id
# On CUDA, the default budget leaves this share of the free memory (at least MIN_MARGIN) to what the estimate does
# not count: the allocator's rounding and fragmentation, cuBLAS and NCCL workspaces.
MARGIN_FRACTION, MIN_MARGIN = 0.1, 2**30


@dataclass(frozen=True)
class Step:
    """What a training step's memory depends on besides the model: the micro-batch and the switches."""

    micro_batch: int  # sequences per forward/backward pass
    micro_steps: int = 1  # micro-batches accumulated per optimiser step
    dtype: torch.dtype = torch.float32  # autocast precision (float32: none)
    optimizer: str = "adamw"
    device_type: str = "cuda"  # dropout stores a 1-byte mask on CUDA, a mask in the input's dtype on CPU
    shards: int = 1  # FSDP: parameters, gradients and optimizer state are split over this many processes
    replicas: bool = False  # DDP: its gradient buckets are one more float32 copy of the gradients


@dataclass(frozen=True)
class Estimate:
    """The tensor bytes alive at the step's peak, by kind, and which moment of the step that is."""

    moment: str
    weights: int
    gradients: int
    optimizer: int
    activations: int  # saved for the backward pass and still alive
    transient: int  # made around that moment and freed soon after

    @property
    def peak(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.transient


@dataclass(frozen=True)
class Parameters:
    """Parameter counts that the memory depends on, read from the model built on the meta device."""

    total: int
    linear: int  # in nn.Linear layers (what autocast casts to its dtype for each matmul)
    muon: int  # the 2-D matrices inside the blocks (Muon's share)
    largest_matrix: tuple[int, int]  # (rows, cols) of the largest of them
    per_block: int
    mlp_hidden: int  # the MLP's hidden width: 4E, or SwiGLU's

    @classmethod
    def of(cls, config: GPTConfig) -> "Parameters":
        """From a one-block copy of the model (the blocks are alike), so any depth is counted at once."""
        try:
            with torch.device("meta"):
                model = GPT(replace(config, num_of_layers=1))
        except RuntimeError as e:  # a size beyond what a tensor can hold
            raise UsageError(f"a {config.embedding_dim}-wide model with {config.vocab_size} tokens and block_size "
                             f"{config.block_size} is too large to build: {e}") from None
        more, block = config.num_of_layers - 1, model.blocks[0]
        per_block = numel(block.parameters())
        matrices = [p for p in block.parameters() if p.dim() == 2]
        return cls(total=numel(model.parameters()) + more * per_block,  # a tied head is counted once
                   linear=linear_numel(model) + more * linear_numel(block),
                   muon=config.num_of_layers * numel(matrices),
                   largest_matrix=tuple(max(matrices, key=lambda p: p.numel()).shape),
                   per_block=per_block, mlp_hidden=block.mlp.proj.in_features)


def numel(params: Iterable[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)


def linear_numel(module: torch.nn.Module) -> int:
    """Parameters of the nn.Linear layers inside `module`: what autocast casts for its matmuls."""
    return sum(numel(m.parameters()) for m in module.modules() if isinstance(m, torch.nn.Linear))


def element_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def mask_bytes(c: int, step: Step) -> int:
    """Bytes per element that dropout keeps: CUDA's fused kernel a bool mask, the CPU a scaled noise tensor."""
    return 1 if step.device_type == "cuda" else c


def norm_bytes(config: GPTConfig, tokens: int, width: int, input_bytes: int) -> int:
    """What a norm over `width` features keeps beyond its input: LayerNorm a mean and a reciprocal deviation
    per row; RMSNorm (written out in attention.py) its float32 input (a copy unless it is float32) and x / rms,
    each as large as the input, and rms per row."""
    rows = tokens * config.embedding_dim // width
    if config.norm == "layernorm" and width == config.embedding_dim:
        return 2 * rows * FP32
    copy = 0 if input_bytes == FP32 else FP32
    return tokens * config.embedding_dim * (copy + FP32) + rows * FP32


def math_path(config: GPTConfig, step: Step) -> bool:
    """SDPA with dropout on the CPU has no fused kernel: its math path writes the scores out, in float32."""
    return config.attention == "sdpa" and config.dropout > 0 and step.device_type == "cpu"


def attention_bytes(config: GPTConfig, batch: int, c: int, step: Step) -> int:
    """The attention's saved tensors: the qkv output (3 N E), the core's output (N E, the projection's input),
    and what the core keeps. Fused SDPA: one float32 log-sum-exp per query and head. Scores written out
    (B H T^2 of them): scratch keeps the float32 softmax, its copy in the compute dtype, or with dropout the
    mask and the dropped weights instead, and the bool causal mask; SDPA's math path keeps float32 copies of
    the scaled queries and keys and of the values in place of the qkv output, and does all of it in float32."""
    t, h = config.block_size, config.num_of_heads
    tokens_e, scores = batch * t * config.embedding_dim, batch * h * t * t
    if math_path(config, step):
        return 3 * tokens_e * FP32 + tokens_e * c + scores * 3 * FP32
    if config.attention == "sdpa":
        return 4 * tokens_e * c + batch * h * t * FP32
    weights = mask_bytes(c, step) + c if config.dropout > 0 else (c if c != FP32 else 0)
    mask = t * t if config.causal else 0
    return 4 * tokens_e * c + scores * (FP32 + weights) + mask


def query_key_bytes(config: GPTConfig, batch: int, c: int, step: Step) -> int:
    """QK-norm and RoPE make new queries and keys (the core keeps them, unless its math path copies them);
    QK-norm also keeps its own work (and views of the qkv output, which the math path would have freed), and
    RoPE its float32 cos and sin tables (T x D each)."""
    tokens, head = batch * config.block_size, config.embedding_dim // config.num_of_heads
    tokens_e = tokens * config.embedding_dim
    saved = 0
    if (config.qk_norm or config.position == "rope") and not math_path(config, step):
        saved += 2 * tokens_e * c
    if config.qk_norm:
        saved += 2 * norm_bytes(replace(config, norm="rmsnorm"), tokens, head, c)
        saved += 3 * tokens_e * c if math_path(config, step) else 0
    if config.position == "rope":
        saved += 2 * config.block_size * head * FP32
    return saved


def block_activation_bytes(config: GPTConfig, params: Parameters, batch: int, step: Step) -> int:
    """Bytes one Block saves for its backward pass, with N = batch * block_size tokens of width E, c the compute
    dtype's bytes:
        2 N E float32   the residual stream where it enters the two norms
        6 N E c         the inputs of the qkv and MLP matmuls, the qkv output (3 N E), the attention output
        2 N H c         the MLP's hidden tensors, H = 4E (SwiGLU: 4 N H c, H about 8E/3)
    plus the norms' statistics, the attention core's extras, QK-norm's and RoPE's, and with dropout a mask on
    each of the two residual branches."""
    tokens = batch * config.block_size
    tokens_e = tokens * config.embedding_dim
    c = element_bytes(step.dtype)
    saved = 2 * tokens_e * FP32 + 2 * norm_bytes(config, tokens, config.embedding_dim, FP32)
    saved += 2 * tokens_e * c  # the qkv and MLP inputs
    saved += attention_bytes(config, batch, c, step) + query_key_bytes(config, batch, c, step)
    saved += (4 if config.mlp == "swiglu" else 2) * tokens * params.mlp_hidden * c
    if config.mlp == "swiglu" and c != FP32:  # autocast casts the input once for each of its two matmuls
        saved += tokens_e * c
    if config.dropout > 0:
        saved += 2 * tokens_e * mask_bytes(c, step)
    return saved


def outside_activation_bytes(config: GPTConfig, batch: int, step: Step) -> int:
    """Outside the blocks: the token ids and targets, and the embedding dropout's mask."""
    tokens = batch * config.block_size
    mask = tokens * config.embedding_dim * mask_bytes(FP32, step) if config.dropout > 0 else 0
    return 2 * tokens * INDEX + mask


def head_activation_bytes(config: GPTConfig, batch: int, step: Step) -> int:
    """The head's: the final norm (pre-LN), the head's input in the compute dtype, a soft cap's tanh, and the
    float32 log-softmax of the logits (the cross-entropy's)."""
    tokens = batch * config.block_size
    tokens_e, logits = tokens * config.embedding_dim, tokens * config.vocab_size
    c = element_bytes(step.dtype)
    saved = tokens_e * c + logits * FP32
    if config.norm_position == "pre":
        saved += tokens_e * FP32 + norm_bytes(config, tokens, config.embedding_dim, FP32)
    if config.logit_softcap > 0:
        saved += logits * c
    return saved


def saved_per_block(config: GPTConfig, params: Parameters, step: Step) -> int:
    """What a block keeps until its backward pass: everything, or with activation checkpointing its float32
    input alone (the rest is remade when the block is recomputed)."""
    if config.activation_checkpointing:
        return step.micro_batch * config.block_size * config.embedding_dim * FP32
    return block_activation_bytes(config, params, step.micro_batch, step) + weight_copy_bytes(params.per_block, step)


def weight_copy_bytes(numel: int, step: Step) -> int:
    """Autocast casts each matmul's weights to its dtype once per forward pass; the backward pass needs them.
    Under FSDP the gathered weights already are in that dtype (the run's MixedPrecisionPolicy): no copies."""
    c = element_bytes(step.dtype)
    return numel * c if c != FP32 and step.shards == 1 else 0


def gathered_bytes(config: GPTConfig, params: Parameters, step: Step) -> int:
    """FSDP: the root unit (embeddings, final norm, head) stays gathered whole from the forward pass through the
    backward pass, and a block is gathered while it computes and the next one prefetched, in the autocast dtype.
    (Not measured: the CPU tests run one process.)"""
    if step.shards == 1:
        return 0
    root = params.total - config.num_of_layers * params.per_block
    return (root + 2 * params.per_block) * element_bytes(step.dtype)


def block_backward_transient(config: GPTConfig, params: Parameters, step: Step) -> int:
    """Inside a block's backward pass, at its MLP: the float32 gradient of the block's output, the gradients of
    the MLP's hidden tensors (two of width H made while one saved tensor is freed: net H; SwiGLU's three made
    while one is freed: net 2H), the MLP projection's weight gradient; with activation checkpointing, the
    recomputed block (its input is already counted)."""
    tokens = step.micro_batch * config.block_size
    tokens_e = tokens * config.embedding_dim
    c = element_bytes(step.dtype)
    hidden = (2 if config.mlp == "swiglu" else 1) * tokens * params.mlp_hidden * c
    transient = tokens_e * FP32 + hidden + params.mlp_hidden * config.embedding_dim * FP32
    if config.activation_checkpointing:
        transient += block_activation_bytes(config, params, step.micro_batch, step) - tokens_e * FP32
        transient += weight_copy_bytes(params.per_block, step)
    return transient


def optimizer_transient(params: Parameters, step: Step) -> int:
    """Muon orthogonalises one matrix at a time: the Nesterov momentum, the normalised matrix, three iterates
    of it, and the Gram matrix (min(rows, cols)^2), for the largest matrix."""
    if step.optimizer != "muon":
        return 0
    rows, cols = params.largest_matrix
    return (5 * rows * cols + min(rows, cols) ** 2) * FP32


def moments(config: GPTConfig, step: Step, params: Parameters | None = None) -> list[Estimate]:
    """The candidates for the step's peak: the start of the backward pass (every activation saved, the
    cross-entropy's two float32 gradients as large as the logits), the backward pass of the top and of the bottom
    block (gradients of the blocks above made, activations of the blocks above freed), and its end (every
    gradient; the tied embedding's gradient summed from two; the optimizer's work)."""
    params = params or Parameters.of(config)
    layers, shards = config.num_of_layers, step.shards
    weights = params.total * FP32 // shards
    grads = params.total * FP32 // shards
    buckets = grads if step.replicas else 0
    accumulated = grads if step.micro_steps > 1 else 0  # the first micro-batch starts without gradients
    muon = params.muon if step.optimizer == "muon" else 0
    state = (muon + 2 * (params.total - muon)) * FP32 // shards
    outside = outside_activation_bytes(config, step.micro_batch, step) + gathered_bytes(config, params, step)
    head_copy = weight_copy_bytes(params.linear - layers * params.per_block, step)
    per_block = saved_per_block(config, params, step)
    saved = layers * per_block + outside + head_copy + head_activation_bytes(config, step.micro_batch, step)
    logit_grads = 2 * step.micro_batch * config.block_size * config.vocab_size * FP32
    head_grads = config.vocab_size * config.embedding_dim * FP32 // shards
    block_grads = params.per_block * FP32 // shards
    inside = block_backward_transient(config, params, step)

    def block(done: int) -> Estimate:  # the backward pass of the block below `done` finished blocks
        made = accumulated or head_grads + done * block_grads
        which = "top" if done == 0 else "bottom"
        return Estimate(f"the {which} block's backward pass", weights, buckets + made, state,
                        (layers - done) * per_block + outside, inside)

    tied_sum = 2 * config.vocab_size * config.embedding_dim * FP32 if config.tie_embeddings else 0
    return [Estimate("start of the backward pass", weights, buckets + accumulated, state, saved, logit_grads),
            block(0), block(layers - 1),
            Estimate("optimizer step", weights, buckets + grads, state, 0,
                     max(tied_sum // shards, optimizer_transient(params, step)))]


def estimate(config: GPTConfig, step: Step, params: Parameters | None = None) -> Estimate:
    """Peak bytes of one training step of `config` (its vocab_size set) at `step`'s micro-batch and switches;
    `params`: Parameters.of(config), when already counted."""
    return max(moments(config, step, params), key=lambda e: e.peak)


@dataclass(frozen=True)
class MemoryPlan:
    """How a step's sequences are split into micro-batches, and whether blocks are recomputed."""

    sequences: int  # per optimiser step and process: batch_size x grad_accum_steps
    micro_batch: int
    activation_checkpointing: bool
    need: int  # estimated peak bytes
    budget: int | None  # None: no --max_memory and not on CUDA: the user's batch is kept

    @property
    def micro_steps(self) -> int:
        return self.sequences // self.micro_batch

    def describe(self) -> str:
        split = f"{self.sequences} sequences per step as {self.micro_steps} micro-batch(es) of {self.micro_batch}"
        ckpt = "on" if self.activation_checkpointing else "off"
        budget = f"budget {format_size(self.budget)}" if self.budget is not None else "no budget (--max_memory)"
        return (f"memory plan: {split}, activation checkpointing {ckpt}; estimated peak {format_size(self.need)}, "
                f"{budget}")


def divisors_descending(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]), reverse=True)


def plan(config: GPTConfig, sequences: int, step: Step, budget: int | None, micro_batch: int) -> MemoryPlan:
    """The largest micro-batch dividing `sequences` that fits `budget`, without activation checkpointing if it
    can (unless the config asks for it); with no budget, `micro_batch` as the user set it. Refuses, naming the
    budget that would fit, when not even a micro-batch of one sequence with checkpointing does."""

    params = Parameters.of(config)  # counted once: checkpointing and the micro-batch leave them as they are

    def need(m: int, ckpt: bool) -> int:
        c = replace(config, activation_checkpointing=ckpt)
        return estimate(c, replace(step, micro_batch=m, micro_steps=sequences // m), params).peak

    if budget is None:
        ckpt = config.activation_checkpointing
        return MemoryPlan(sequences, micro_batch, ckpt, need(micro_batch, ckpt), None)
    for ckpt in dict.fromkeys((config.activation_checkpointing, True)):
        for m in divisors_descending(sequences):
            if need(m, ckpt) <= budget:
                return MemoryPlan(sequences, m, ckpt, need(m, ckpt), budget)
    least = need(1, True)
    raise UsageError(f"training this {config.num_of_layers}-layer, {config.embedding_dim}-wide model needs about "
                     f"{format_size(least)} even one sequence at a time with --activation_checkpointing, above the "
                     f"{format_size(budget)} budget: --max_memory {math.ceil(least / 2**20)}MB would fit; or use a "
                     f"smaller model or --block_size, or shard it with --fsdp")


def default_budget(free: int) -> int:
    """The CUDA default: the device's free memory less a margin for what the estimate does not count."""
    return free - max(MIN_MARGIN, int(free * MARGIN_FRACTION))


def plan_run(c: "TrainConfig", config: GPTConfig, rt: Runtime) -> MemoryPlan:
    """The plan of a training run of `config` (vocab_size set), before anything is allocated. Its budget is
    --max_memory, or on CUDA the device's free memory less a margin; elsewhere there is none, and the user's
    batch only has to fit the machine's memory."""
    step = Step(c.batch_size, c.grad_accum_steps, rt.dtype, c.optimizer, rt.device.type,
                shards=rt.world_size if rt.fsdp else 1, replicas=rt.distributed and not rt.fsdp)
    if c.max_memory is not None:
        budget = parse_size(c.max_memory)
    elif rt.device.type == "cuda":
        budget = default_budget(torch.cuda.mem_get_info(rt.device)[0])
    else:
        budget = None
    memory_plan = plan(config, c.batch_size * c.grad_accum_steps, step, budget, c.batch_size)
    if budget is None:
        check_fits(memory_plan.need, rt.device, f"training a {config.num_of_layers}-layer, "
                                                f"{config.embedding_dim}-wide model")
    return memory_plan
