"""Export a checkpoint for other tools: a Hugging Face transformers folder, or a GGUF file for llama.cpp.

    python export.py --checkpoint model_checkpoint.tar --out my-model            # transformers folder
    python export.py --checkpoint model_checkpoint.tar --out my-gguf --format gguf

hf:   config.json, model.safetensors (float32), generation_config.json, tokenizer.json with its
      tokenizer_config.json and special_tokens_map.json, and a README.md model card, so that
      AutoModelForCausalLM / AutoTokenizer / pipeline("text-generation", model=DIR) load it offline.
gguf: DIR/model.gguf (float32 tensors; llama.cpp's llama-quantize makes smaller ones), an Ollama Modelfile
      (ollama create NAME -f DIR/Modelfile) and the model card.

A GPT-2-shaped model becomes GPT2LMHeadModel (GGUF: gpt2), a RoPE + RMSNorm + SwiGLU + bias-free one
LlamaForCausalLM (GGUF: llama), and the same with QK-norm Qwen3ForCausalLM (GGUF: qwen3); any other model is
refused, naming per target the settings it cannot express (see convert.py).
Everything is written into a temporary folder beside --out and renamed at the end: a failure leaves nothing.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpt import GPT, swiglu_hidden_size
from gptlab.checkpoint import RAW_WEIGHTS_HELP, load_checkpoint, model_from_checkpoint
from gptlab.cli import check_fields, parse_dataclass, setting
from gptlab.convert import HF_CLASS, RMS_EPS, architecture_for, hf_config, to_hf_state_dict
from gptlab.errors import UsageError, run_cli
from gptlab.fileio import atomic_write_folder
from gptlab.metrics import METRICS, earlier_run_file, read_metrics, run_file
from gptlab.tokenizer import BERT_TOKENS, CLS, EOT, MASK, PAD, SEP, UNK, Tokenizer

FORMATS = ("hf", "gguf")
# Every file an export writes, either format: a folder holding these and nothing else, with our model card, is an
# earlier export, which --overwrite may replace; any other folder is the user's.
EXPORT_FILES = frozenset({"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                          "special_tokens_map.json", "tokenizer_config.json", "model.gguf", "Modelfile", "README.md"})
CARD_TAG = "tags: [gpt-experiments]"  # in the model card's header


@dataclass(frozen=True)
class ExportArgs:
    checkpoint: str = setting("model_checkpoint.tar", "checkpoint to export")
    out: str | None = setting(None, "folder to write (required); it must not exist or be empty, unless it holds an "
                              "earlier export and --overwrite is given",
                              output=True)
    format: str = setting("hf", "hf: a Hugging Face transformers folder; gguf: a GGUF file for llama.cpp",
                          choices=FORMATS)
    overwrite: bool = setting(False, "replace an earlier export in --out (a folder of other files is refused)")
    raw_weights: bool = setting(False, RAW_WEIGHTS_HELP)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.out is None:
            raise UsageError("--out is required: the folder to export into")


# ----------------------------------------------------------------------------- the Hugging Face folder

def write_hf(model: GPT, tokenizer: Tokenizer, folder: Path) -> None:
    """config.json, model.safetensors, generation_config.json and the tokenizer files into `folder`."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UsageError("--format hf writes model.safetensors with the safetensors package: "
                         "pip install safetensors") from None
    c = model.config
    _write_json(folder / "config.json", hf_config(c, tokenizer.eot_id))
    weights = {k: v.detach().float().cpu().contiguous() for k, v in to_hf_state_dict(model).items()}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    _write_json(folder / "generation_config.json", {"bos_token_id": tokenizer.eot_id,
                                                    "eos_token_id": tokenizer.eot_id,
                                                    "pad_token_id": tokenizer.eot_id})
    (folder / "tokenizer.json").write_text(tokenizer.to_json(), encoding="utf-8")
    specials = special_tokens_map(tokenizer)
    _write_json(folder / "special_tokens_map.json", specials)
    # The generic fast tokenizer runs tokenizer.json as it is; GPT2TokenizerFast / LlamaTokenizerFast would
    # add prefix spaces or a BOS token, and clean_up_tokenization_spaces would change decoded text.
    _write_json(folder / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast",
                                                   "model_max_length": c.block_size,
                                                   "clean_up_tokenization_spaces": False, **specials})


