"""Loss, perplexity and bits per byte of a checkpoint on any text, to compare models and tokenizers fairly.

    python evaluate.py --checkpoint model_checkpoint.tar FILE [FILE ...] [--batch_size 8] [--device auto] [--dtype auto]
    python evaluate.py --checkpoint model_checkpoint.tar --benchmark blimp --data DIR [--out FILE.json]

The text's tokens are cut into consecutive windows of block_size + 1 tokens that share their boundary
token; in each, every token is predicted from those before it in the same window (so a window's first
tokens see little context: slightly pessimistic next to a sliding window, and far faster).

    loss           mean cross-entropy per predicted token, in nats
    perplexity     exp(loss)
    bits per byte  total cross-entropy in bits / UTF-8 bytes of the text: independent of the tokenizer

A file the checkpoint's tokenizer learned from (in whole or in part) gets a warning on stderr: its scores are
not held out. This is known only for a tokenizer that playground.py trained for itself, and only for a file
with the same contents as one of its corpus files; a tokenizer passed with --tokenizer is the user's choice,
trained on what they chose.

--benchmark blimp scores the model on BLiMP's minimal pairs (a folder of its paradigms' .jsonl files; see
gptlab/blimp.py and docs/benchmarks.md): one line per paradigm, the mean per field and overall.
"""

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gpt import GPT
from gptlab import blimp
from gptlab.checkpoint import RAW_WEIGHTS_HELP, model_from_checkpoint
from gptlab.cli import POSITIVE, check_fields, parse_dataclass, setting
from gptlab.corpus import CHUNK_BYTES
from gptlab.data import token_dtype
from gptlab.errors import UsageError, run_cli
from gptlab.fileio import check_output
from gptlab.hf_folder import load_checkpoint_or_folder
from gptlab.runtime import device_setting, dtype_setting, local_runtime
from gptlab.tokenizer import Tokenizer, corpus_files, file_hash, iter_corpus


def encode_file(path: Path, tokenizer: Tokenizer) -> tuple[np.ndarray, int]:
    """The file's token ids, 2 or 4 bytes each, and its size in UTF-8 bytes. The text goes to the tokenizer
    in line-aligned pieces of about CHUNK_BYTES, as for the training cache, so it is never held whole."""
    dtype = token_dtype(tokenizer.vocab_size)
    arrays, pending, pending_chars, n_bytes = [], [], 0, 0
    for piece in iter_corpus([path]):
        pending.append(piece)
        pending_chars += len(piece)
        n_bytes += len(piece.encode("utf-8"))
        if pending_chars >= CHUNK_BYTES:
            arrays.append(np.asarray(tokenizer.encode("".join(pending)), dtype=dtype))
            pending, pending_chars = [], 0
    arrays.append(np.asarray(tokenizer.encode("".join(pending)), dtype=dtype))  # the rest (maybe nothing)
    return np.concatenate(arrays), n_bytes


@torch.no_grad()
def evaluate_tokens(model: GPT, ids: np.ndarray, n_bytes: int, batch_size: int = 8,
                    progress: bool = False) -> dict[str, float]:
    """Loss, perplexity and bits per byte of the model on a text's tokens (n_bytes: the text's UTF-8 size)."""
    if len(ids) < 2:
        raise UsageError("the text is too short to evaluate (fewer than 2 tokens)")
    device = next(model.parameters()).device
    step = model.config.block_size
    # Window i holds tokens [i*T, i*T + T] (T + 1 of them): neighbours share one token, so every token
    # but the very first is predicted exactly once. Only the text's last window may be shorter.
    starts = range(0, len(ids) - 1, step)
    full = [start for start in starts if start + step + 1 <= len(ids)]
    batches = [[ids[s:s + step + 1] for s in full[i:i + batch_size]] for i in range(0, len(full), batch_size)]
    batches += [[ids[s:s + step + 1]] for s in starts if s + step + 1 > len(ids)]
    total_nats, predicted = 0.0, 0
    # disable=None: a bar on terminals only
    for batch in tqdm(batches, desc="evaluating", unit="batch", disable=None if progress else True):
        tokens = torch.from_numpy(np.stack(batch).astype(np.int64)).to(device)
        logits, _ = model(tokens[:, :-1])
        total_nats += F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum").item()
        predicted += tokens[:, 1:].numel()
    loss = total_nats / predicted
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": total_nats / math.log(2) / n_bytes,
            "tokens": len(ids), "bytes": n_bytes}


