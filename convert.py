"""Our GPT's weights <-> Hugging Face transformers' GPT2LMHeadModel layout, both ways.

Only a model of exactly GPT-2's shape converts (pre-LayerNorm, biases, learned positions, GELU MLP, tied head);
anything else is refused with one line naming the setting that GPT-2 does not have.
"""

from collections.abc import Iterator

import torch

from errors import UsageError
from gpt import GPT, GPTConfig

# Our parameter names -> transformers' GPT2LMHeadModel names ("{}" is the block index).
_HF_NAMES = {
    "wte.weight": "transformer.wte.weight",
    "wpe.weight": "transformer.wpe.weight",
    "ln_f.weight": "transformer.ln_f.weight",
    "ln_f.bias": "transformer.ln_f.bias",
    "blocks.{}.ln_1.weight": "transformer.h.{}.ln_1.weight",
    "blocks.{}.ln_1.bias": "transformer.h.{}.ln_1.bias",
    "blocks.{}.attn.qkv.weight": "transformer.h.{}.attn.c_attn.weight",
    "blocks.{}.attn.qkv.bias": "transformer.h.{}.attn.c_attn.bias",
    "blocks.{}.attn.proj.weight": "transformer.h.{}.attn.c_proj.weight",
    "blocks.{}.attn.proj.bias": "transformer.h.{}.attn.c_proj.bias",
    "blocks.{}.ln_2.weight": "transformer.h.{}.ln_2.weight",
    "blocks.{}.ln_2.bias": "transformer.h.{}.ln_2.bias",
    "blocks.{}.mlp.fc.weight": "transformer.h.{}.mlp.c_fc.weight",
    "blocks.{}.mlp.fc.bias": "transformer.h.{}.mlp.c_fc.bias",
    "blocks.{}.mlp.proj.weight": "transformer.h.{}.mlp.c_proj.weight",
    "blocks.{}.mlp.proj.bias": "transformer.h.{}.mlp.c_proj.bias",
}
# GPT-2 stores these as Conv1D weights, (in, out): the transpose of nn.Linear's (out, in).
_TRANSPOSED = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight")


def _name_pairs(num_of_layers: int) -> Iterator[tuple[str, str]]:
    for ours, theirs in _HF_NAMES.items():
        layers = range(num_of_layers) if "{}" in ours else [None]
        for i in layers:
            yield ours.format(i), theirs.format(i)


def from_hf_gpt2(state_dict: dict[str, torch.Tensor], config: GPTConfig) -> GPT:
    """A GPT (pre-LN, with biases) holding the weights of a transformers GPT2LMHeadModel state dict."""
    if config.norm_position != "pre" or not config.bias:
        raise UsageError("GPT-2 weights need norm_position='pre' and bias=True")
    model = GPT(config)
    ours = {}
    for name, hf_name in _name_pairs(config.num_of_layers):
        w = state_dict[hf_name]
        ours[name] = w.t() if name.endswith(_TRANSPOSED) else w
    ours["lm_head.weight"] = ours["wte.weight"]
    model.load_state_dict(ours)
    return model


def to_hf_gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under transformers' GPT2LMHeadModel names and layouts (load with strict=False: the
    attention-mask buffers some transformers versions keep are not weights)."""
    sd = model.state_dict()
    out = {}
    for name, hf_name in _name_pairs(model.config.num_of_layers):
        w = sd[name]
        out[hf_name] = (w.t() if name.endswith(_TRANSPOSED) else w).contiguous()
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out