def special_tokens_map(tokenizer: Tokenizer) -> dict[str, str]:
    """transformers' names for our special tokens: the end of text is both BOS and EOS, as in GPT-2."""
    names = {"bos_token": EOT, "eos_token": EOT}
    roles = {UNK: "unk_token", MASK: "mask_token", PAD: "pad_token", CLS: "cls_token", SEP: "sep_token"}
    for token in (UNK, *BERT_TOKENS):
        if tokenizer.hf.token_to_id(token) is not None:
            names[roles[token]] = token
    return names


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- GGUF

def _permute_for_llama_cpp(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows from our rotate_half order to llama.cpp's. Per head, we rotate feature i with i + D/2;
    llama.cpp's llama rotates adjacent features (2i, 2i + 1). Interleaving each head's two halves of rows,
    (0, D/2, 1, D/2 + 1, ...), gives the same dot products."""
    d = w.size(0) // heads
    return w.reshape(heads, 2, d // 2, -1).transpose(1, 2).reshape(w.shape)


def gguf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under llama.cpp's tensor names (nn.Linear's (out, in) layout, as llama.cpp reads them)."""
    c, sd = model.config, model.state_dict()
    arch = architecture_for(c)
    out = {"token_embd.weight": sd["wte.weight"], "output_norm.weight": sd["ln_f.weight"]}
    if arch == "gpt2":
        out |= {"position_embd.weight": sd["wpe.weight"], "output_norm.bias": sd["ln_f.bias"],
                "output.weight": sd["lm_head.weight"]}  # written although tied: older llama.cpp requires it
    elif not c.tie_embeddings:  # a llama or qwen3 without "output" reuses token_embd
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(c.num_of_layers):
        ours, blk = f"blocks.{i}.", f"blk.{i}."
        if arch == "gpt2":
            names = {"ln_1": "attn_norm", "attn.qkv": "attn_qkv", "attn.proj": "attn_output", "ln_2": "ffn_norm",
                     "mlp.fc": "ffn_up", "mlp.proj": "ffn_down"}
            for a, b in names.items():
                out[f"{blk}{b}.weight"], out[f"{blk}{b}.bias"] = sd[f"{ours}{a}.weight"], sd[f"{ours}{a}.bias"]
            continue
        q, k, v = sd[f"{ours}attn.qkv.weight"].chunk(3, dim=0)
        if arch == "llama":
            q, k = _permute_for_llama_cpp(q, c.num_of_heads), _permute_for_llama_cpp(k, c.num_of_heads)
        else:  # llama.cpp's qwen3 rotates (i, i + D/2) pairs (NEOX rope), as we do: no permutation
            out[f"{blk}attn_q_norm.weight"] = sd[f"{ours}attn.q_norm.weight"]
            out[f"{blk}attn_k_norm.weight"] = sd[f"{ours}attn.k_norm.weight"]
        out |= {f"{blk}attn_norm.weight": sd[f"{ours}ln_1.weight"],
                f"{blk}attn_q.weight": q,
                f"{blk}attn_k.weight": k,
                f"{blk}attn_v.weight": v,
                f"{blk}attn_output.weight": sd[f"{ours}attn.proj.weight"],
                f"{blk}ffn_norm.weight": sd[f"{ours}ln_2.weight"],
                f"{blk}ffn_gate.weight": sd[f"{ours}mlp.gate.weight"],
                f"{blk}ffn_up.weight": sd[f"{ours}mlp.up.weight"],
                f"{blk}ffn_down.weight": sd[f"{ours}mlp.proj.weight"]}
    return {name: w.detach().float().cpu().contiguous() for name, w in out.items()}


def gguf_vocabulary(tokenizer: Tokenizer) -> tuple[list[str], list[int], list[str]]:
    """(tokens in id order, their llama.cpp token types, merges as "left right") of a byte-level BPE
    tokenizer, which llama.cpp's "gpt2" tokenizer model runs exactly. Special tokens are CONTROL tokens."""
    import gguf

    if tokenizer.kind != "bbpe":
        raise UsageError("--format gguf needs a byte-level BPE (bbpe) tokenizer: llama.cpp has no tokenizer that "
                         "runs our character-level bpe kind (Metaspace + punctuation splits, <unk>) exactly")
    vocab = tokenizer.hf.get_vocab(with_added_tokens=True)
    tokens = [""] * tokenizer.vocab_size
    for token, i in vocab.items():
        tokens[i] = token
    if "" in tokens:
        raise UsageError("the tokenizer's ids are not contiguous: GGUF stores the vocabulary as a list")
    special = set(tokenizer.special_ids)
    types = [int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL) for i in range(len(tokens))]
    merges = json.loads(tokenizer.to_json())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]  # tokenizers >= 0.20 writes pairs
    return tokens, types, merges