@dataclass(frozen=True)
class EvaluateArgs:
    files: tuple[str, ...] = setting((), "text files or folders of .txt files")
    benchmark: str | None = setting(None, "score a benchmark instead of text: blimp (needs --data)",
                                    choices=("blimp",))
    data: str | None = setting(None, "--benchmark blimp: the folder of BLiMP's paradigm .jsonl files")
    out: str | None = setting(None, "--benchmark: also write the results to this JSON file")
    checkpoint: str = setting("model_checkpoint.tar", "checkpoint file, or a local Hugging Face model folder")
    batch_size: int | None = setting(None, "windows per forward pass (default 8; --benchmark blimp: 64)", rule=POSITIVE)
    device: str = device_setting()
    dtype: str = dtype_setting()
    raw_weights: bool = setting(False, RAW_WEIGHTS_HELP)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.benchmark is not None:
            if self.files or self.data is None:
                raise UsageError(f"--benchmark {self.benchmark} reads its pairs from --data DIR, not from text files")
        elif self.data is not None or self.out is not None:
            raise UsageError("--data and --out go with --benchmark blimp")
        elif not self.files:
            raise UsageError("give at least one text file (or folder of .txt files) to evaluate on")


def main(argv: list[str] | None = None) -> None:
    args = parse_dataclass(EvaluateArgs, "Loss, perplexity and bits per byte of a checkpoint on text.", argv,
                           positional="files")
    rt = local_runtime(args.device, args.dtype)  # before the checkpoint: a missing device is the device's fault
    files = corpus_files(list(args.files))
    paradigms = blimp.read_paradigms(args.data) if args.benchmark else []  # before the checkpoint: cheap to check
    if args.out is not None:
        check_output(args.out, "--out", inputs=[("--checkpoint", args.checkpoint)])
    ckpt = load_checkpoint_or_folder(args.checkpoint)
    model, tokenizer = model_from_checkpoint(ckpt, rt.device, args.checkpoint, args.raw_weights)
    if not model.config.causal:
        raise UsageError(f"{args.checkpoint} is an encoder (masked LM): it has no next-token loss to evaluate; "
                         f"its masked-token loss and accuracy are reported during training")
    if args.benchmark:
        with rt.autocast():
            result = blimp.summary(blimp.score_paradigms(model, tokenizer, paradigms, args.batch_size or 64,
                                                         progress=True))
        print("\n".join(blimp.report_lines(result)))
        if args.out is not None:
            blimp.write_summary({"checkpoint": args.checkpoint, **result}, args.out)
        return
    learned = {f["blake2b"]: f for f in ckpt.get("tokenizer_learned_from") or [] if f["learned_bytes"]}
    for path in files:
        if learned and (seen := learned.get(file_hash(path))) is not None:
            print(f"warning: the tokenizer learned from {seen['learned_bytes']:,} of the {seen['bytes']:,} bytes of "
                  f"{path}: its scores are not those of held-out text", file=sys.stderr)
        with rt.autocast():
            r = evaluate_tokens(model, *encode_file(path, tokenizer), args.batch_size or 8, progress=True)
        print(f"{path}: loss {r['loss']:.4f} nats/token, perplexity {r['perplexity']:.2f}, "
              f"{r['bits_per_byte']:.4f} bits/byte ({r['tokens']:,} tokens, {r['bytes']:,} bytes)")


if __name__ == "__main__":
    run_cli(main)
