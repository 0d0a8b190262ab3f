"""Our GPT's weights <-> Hugging Face transformers' layouts, both ways, and local transformers folders in.

Three transformers classes compute exactly what some of our configs compute:
    GPT2LMHeadModel   learned positions, LayerNorm, GELU (tanh), pre-LN, biases, tied head
    LlamaForCausalLM  RoPE (rotate_half pairs: feature i with i + D/2, as ours), RMSNorm, SwiGLU, no biases,
                      pre-LN, tied or untied head
    Qwen3ForCausalLM  Llama's shape with QK-norm (an RMSNorm on each head's queries and keys, before RoPE)
A config either fits one of them exactly or is refused with one line naming, per target, the settings it
cannot express (TARGETS lists what each computes, FREE what all carry): nothing is converted approximately.

Our RoPE model attends to the last block_size tokens only (a sliding window); Llama and Qwen3 attend to
everything.
Both agree on every sequence up to block_size tokens, which is why config.json's max_position_embeddings
is block_size.
"""

import json
from collections.abc import Iterator
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from attention import RMSNorm
from gpt import GPT, GPTConfig, swiglu_hidden_size
from gptlab.checkpoint import CHECKPOINT_VERSION, load_checkpoint, sharded_folder
from gptlab.errors import UsageError
from gptlab.tokenizer import EOT, Tokenizer

RMS_EPS = RMSNorm(1).eps  # our RMSNorm's epsilon (not a config setting): Llama's rms_norm_eps must equal it
LAYERNORM_EPS = 1e-5  # nn.LayerNorm's default, which our LayerNorms use; GPT-2's layer_norm_epsilon


# ----------------------------------------------------------------------------- which architecture fits

# Settings every target carries as a number or that change nothing a target computes: the sizes, dropout (off at
# inference), the attention path (the same math), init and activation checkpointing (training only), and
# rope_base (rope_theta; unused without RoPE).
FREE = frozenset({"vocab_size", "block_size", "embedding_dim", "num_of_layers", "num_of_heads", "dropout",
                  "attention", "init", "activation_checkpointing", "rope_base"})

# Every other GPTConfig setting, per target: the values that target computes exactly. A setting a target does
# not list is refused for it, so a new model switch is never exported as a model that computes something else
# (tests/test_export.py checks that each setting is free or listed for every target).
_DECODER = {"norm_position": ("pre",), "causal": (True,), "logit_softcap": (0.0,)}
_ROPE_SWIGLU = {**_DECODER, "position": ("rope",), "norm": ("rmsnorm",), "mlp": ("swiglu",), "bias": (False,),
                "tie_embeddings": (True, False)}
TARGETS: dict[str, dict[str, tuple[Any, ...]]] = {
    "gpt2": {**_DECODER, "position": ("learned",), "norm": ("layernorm",), "mlp": ("gelu",), "bias": (True,),
             "tie_embeddings": (True,), "qk_norm": (False,)},
    "llama": {**_ROPE_SWIGLU, "qk_norm": (False,)},
    "qwen3": {**_ROPE_SWIGLU, "qk_norm": (True,)},  # Qwen3 = Llama + an RMSNorm on each head's queries and keys
}
DISPLAY = {"gpt2": "GPT-2", "llama": "Llama", "qwen3": "Qwen3"}
HF_CLASS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def as_flag(name: str, value: Any) -> str:
    """A setting as the flag that sets it: --qk_norm, --no-bias, --mlp gelu, --logit_softcap 30."""
    if name == "causal" and not value:  # no flag: the training objective sets it
        return "causal=False (a masked-language-model encoder)"
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    return f"--{name} {value:g}" if isinstance(value, float) else f"--{name} {value}"


def mismatches(target: str, c: GPTConfig) -> list[str]:
    """The settings of c (as flags) that the target cannot compute exactly; empty when it can."""
    allowed = TARGETS[target]
    return [as_flag(f.name, getattr(c, f.name)) for f in fields(c)
            if f.name not in FREE and getattr(c, f.name) not in allowed.get(f.name, ())]


def settings_that_export(target: str) -> str:
    """The flags a model needs to export to the target (those that differ from GPTConfig's defaults)."""
    defaults = GPTConfig()
    flags = [as_flag(name, values[0]) for name, values in TARGETS[target].items()
             if getattr(defaults, name) not in values]
    return " ".join(flags) or "the defaults"


