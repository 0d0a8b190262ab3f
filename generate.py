"""Generate text from a trained checkpoint, streamed token by token.

    python generate.py --checkpoint model_checkpoint.tar --prompt "ROMEO:" [--max_new_tokens 500]
                       [--temperature 0.8] [--top_k 200] [--top_p 0.95] [--num_samples 1] [--seed 1337]
                       [--device auto] [--dtype auto]

The prompt comes from --prompt, --prompt_file, or standard input when it is piped; with none of them on a
terminal, an interactive loop reads one prompt per line. An empty prompt generates from scratch (from the
end-of-text token). What is printed: the prompt, then its continuation as it is produced.

An encoder checkpoint (trained with --objective mlm) does not continue text; it fills masks instead: for each
<mask> in the prompt it prints the --top_k (default 5) most likely tokens and their probabilities.

    python generate.py --checkpoint mlm.tar --prompt "To be, or not to <mask>: that is the question"
"""

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from tqdm import tqdm

from gpt import GPT
from gptlab.checkpoint import RAW_WEIGHTS_HELP, model_from_checkpoint
from gptlab.cli import POSITIVE, SEED, Rule, check_fields, parse_dataclass, setting
from gptlab.errors import UsageError, run_cli
from gptlab.hf_folder import load_checkpoint_or_folder
from gptlab.runtime import device_setting, dtype_setting, local_runtime
from gptlab.tokenizer import MASK, Tokenizer


@dataclass(frozen=True)
class GenerateArgs:
    checkpoint: str = setting("model_checkpoint.tar", "checkpoint file, or a local Hugging Face model folder")
    prompt: str | None = setting(None, "text to continue (default: standard input, or an interactive loop)")
    prompt_file: str | None = setting(None, "read the prompt from this file")
    max_new_tokens: int = setting(500, "tokens to generate", rule=POSITIVE)
    temperature: float = setting(0.8, "0 = greedy; <1 sharper, >1 more random", rule=Rule(">= 0", lambda v: v >= 0))
    top_k: int | None = setting(None, "sample among the k most likely tokens (default 200); for an encoder, the "
                                "predictions shown per <mask> (default 5)", rule=POSITIVE)
    top_p: float | None = setting(None, "nucleus sampling: the smallest set of tokens with probability >= p",
                                  rule=Rule("in (0, 1]", lambda v: 0 < v <= 1))
    num_samples: int = setting(1, "independent samples per prompt, generated as one batch", rule=POSITIVE)
    # A fixed default, as nanoGPT's sample.py: a command run twice prints the same text (and a reported sample can
    # be reproduced from the command alone); another sample is one flag away.
    seed: int = setting(1337, "same seed, checkpoint and flags: same text (the default too; pass another seed for "
                        "another sample)", rule=SEED)
    device: str = device_setting()
    dtype: str = dtype_setting()
    tokenizer: str | None = setting(None, "a tokenizer.json to use instead of the checkpoint's (must be the same)")
    no_cache: bool = setting(False, "recompute the whole context each step (slow)")
    stats: bool = setting(False, "print tokens generated and tokens/s on stderr")
    raw_weights: bool = setting(False, RAW_WEIGHTS_HELP)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.prompt is not None and self.prompt_file is not None:
            raise UsageError("give --prompt or --prompt_file, not both")


def parse_args(argv: list[str] | None = None) -> GenerateArgs:
    return parse_dataclass(GenerateArgs, "Generate text from a checkpoint written by playground.py.", argv)


def check_tokenizer(path: str, checkpoint_tokenizer: Tokenizer) -> Tokenizer:
    """A --tokenizer override is accepted only if it is the checkpoint's own tokenizer."""
    tokenizer = Tokenizer.from_file(path)
    if tokenizer.to_json() != checkpoint_tokenizer.to_json():
        raise UsageError(f"tokenizer {path} does not match the checkpoint's ({tokenizer.vocab_size} vs "
                         f"{checkpoint_tokenizer.vocab_size} tokens, or different merges)")
    return tokenizer


