"""FSDP2 for the training loop: shard a GPT across the ranks, build one sharded from the start, and give rank 0
a whole copy back; and each rank's part of a sharded checkpoint (--checkpoint_format dcp), under FSDP, DDP or in
a single process."""

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from gpt import GPT, GPTConfig
from gptlab.checkpoint import join_tensors, read_shards, split_tensors
from gptlab.runtime import Runtime

# Checkpointed state dicts: whole (unsharded) tensors under a plain GPT's names, copied to the CPU; under
# FSDP or DDP only rank 0 receives them (the others get empty dicts), so no rank holds the full model twice.
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard(model: GPT, rt: Runtime) -> None:
    """FSDP2, in place: each block, then the root (embeddings, final norm and the head, tied to the token
    embedding or a matrix of its own), becomes a unit whose parameters are split across the ranks and gathered
    whole only while that unit computes. The parameters become DTensors, so make the optimizer afterwards. In
    bfloat16, the gathered parameters are bfloat16 (half the traffic) and gradients are reduced in float32."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if rt.dtype == torch.bfloat16 else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def sharded_model(config: GPTConfig, rt: Runtime, weights: dict[str, torch.Tensor] | None) -> GPT:
    """FSDP: the model is built without memory (meta device), sharded, then given storage on the device, so no
    GPU ever holds it whole; rank 0 makes the full initial weights (or the checkpoint's) in CPU memory and each
    rank receives its shard of them."""
    if rt.is_main and weights is None:
        weights = GPT(config).state_dict()  # the initial weights a single process would start from
    with torch.device("meta"):
        model = GPT(config)
    shard(model, rt)
    model.to_empty(device=rt.device)
    set_model_state_dict(model, weights if rt.is_main else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def unsharded_copy(model: GPT, rt: Runtime) -> GPT | None:
    """Rank 0's plain copy of an FSDP model in CPU memory (None on the other ranks), for work rank 0 does alone:
    a sharded forward pass would wait for the others, and a whole copy might not fit its GPU. Every rank must
    call it, since it all-gathers."""
    full = get_model_state_dict(model, options=FULL_STATE)
    if not rt.is_main:
        return None
    copy = GPT(model.config)
    copy.load_state_dict(full)
    return copy


def load_shards(ckpt: dict[str, Any], model: GPT, optimizer: torch.optim.Optimizer, rt: Runtime) -> dict[str, Any]:
    """Resume from a sharded folder (ckpt: load_checkpoint(..., tensors=False)): each rank reads its part of the
    weights and of the optimizer state, whatever number of processes wrote them, and the entries that are whole
    on every rank (the EMA) whole. Returns the checkpoint with its tensors in place."""
    model_state = get_model_state_dict(model)  # this rank's shards (whole tensors without FSDP) to read into
    optimizer_state = get_optimizer_state_dict(model, optimizer)  # makes the moments (a zero step) to read into
    targets, _ = split_tensors({"model": model_state, "optimizer": optimizer_state})
    full = join_tensors(ckpt, read_shards(ckpt["sharded_folder"], targets, rt.distributed))
    set_model_state_dict(model, full["model"])
    set_optimizer_state_dict(model, optimizer, full["optimizer"])
    return full