def write_gguf(model: GPT, tokenizer: Tokenizer, path: Path) -> None:
    """A GGUF file (float32 tensors) that llama.cpp runs as architecture gpt2, llama or qwen3."""
    try:
        import gguf
    except ImportError:
        raise UsageError("--format gguf needs the gguf package (llama.cpp's): pip install gguf") from None
    c = model.config
    arch = architecture_for(c)
    tokens, types, merges = gguf_vocabulary(tokenizer)
    w = gguf.GGUFWriter(path, arch)
    w.add_name(path.parent.name)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(c.block_size)
    w.add_embedding_length(c.embedding_dim)
    w.add_block_count(c.num_of_layers)
    w.add_head_count(c.num_of_heads)
    if arch == "gpt2":
        w.add_feed_forward_length(4 * c.embedding_dim)
        w.add_layer_norm_eps(1e-5)
    else:
        w.add_feed_forward_length(swiglu_hidden_size(c.embedding_dim))
        w.add_head_count_kv(c.num_of_heads)
        w.add_layer_norm_rms_eps(RMS_EPS)
        w.add_rope_freq_base(c.rope_base)
        w.add_rope_dimension_count(c.embedding_dim // c.num_of_heads)
        w.add_key_length(c.embedding_dim // c.num_of_heads)
        w.add_value_length(c.embedding_dim // c.num_of_heads)
        w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")  # byte-level BPE
    w.add_tokenizer_pre("gpt-2")  # GPT-2's pre-tokenizer regex, the one our ByteLevel pre-tokenizer uses
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokenizer.eot_id)
    w.add_eos_token_id(tokenizer.eot_id)
    w.add_add_bos_token(False)  # our models never saw a BOS token in front of a text
    for name, tensor in gguf_tensors(model).items():
        w.add_tensor(name, tensor.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ----------------------------------------------------------------------------- Ollama

def ollama_modelfile(gguf_name: str, block_size: int) -> str:
    """An Ollama Modelfile for the GGUF beside it: a base model, so plain completion (the prompt as it is, no
    chat template), stopping at the end-of-text token, with generate.py's default temperature and top_k and
    the context the model was trained on."""
    return "\n".join([f"FROM ./{gguf_name}",  # Ollama reads a relative path from the Modelfile's folder
                      'TEMPLATE "{{ .Prompt }}"',
                      f'PARAMETER stop "{EOT}"',
                      "PARAMETER temperature 0.8",
                      "PARAMETER top_k 200",
                      f"PARAMETER num_ctx {block_size}"]) + "\n"


# ----------------------------------------------------------------------------- the model card

def final_evaluation(ckpt: dict[str, Any], checkpoint: Path) -> dict[str, Any] | None:
    """The last evaluation line ({"step", "val_loss", "val_bpb", ...}) of the run's metrics file, if found."""
    config = ckpt.get("config") or {}
    candidates = [run_file(checkpoint, METRICS),  # beside it; or in --out_dir, where runs before put them
                  earlier_run_file(config.get("out_dir", "."), config.get("checkpoint", checkpoint), METRICS)]
    for path in candidates:
        if path.is_file():
            lines = read_metrics(path)
            evaluations = [m for m in lines if "val_loss" in m and m.get("step", 0) <= ckpt.get("iteration", 0)]
            if evaluations:
                return evaluations[-1]
    return None


def corpus_lines(config: dict[str, Any]) -> list[str]:
    """One line per corpus path of the training config, with its size if it is on this disk."""
    lines = []
    for p in map(Path, config.get("corpus", ())):
        if p.is_file():
            size = p.stat().st_size
        elif p.is_dir():
            size = sum(q.stat().st_size for q in p.rglob("*.txt") if q.is_file())
        else:
            lines.append(f"- `{p}` (not found at export time)")
            continue
        lines.append(f"- `{p}`: {size:,} bytes")
    return lines


def model_card(model: GPT, tokenizer: Tokenizer, ckpt: dict[str, Any], checkpoint: Path, fmt: str) -> str:
    c = model.config
    arch = architecture_for(c)
    lines = ["---", "library_name: transformers" if fmt == "hf" else "library_name: gguf",
             "pipeline_tag: text-generation", CARD_TAG, "---", "",
             f"# {checkpoint.stem}", "",
             f"A {model.num_parameters(non_embedding=False):,}-parameter language model trained with "
             f"GPT-experiments, exported from `{checkpoint.name}` as "
             + (f"`{HF_CLASS[arch]}` (transformers)." if fmt == "hf"
                else f"GGUF architecture `{arch}` (llama.cpp)."), ""]
    if "head" in ckpt:
        lines += [f"The checkpoint is a fine-tuned {ckpt.get('task', '')} classifier over {len(ckpt['labels'])} "
                  "labels; this export holds its language model only (the classification head is left out).", ""]
    if arch != "gpt2":
        lines += [f"Trained with a sliding attention window of {c.block_size} tokens; {HF_CLASS[arch]} attends to "
                  f"everything, so both agree up to {c.block_size} tokens (max_position_embeddings).", ""]
    lines += ["## Evaluation", ""]
    evaluation = final_evaluation(ckpt, checkpoint)
    if "iteration" in ckpt:
        lines.append(f"- optimiser steps: {ckpt['iteration']:,}")
    if evaluation is not None:
        lines.append(f"- final validation loss (step {evaluation.get('step')}): {evaluation['val_loss']:.4f} nats "
                     "per token" + (f", {evaluation['val_bpb']:.4f} bits per byte" if "val_bpb" in evaluation else ""))
    if isinstance(ckpt.get("best_val_loss"), float) and ckpt["best_val_loss"] != float("inf"):
        lines.append(f"- best validation loss: {ckpt['best_val_loss']:.4f} nats per token")
    config = ckpt.get("config") or {}
    lines += ["", "## Data", "", f"Tokenizer: {tokenizer.kind}, {tokenizer.vocab_size:,} tokens; "
              f"`{EOT}` (id {tokenizer.eot_id}) separates documents and ends generation.", ""]
    lines += corpus_lines(config) or ["- corpus not recorded in the checkpoint"]
    lines += ["", "## Model", "", "```json", json.dumps(ckpt["model_config"], indent=2), "```"]
    if config:
        lines += ["", "## Training config", "", "```json", json.dumps(config, indent=2, default=str), "```"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the command

def check_out(out_text: str, checkpoint: Path, overwrite: bool) -> Path:
    """--out as a full path. It may be new or an empty folder; with --overwrite, a folder holding an earlier export
    and nothing else (the replacement deletes what it holds); never the folder you are in (or one above it), the
    checkpoint or a folder holding it."""
    if not out_text.strip():
        raise UsageError("--out is empty: give the folder to export into")
    out = Path(os.path.abspath(out_text))  # "." and "a/.." named by their folder; a link stays a link
    here = Path.cwd().resolve()
    if out.resolve() == here or out.resolve() in here.parents:
        raise UsageError(f"--out {out_text} is the folder you are in, or holds it: name a new folder for the export")
    if out.resolve() == checkpoint.resolve():
        raise UsageError(f"--out {out_text} is the checkpoint itself: choose a new folder")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out_text} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"--out {out_text} is a folder that is not empty: choose another, or add --overwrite to "
                             f"replace the earlier export it holds")
        if out.resolve() in checkpoint.resolve().parents:
            raise UsageError(f"--out {out_text} holds the checkpoint: --overwrite would delete it")
        check_earlier_export(out, out_text)
    return out


def check_earlier_export(out: Path, out_text: str) -> None:
    """--overwrite replaces a folder only if an export wrote all of it: its files by name, and our model card."""
    theirs = [p.name + "/" * p.is_dir() for p in sorted(out.iterdir()) if p.name not in EXPORT_FILES or p.is_dir()]
    if theirs:
        shown = ", ".join(theirs[:5]) + (f" and {len(theirs) - 5} more" if len(theirs) > 5 else "")
        raise UsageError(f"--out {out_text} holds what an export does not write ({shown}): --overwrite replaces "
                         f"only an earlier export; choose another folder")
    card = out / "README.md"
    if not card.is_file() or CARD_TAG not in card.read_text(encoding="utf-8", errors="replace"):
        raise UsageError(f"--out {out_text} is not an earlier export of this project (no model card of ours in "
                         f"README.md): --overwrite replaces only those; choose another folder")


def export(args: ExportArgs) -> None:
    checkpoint = Path(args.checkpoint)
    out = check_out(args.out, checkpoint, args.overwrite)
    ckpt = load_checkpoint(checkpoint)
    model, tokenizer = model_from_checkpoint(ckpt, "cpu", raw_weights=args.raw_weights)
    arch = architecture_for(model.config)  # refuses, naming the setting, before anything is written
    if args.format == "gguf":
        gguf_vocabulary(tokenizer)  # refuses a tokenizer llama.cpp cannot run, before anything is written
    if "head" in ckpt:
        print(f"{checkpoint} is a fine-tuned {ckpt.get('task', '')} classifier: exporting its language model "
              f"only (the classification head over {len(ckpt['labels'])} labels has no {arch} counterpart)")

    def fill(folder: Path) -> None:  # a new folder, put in out's place only once whole (atomic_write_folder)
        if args.format == "hf":
            write_hf(model, tokenizer, folder)
        else:
            write_gguf(model, tokenizer, folder / "model.gguf")
            (folder / "Modelfile").write_text(ollama_modelfile("model.gguf", model.config.block_size),
                                              encoding="utf-8")
        (folder / "README.md").write_text(model_card(model, tokenizer, ckpt, checkpoint, args.format),
                                          encoding="utf-8")

    try:
        atomic_write_folder(out, fill)
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror or e}") from None
    print(f"wrote {out}: " + (f"{HF_CLASS[arch]} for transformers" if args.format == "hf"
                              else f"{out / 'model.gguf'} (llama.cpp architecture {arch}) and "
                                   f"{out / 'Modelfile'} (ollama create NAME -f {out / 'Modelfile'})"))


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda: export(parse_dataclass(ExportArgs, __doc__.splitlines()[0], argv)))


if __name__ == "__main__":
    main()