def prompt_ids(model: GPT, tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt's tokens; an empty prompt starts from end-of-text. Longer than block_size: the last
    block_size tokens are kept, with a notice."""
    ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
    block = model.config.block_size
    if len(ids) > block:
        print(f"notice: the prompt has {len(ids)} tokens; only its last {block} (block_size) are used",
              file=sys.stderr)
        ids = ids[-block:]
    return ids


def prompt_batch(model: GPT, tokenizer: Tokenizer, prompt: str, rows: int,
                 seed: int) -> tuple[torch.Tensor, torch.Generator]:
    """The prompt's tokens repeated in `rows` rows on the model's device, and the generator that samples them."""
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids(model, tokenizer, prompt)] * rows, device=device)
    return idx, torch.Generator(device=device).manual_seed(seed)


def text_pieces(tokenizer: Tokenizer, tokens: Iterable[int]) -> Iterator[str]:
    """The text of `tokens` in pieces, one as soon as new tokens complete some text, for streaming.

    Each step decodes only the tokens since the last piece (plus the piece before them, as context for
    decoders that look back), not the whole text so far, so a long text costs linear time. Byte-level tokens
    can end inside a multi-byte character, which decodes to U+FFFD until the rest arrives: such a tail is held
    back, so every piece is whole characters.
    """
    ids: list[int] = []
    prefix = read = 0  # ids[prefix:read] were shown last; ids[read:] are not shown yet
    shown = ""  # the decoding of ids[prefix:read]
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids[prefix:])
        if len(text) > len(shown) and not text.endswith("\ufffd"):
            yield text[len(shown):]
            prefix, read = read, len(ids)
            shown = tokenizer.decode(ids[prefix:read])


def generate_text(model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.8,
                  top_k: int | None = None, top_p: float | None = None, seed: int = 1337, use_cache: bool = True,
                  on_text: Callable[[str], None] | None = None) -> tuple[str, int]:
    """The continuation of `prompt` and its number of tokens; each new piece of text is passed to on_text
    as soon as it is known (see text_pieces)."""
    idx, generator = prompt_batch(model, tokenizer, prompt, 1, seed)
    new_ids: list[int] = []

    def until_end_of_text() -> Iterator[int]:
        for token in model.stream(idx, max_new_tokens, temperature, top_k, top_p, tokenizer.eot_id, use_cache,
                                  generator):
            token_id = int(token)
            if token_id == tokenizer.eot_id:
                return
            new_ids.append(token_id)
            yield token_id

    shown = ""
    for piece in text_pieces(tokenizer, until_end_of_text()):
        if on_text is not None:
            on_text(piece)
        shown += piece
    text = tokenizer.decode(new_ids)
    if on_text is not None and text != shown:
        on_text(text[len(shown):])
    return text, len(new_ids)


def generate_batch(model: GPT, tokenizer: Tokenizer, prompt: str, num_samples: int, max_new_tokens: int,
                   temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None, seed: int = 1337,
                   use_cache: bool = True) -> list[list[int]]:
    """num_samples continuations of `prompt` generated side by side as one batch (one forward pass per token
    for all of them), each cut at its first end-of-text: their token ids."""
    idx, generator = prompt_batch(model, tokenizer, prompt, num_samples, seed)
    steps = model.stream(idx, max_new_tokens, temperature, top_k, top_p, tokenizer.eot_id, use_cache, generator)
    columns = list(tqdm(steps, total=max_new_tokens, desc="generating", unit="token", leave=False, disable=None))
    rows = torch.stack(columns, dim=1).tolist() if columns else [[] for _ in range(num_samples)]
    return [row[:row.index(tokenizer.eot_id)] if tokenizer.eot_id in row else row for row in rows]


@torch.no_grad()
def fill_mask(model: GPT, tokenizer: Tokenizer, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """For each <mask> in the text, in order, its top_k candidate tokens (decoded) with their probabilities."""
    mask_id = tokenizer.special_id(MASK, "fill-mask")
    ids = tokenizer.encode(text)
    positions = [i for i, token in enumerate(ids) if token == mask_id]
    if not positions:
        raise UsageError(f"this checkpoint is an encoder: it fills masks, so put at least one {MASK} in the prompt")
    if len(ids) > model.config.block_size:  # no cropping here: it could cut off a mask or its context
        raise UsageError(f"the prompt has {len(ids)} tokens, more than block_size {model.config.block_size}")
    device = next(model.parameters()).device
    logits, _ = model(torch.tensor([ids], device=device))
    probs, candidates = logits[0, positions].float().softmax(-1).topk(min(top_k, logits.size(-1)))
    return [[(tokenizer.decode([i]), p) for i, p in zip(row_ids.tolist(), row_probs.tolist(), strict=True)]
            for row_ids, row_probs in zip(candidates, probs, strict=True)]


def write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def run_prompt(model: GPT, tokenizer: Tokenizer, prompt: str, args: GenerateArgs) -> None:
    if not model.config.causal:
        for n, candidates in enumerate(fill_mask(model, tokenizer, prompt, args.top_k or 5), start=1):
            write(f"{MASK} {n}: " + "  ".join(f"{text!r} {p:.3f}" for text, p in candidates) + "\n")
        return
    top_k = args.top_k or 200
    start = time.perf_counter()
    if args.num_samples == 1:  # streamed as it is produced
        write(prompt)
        _, n = generate_text(model, tokenizer, prompt, args.max_new_tokens, args.temperature, top_k, args.top_p,
                             args.seed, not args.no_cache, on_text=write)
        write("\n")
    else:  # one batch, printed when done
        samples = generate_batch(model, tokenizer, prompt, args.num_samples, args.max_new_tokens, args.temperature,
                                 top_k, args.top_p, args.seed, not args.no_cache)
        for i, ids in enumerate(samples):
            write(f"\n---------- sample {i + 1} of {args.num_samples} ----------\n{prompt}{tokenizer.decode(ids)}\n")
        n = sum(len(ids) for ids in samples)
    if args.stats:
        seconds = time.perf_counter() - start
        print(f"stats: {n} tokens in {seconds:.2f}s, {n / seconds:.1f} tokens/s", file=sys.stderr)


def utf8_text(text: str, source: str) -> str:
    """`text` if it is valid UTF-8 text. Python hands bytes that are not UTF-8 (in an argument, or on a stdin
    with a C locale) on as lone surrogates, which the tokenizer cannot take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{source} is not UTF-8 text") from None
    return text


def read_stdin() -> str:
    """Piped standard input, as UTF-8 text (whatever the locale)."""
    try:
        return sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError("standard input is not UTF-8 text") from None
    except OSError as e:
        raise UsageError(f"cannot read standard input: {e.strerror or e}") from None


def read_prompt(args: GenerateArgs) -> str | None:
    """The prompt text, or None for the interactive loop."""
    if args.prompt is not None:
        return utf8_text(args.prompt, "--prompt")
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise UsageError(f"cannot read --prompt_file {args.prompt_file}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise UsageError(f"cannot read --prompt_file {args.prompt_file}: not UTF-8 text") from None
    if sys.stdin is None:  # started with standard input closed (`<&-`), as some daemons and cron jobs are
        raise UsageError("no prompt: standard input is closed; give --prompt TEXT or --prompt_file FILE "
                         "(--prompt '' generates from scratch)")
    if sys.stdin.isatty():
        return None
    return read_stdin()


def interact(model: GPT, tokenizer: Tokenizer, args: GenerateArgs) -> None:
    """One prompt per line from the terminal until Ctrl-D; a line that is not UTF-8 is said and skipped."""
    print("interactive: type a prompt and press Enter (Ctrl-D to quit)", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        try:
            run_prompt(model, tokenizer, utf8_text(line, "that line"), args)
        except UsageError as e:  # a prompt the model cannot take (an encoder's line without a mask): try again
            print(f"error: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    prompt = read_prompt(args)  # before the model is loaded: a prompt that cannot be read is said at once
    rt = local_runtime(args.device, args.dtype)  # before the checkpoint: a missing device is the device's fault
    model, tokenizer = model_from_checkpoint(load_checkpoint_or_folder(args.checkpoint), rt.device, args.checkpoint,
                                            args.raw_weights)
    if args.tokenizer:
        tokenizer = check_tokenizer(args.tokenizer, tokenizer)
    with rt.autocast():  # the precision training used
        if prompt is not None:
            return run_prompt(model, tokenizer, prompt, args)
        interact(model, tokenizer, args)


if __name__ == "__main__":
    run_cli(main)