def architecture_for(c: GPTConfig) -> str:
    """"gpt2", "llama" or "qwen3": the architecture that computes exactly what this config computes. Otherwise
    a UsageError naming, per target, the settings it cannot express and the settings it would export."""
    for target in TARGETS:
        if not mismatches(target, c):
            return target
    reasons = [f"{DISPLAY[t]} cannot express {', '.join(mismatches(t, c))} (it exports {settings_that_export(t)})"
               for t in TARGETS]
    raise UsageError("no export target computes this model exactly, nothing exported: " + "; ".join(reasons))


def _require(target: str, c: GPTConfig) -> None:
    problem = mismatches(target, c)
    if problem:
        raise UsageError(f"{', '.join(problem)}: a {DISPLAY[target]} model cannot represent this exactly")


# ----------------------------------------------------------------------------- GPT-2

# Our parameter names -> transformers' GPT2LMHeadModel names ("{}" is the block index).
_GPT2_NAMES = {
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


def _name_pairs(names: dict[str, str], num_of_layers: int) -> Iterator[tuple[str, str]]:
    for ours, theirs in names.items():
        layers = range(num_of_layers) if "{}" in ours else [None]
        for i in layers:
            yield ours.format(i), theirs.format(i)


def gpt2_to_ours(state_dict: dict[str, torch.Tensor], c: GPTConfig) -> dict[str, torch.Tensor]:
    """A GPT2LMHeadModel state dict under our names and layouts (the head is the token embedding)."""
    _require("gpt2", c)
    ours = {}
    for name, hf_name in _name_pairs(_GPT2_NAMES, c.num_of_layers):
        w = _take(state_dict, hf_name)
        ours[name] = w.t() if name.endswith(_TRANSPOSED) else w
    ours["lm_head.weight"] = ours["wte.weight"]
    return ours


def to_hf_gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under transformers' GPT2LMHeadModel names and layouts (load with strict=False: the
    attention-mask buffers some transformers versions keep are not weights). lm_head.weight is the token
    embedding itself (tied)."""
    _require("gpt2", model.config)
    sd = model.state_dict()
    out = {}
    for name, hf_name in _name_pairs(_GPT2_NAMES, model.config.num_of_layers):
        w = sd[name]
        out[hf_name] = (w.t() if name.endswith(_TRANSPOSED) else w).contiguous()
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


# ----------------------------------------------------------------------------- Llama and Qwen3

# Our names -> LlamaForCausalLM / Qwen3ForCausalLM names, for the weights that map one to one. Our fused qkv is
# split into q_proj, k_proj, v_proj (rows 0..E-1, E..2E-1, 2E..3E-1: the order MultiHeadAttention splits them in).
_LLAMA_NAMES = {
    "wte.weight": "model.embed_tokens.weight",
    "ln_f.weight": "model.norm.weight",
    "blocks.{}.ln_1.weight": "model.layers.{}.input_layernorm.weight",
    "blocks.{}.attn.proj.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blocks.{}.ln_2.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blocks.{}.mlp.gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blocks.{}.mlp.up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blocks.{}.mlp.proj.weight": "model.layers.{}.mlp.down_proj.weight",
}
# Qwen3's per-head RMSNorm gains, applied to queries and keys before RoPE, as ours are.
_QWEN3_NAMES = {**_LLAMA_NAMES,
                "blocks.{}.attn.q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
                "blocks.{}.attn.k_norm.weight": "model.layers.{}.self_attn.k_norm.weight"}
_QKV = ("q_proj", "k_proj", "v_proj")


def _rope_target(c: GPTConfig) -> tuple[str, dict[str, str]]:
    """("llama" | "qwen3", its one-to-one names) for a RoPE + RMSNorm + SwiGLU config: QK-norm decides."""
    return ("qwen3", _QWEN3_NAMES) if c.qk_norm else ("llama", _LLAMA_NAMES)


def llama_to_ours(state_dict: dict[str, torch.Tensor], c: GPTConfig) -> dict[str, torch.Tensor]:
    """A LlamaForCausalLM or Qwen3ForCausalLM state dict (as many key/value heads as query heads) under our
    names. RoPE needs no permutation: transformers pairs feature i with i + D/2 (rotate_half), as we do."""
    target, names = _rope_target(c)
    _require(target, c)
    ours = {name: _take(state_dict, hf) for name, hf in _name_pairs(names, c.num_of_layers)}
    for i in range(c.num_of_layers):
        parts = [_take(state_dict, f"model.layers.{i}.self_attn.{p}.weight") for p in _QKV]
        ours[f"blocks.{i}.attn.qkv.weight"] = torch.cat(parts, dim=0)
    ours["lm_head.weight"] = ours["wte.weight"] if c.tie_embeddings else _take(state_dict, "lm_head.weight")
    return ours


def to_hf_llama_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under LlamaForCausalLM's or (QK-norm) Qwen3ForCausalLM's names (lm_head.weight only for an
    untied head)."""
    c = model.config
    target, names = _rope_target(c)
    _require(target, c)
    sd = model.state_dict()
    out = {hf: sd[name].contiguous() for name, hf in _name_pairs(names, c.num_of_layers)}
    for i in range(c.num_of_layers):
        for part, w in zip(_QKV, sd[f"blocks.{i}.attn.qkv.weight"].chunk(3, dim=0), strict=True):
            out[f"model.layers.{i}.self_attn.{part}.weight"] = w.contiguous()
    if not c.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"].contiguous()
    return out


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights in the layout of the transformers class that computes this model exactly, each tensor
    once (a tied head is left to transformers to tie, as its save_pretrained does)."""
    if architecture_for(model.config) != "gpt2":
        return to_hf_llama_state_dict(model)
    sd = to_hf_gpt2_state_dict(model)
    del sd["lm_head.weight"]
    return sd


def _take(state_dict: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in state_dict:
        raise UsageError(f"the weights lack {name}: not a complete model of the shape its config.json describes")
    return state_dict[name]


# ----------------------------------------------------------------------------- config.json both ways

def hf_config(c: GPTConfig, eot_id: int) -> dict[str, Any]:
    """config.json for the transformers class that computes this model exactly."""
    arch = architecture_for(c)
    common = {"architectures": [HF_CLASS[arch]], "model_type": arch, "vocab_size": c.vocab_size,
              "bos_token_id": eot_id, "eos_token_id": eot_id, "tie_word_embeddings": c.tie_embeddings,
              "torch_dtype": "float32", "use_cache": True}
    if arch == "gpt2":
        return {**common, "n_positions": c.block_size, "n_embd": c.embedding_dim, "n_layer": c.num_of_layers,
                "n_head": c.num_of_heads, "n_inner": 4 * c.embedding_dim, "activation_function": "gelu_new",
                "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
                "layer_norm_epsilon": LAYERNORM_EPS, "initializer_range": 0.02, "scale_attn_weights": True}
    # Llama and Qwen3 share these; Qwen3's q_norm and k_norm also use rms_norm_eps, as ours use RMSNorm's eps
    rope = {**common, "hidden_size": c.embedding_dim, "intermediate_size": swiglu_hidden_size(c.embedding_dim),
            "num_hidden_layers": c.num_of_layers, "num_attention_heads": c.num_of_heads,
            "num_key_value_heads": c.num_of_heads, "head_dim": c.embedding_dim // c.num_of_heads,
            "hidden_act": "silu", "max_position_embeddings": c.block_size, "rms_norm_eps": RMS_EPS,
            # transformers 5 reads rope_parameters, 4.x reads rope_theta
            "rope_theta": c.rope_base, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_base},
            "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02}
    return {**rope, "mlp_bias": False} if arch == "llama" else {**rope, "use_sliding_window": False}


def _check_equal(hf: dict[str, Any], key: str, want: Any, why: str) -> None:
    got = hf.get(key, want)
    if got != want and not (isinstance(want, float) and isinstance(got, int | float) and abs(got - want) < 1e-12):
        raise UsageError(f"config.json has {key}={got!r}, but {why} needs {want!r}")


def _gpt2_config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    e = hf["n_embd"]
    if hf.get("n_inner") not in (None, 4 * e):
        raise UsageError(f"config.json has n_inner={hf['n_inner']}, but our GELU MLP is 4 x n_embd = {4 * e} wide")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UsageError(f"config.json has activation_function={hf['activation_function']!r}, but our GPT-2 "
                         f"MLP is GELU in its tanh approximation (gelu_new)")
    _check_equal(hf, "layer_norm_epsilon", LAYERNORM_EPS, "our LayerNorm")
    _check_equal(hf, "scale_attn_by_inverse_layer_idx", False, "our attention")
    _check_equal(hf, "scale_attn_weights", True, "our attention")
    return GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], embedding_dim=e,
                     num_of_layers=hf["n_layer"], num_of_heads=hf["n_head"], dropout=hf.get("resid_pdrop", 0.1))


def _rope_config_from_hf(hf: dict[str, Any], qk_norm: bool) -> GPTConfig:
    """A Llama (qk_norm False) or Qwen3 (True) config.json as our RoPE + RMSNorm + SwiGLU config."""
    e, heads = hf["hidden_size"], hf["num_attention_heads"]
    _check_equal(hf, "num_key_value_heads", heads, "our attention (no grouped-query attention)")
    _check_equal(hf, "head_dim", e // heads, "our attention (head size hidden_size / heads)")
    _check_equal(hf, "intermediate_size", swiglu_hidden_size(e), "our SwiGLU (hidden size from "
                 "gpt.swiglu_hidden_size)")
    _check_equal(hf, "hidden_act", "silu", "our SwiGLU")
    _check_equal(hf, "rms_norm_eps", RMS_EPS, "our RMSNorm")
    _check_equal(hf, "attention_bias", False, "our bias-free shape")
    _check_equal(hf, "mlp_bias", False, "our bias-free shape")
    _check_equal(hf, "use_sliding_window", False, "our attention (the whole context up to block_size)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UsageError(f"config.json asks for rope scaling {rope.get('rope_type', rope.get('type'))!r}; "
                         f"our RoPE has none")
    base = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    return GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"], embedding_dim=e,
                     num_of_layers=hf["num_hidden_layers"], num_of_heads=heads,
                     dropout=hf.get("attention_dropout", 0.0), bias=False, position="rope", rope_base=float(base),
                     norm="rmsnorm", mlp="swiglu", qk_norm=qk_norm, tie_embeddings=hf.get("tie_word_embeddings",
                                                                                            False))


def gpt_config_from_hf(hf: dict[str, Any]) -> tuple[str, GPTConfig]:
    """("gpt2" | "llama" | "qwen3", our GPTConfig) from a transformers config.json dict; anything we cannot
    compute exactly (another architecture, grouped-query attention, another MLP width, rope scaling, ...) is
    refused."""
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        return "gpt2", _gpt2_config_from_hf(hf)
    if model_type in ("llama", "qwen3"):
        return model_type, _rope_config_from_hf(hf, qk_norm=model_type == "qwen3")
    raise UsageError(f"config.json describes a {model_type!r} model; only gpt2 (GPT2LMHeadModel), llama "
                     f"(LlamaForCausalLM) and qwen3 (Qwen3ForCausalLM) folders can be loaded")


# ----------------------------------------------------------------------------- a local transformers folder

def load_hf_folder(path: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor], Tokenizer]:
    """Our config, our state dict (float32) and our tokenizer from a folder written by transformers'
    save_pretrained (config.json, model.safetensors or pytorch_model.bin, tokenizer.json) holding a
    GPT2LMHeadModel, LlamaForCausalLM or Qwen3ForCausalLM. Nothing is ever downloaded."""
    folder = Path(path)
    if not folder.is_dir():
        raise UsageError(f"{path} is not a local folder; nothing is downloaded: save the model with "
                         f"save_pretrained first")
    hf = _read_json(folder / "config.json")
    if not isinstance(hf, dict):
        raise UsageError(f"{folder}: config.json does not hold a mapping of settings")
    try:  # a hand-edited or damaged config.json: a missing key, a word for a number
        arch, config = gpt_config_from_hf(hf)
    except KeyError as e:
        raise UsageError(f"{folder}: config.json lacks {e.args[0]!r}") from None
    except (UsageError, TypeError, ValueError) as e:
        raise UsageError(f"{folder}: config.json is not a model's config ({e})") from None
    weights = {k: v.float() for k, v in _read_weights(folder).items()}
    ours = gpt2_to_ours(weights, config) if arch == "gpt2" else llama_to_ours(weights, config)
    tokenizer = read_hf_tokenizer(folder)
    if tokenizer.vocab_size != config.vocab_size:
        raise UsageError(f"{folder}: tokenizer.json has {tokenizer.vocab_size} tokens but the model's embedding "
                         f"{config.vocab_size} rows; our models need the two equal")
    return config, ours, tokenizer


def checkpoint_from_hf_folder(path: str | Path) -> dict[str, Any]:
    """A transformers folder as the dict load_checkpoint returns (model_config, model, tokenizer, iteration 0),
    so checkpoint.model_from_checkpoint and everything after it work unchanged."""
    config, state, tokenizer = load_hf_folder(path)
    return {"version": CHECKPOINT_VERSION, "model_config": asdict(config), "model": state,
            "tokenizer": tokenizer.to_json(), "iteration": 0, "best_val_loss": float("inf"),
            "source": str(path)}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path.parent} has no {path.name}: not a folder written by save_pretrained") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors (or its shards, listed in model.safetensors.index.json), else pytorch_model.bin."""
    index = folder / "model.safetensors.index.json"
    weight_map = _read_json(index).get("weight_map") if index.exists() else {"": "model.safetensors"}
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise UsageError(f"{index} has no weight_map of tensor names to files")
    files = sorted(set(weight_map.values()))
    if all((folder / f).exists() for f in files):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UsageError("reading model.safetensors needs the safetensors package: pip install safetensors") \
                from None
        weights: dict[str, torch.Tensor] = {}
        for f in files:
            weights.update(_load_weights(folder / f, load_file))
        return weights
    if (folder / "pytorch_model.bin").exists():
        return _load_weights(folder / "pytorch_model.bin",
                             lambda path: torch.load(path, map_location="cpu", weights_only=True))
    raise UsageError(f"{folder} has neither model.safetensors nor pytorch_model.bin")


