"""A local Hugging Face transformers folder (written by save_pretrained) read as one of our checkpoints: its
config.json, weights (safetensors, sharded or not, or pytorch_model.bin) and tokenizer.json. Nothing is ever
downloaded. The mapping of settings and weight layouts is gptlab/convert.py's.
"""

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from gpt import GPTConfig
from gptlab.checkpoint import CHECKPOINT_VERSION, load_checkpoint, sharded_folder
from gptlab.convert import gpt2_to_ours, gpt_config_from_hf, llama_to_ours
from gptlab.errors import UsageError
from gptlab.tokenizer import EOT, Tokenizer


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