def _load_weights(path: Path, load: Any) -> dict[str, torch.Tensor]:
    """One weights file: a mapping of names to tensors, or one UsageError (truncated, random, another shape)."""
    try:
        weights = load(path)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors and pickle report damage with types of their own
        raise UsageError(f"cannot read {path}: damaged or not a weights file ({str(e).splitlines()[0][:200]})") \
            from None
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise UsageError(f"{path} does not hold a mapping of tensor names to tensors")
    return weights


def read_hf_tokenizer(folder: Path) -> Tokenizer:
    """tokenizer.json as our Tokenizer. Ours marks the end of a text with <|endoftext|>; a tokenizer with
    another end-of-sequence token (Llama's "</s>", "<|end_of_text|>") has that token renamed <|endoftext|>,
    its id unchanged, so generation stops where the original model's does."""
    path = folder / "tokenizer.json"
    if not path.exists():
        raise UsageError(f"{folder} has no tokenizer.json (a fast tokenizer's file): load its tokenizer with "
                         f"transformers.AutoTokenizer and save_pretrained it into the folder")
    data = _read_json(path)
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a tokenizer's JSON")
    text = path.read_text(encoding="utf-8")
    if any(t["content"] == EOT for t in data.get("added_tokens", [])) or EOT in _vocab(data):
        return Tokenizer.from_json(text, source=str(path))
    eos = _eos_token(folder)
    if eos is None:
        raise UsageError(f"{path} has no {EOT} token and the folder names no eos_token to stand for it")
    renamed = False
    for t in data.get("added_tokens", []):
        if t["content"] == eos:
            t["content"], renamed = EOT, True
    vocab = _vocab(data)
    if eos in vocab:
        vocab[EOT] = vocab.pop(eos)
        renamed = True
    if not renamed:
        raise UsageError(f"{path} lacks its own eos token {eos!r}: cannot mark the end of a text")
    return Tokenizer.from_json(json.dumps(data, ensure_ascii=False), source=str(path))


def _vocab(tokenizer_json: dict[str, Any]) -> dict[str, int]:
    vocab = tokenizer_json.get("model", {}).get("vocab")
    return vocab if isinstance(vocab, dict) else {}  # a Unigram model's vocab is a list: no renaming there


def _eos_token(folder: Path) -> str | None:
    """The eos token's text, from tokenizer_config.json or special_tokens_map.json."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).exists():
            settings = _read_json(folder / name)
            eos = settings.get("eos_token") if isinstance(settings, dict) else None
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str):
                return eos
    return None


def load_checkpoint_or_folder(path: str | Path) -> dict[str, Any]:
    """A checkpoint written here (a file or a sharded folder), or a local transformers folder (GPT-2, Llama or
    Qwen3) read as one."""
    hf_folder = Path(path).is_dir() and sharded_folder(path) is None
    return checkpoint_from_hf_folder(path) if hf_folder else load_checkpoint(path)
