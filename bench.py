"""Speed benchmarks; each prints a markdown table and the exact configuration it measured.

    python bench.py train     [--device cpu] [--dtype float32] [--compile] [--profile] [model flags]
                                                                              training step (and its profile)
    python bench.py attention [--device cpu]                                  scratch vs SDPA
    python bench.py generate  [--device cpu]                                  KV cache vs none

Model flags (train): --embedding_dim --num_of_layers --num_of_heads --block_size --batch_size --vocab_size
--attention; the defaults are nanoGPT's CPU recipe (4 layers, 4 heads, 128 wide, block 64, batch 12,
dropout 0, a 65-token character-level vocabulary).

Training is timed through training.train_step, the very function the training loop runs, on random
tokens; tokens/s counts the tokens of every optimiser step, and MFU divides the model FLOPs per second
(gpt.flops_per_token) by the device's peak (--peak_tflops, or known GPUs' bf16 dense peak).
"""

import argparse
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from config import TrainConfig
from data import TokenSplit
from gpt import GPT, GPTConfig
from objectives import NextToken
from runtime import Runtime, peak_flops, pick_device, pick_dtype
from training import make_optimizer, train_step


def timed(fn: Callable[[], object], warmup: int, iters: int, device: torch.device) -> float:
    """Seconds per call, after warm-up (compilation, allocator, caches)."""
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters


def random_split(folder: Path, vocab_size: int, n: int = 200_000) -> TokenSplit:
    path = folder / "bench_tokens.bin"
    np.random.default_rng(0).integers(0, vocab_size, n, dtype=np.uint16).tofile(path)
    return TokenSplit(path, "uint16", n, n)


def bench_train(args: argparse.Namespace) -> None:
    import tempfile

    device = pick_device(args.device)
    rt = Runtime(device, pick_dtype(args.dtype, device))
    model_config = GPTConfig(vocab_size=args.vocab_size, block_size=args.block_size, embedding_dim=args.embedding_dim,
                             num_of_layers=args.num_of_layers, num_of_heads=args.num_of_heads, dropout=0.0,
                             attention=args.attention)
    c = TrainConfig(model=model_config, batch_size=args.batch_size, compile=args.compile, warmup_iters=0)
    torch.manual_seed(0)
    model = GPT(model_config).to(device)
    optimizer = make_optimizer(model, c, device)
    step_model = torch.compile(model) if c.compile else model
    scaler = torch.amp.GradScaler(device.type, enabled=rt.dtype == torch.float16)
    with tempfile.TemporaryDirectory() as tmp:
        split = random_split(Path(tmp), args.vocab_size)
        counter = iter(range(10 ** 9))
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with (torch.profiler.profile(activities=activities) if args.profile else contextlib.nullcontext()) as prof:
            seconds = timed(lambda: train_step(step_model, optimizer, scaler, split, next(counter), c, rt, NextToken()),
                            args.warmup, args.iters, device)
    tokens = c.batch_size * model_config.block_size
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device, rt.dtype)
    mfu = f"{model.flops_per_token() * tokens / seconds / peak * 100:.1f}%" if peak else "n/a"
    print(f"config: {vars(args)}\nparameters: {model.num_parameters() / 1e6:.2f}M, "
          f"{model.flops_per_token() * tokens / 1e9:.2f} GFLOP per step")
    print("| device | dtype | attention | compile | ms/step | tokens/s | MFU |\n|---|---|---|---|---|---|---|")
    print(f"| {device} | {str(rt.dtype).removeprefix('torch.')} | {model_config.attention} | {c.compile} | "
          f"{seconds * 1e3:.1f} | {tokens / seconds:,.0f} | {mfu} |")
    if args.profile:  # warm-up steps included; the profiler itself slows the steps a little
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def model_size(text: str) -> tuple[int, int, int, int]:
    """'64,4,128,12' -> (block_size, num_of_layers, embedding_dim, batch_size)."""
    try:
        block, layers, width, batch = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"want block,layers,width,batch (like 64,4,128,12), not {text!r}") from None
    return block, layers, width, batch


def bench_attention(args: argparse.Namespace) -> None:
    """Forward + backward of a whole GPT with each attention core, at a few sizes."""
    device = pick_device(args.device)
    print(f"device {device}, float32, heads = max(2, width / 64), vocab {args.vocab_size}, dropout 0, "
          f"{args.warmup} warm-up + {args.iters} timed steps")
    print("| block | layers | width | heads | batch | scratch tokens/s | sdpa tokens/s | sdpa speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for block, layers, width, batch in args.sizes:
        heads = max(2, width // 64)
        rates = []
        for core in ("scratch", "sdpa"):
            torch.manual_seed(0)
            model = GPT(GPTConfig(vocab_size=args.vocab_size, block_size=block, embedding_dim=width,
                                  num_of_layers=layers, num_of_heads=heads, dropout=0.0, attention=core)).to(device)
            x = torch.randint(0, args.vocab_size, (batch, block), device=device)
            rates.append(batch * block / timed(lambda m=model, x=x: m(x, x)[1].backward(), args.warmup, args.iters,
                                               device))
        print(f"| {block} | {layers} | {width} | {heads} | {batch} | {rates[0]:,.0f} | {rates[1]:,.0f} | "
              f"{rates[1] / rates[0]:.2f}x |")


def bench_generate(args: argparse.Namespace) -> None:
    """Tokens/s generating --new_tokens greedily from one token, with and without the KV cache."""
    device = pick_device(args.device)
    config = GPTConfig(vocab_size=args.vocab_size, block_size=args.block_size, embedding_dim=args.embedding_dim,
                       num_of_layers=args.num_of_layers, num_of_heads=args.num_of_heads, dropout=0.0)
    torch.manual_seed(0)
    model = GPT(config).to(device).eval()
    start = torch.zeros(1, 1, dtype=torch.long, device=device)
    print(f"device {device}, float32, batch 1, {config}, {model.num_parameters() / 1e6:.2f}M parameters, "
          f"{args.new_tokens} new tokens, greedy, mean of {args.repeats} runs after 1 warm-up")
    print("| KV cache | tokens/s | speed-up |\n|---|---|---|")
    rates = {}
    for use_cache in (False, True):
        seconds = timed(lambda cache=use_cache: model.generate(start, args.new_tokens, temperature=0, use_cache=cache),
                        1, args.repeats, device)
        rates[use_cache] = args.new_tokens / seconds
    for use_cache in (False, True):
        print(f"| {'yes' if use_cache else 'no'} | {rates[use_cache]:,.0f} | {rates[use_cache] / rates[False]:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description="GPT-experiments speed benchmarks (markdown tables).")
    sub = parser.add_subparsers(dest="what", required=True)
    train = sub.add_parser("train", help="training step throughput and MFU")
    train.add_argument("--embedding_dim", type=int, default=128)
    train.add_argument("--num_of_layers", type=int, default=4)
    train.add_argument("--num_of_heads", type=int, default=4)
    train.add_argument("--block_size", type=int, default=64)
    train.add_argument("--batch_size", type=int, default=12)
    train.add_argument("--vocab_size", type=int, default=65)
    train.add_argument("--attention", default="sdpa", choices=("sdpa", "scratch"))
    train.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    train.add_argument("--compile", action="store_true")
    train.add_argument("--peak_tflops", type=float, help="device peak for MFU (known GPUs are looked up)")
    train.add_argument("--warmup", type=int, default=10)
    train.add_argument("--iters", type=int, default=100)
    train.add_argument("--profile", action="store_true", help="also print where the time of the timed steps goes")
    attention = sub.add_parser("attention", help="scratch vs SDPA attention, forward + backward")
    attention.add_argument("--sizes", type=model_size, nargs="+", metavar="BLOCK,LAYERS,WIDTH,BATCH",
                           default=[(64, 4, 128, 12), (128, 4, 256, 8), (256, 6, 384, 4)])
    attention.add_argument("--vocab_size", type=int, default=2048)
    attention.add_argument("--warmup", type=int, default=3)
    attention.add_argument("--iters", type=int, default=10)
    generate = sub.add_parser("generate", help="generation with and without the KV cache")
    generate.add_argument("--new_tokens", type=int, default=500)
    generate.add_argument("--block_size", type=int, default=256)
    generate.add_argument("--embedding_dim", type=int, default=256)
    generate.add_argument("--num_of_layers", type=int, default=4)
    generate.add_argument("--num_of_heads", type=int, default=4)
    generate.add_argument("--vocab_size", type=int, default=2048)
    generate.add_argument("--repeats", type=int, default=2)
    for p in (train, attention, generate):
        p.add_argument("--device", default="auto")
    args = parser.parse_args()
    {"train": bench_train, "attention": bench_attention, "generate": bench_generate}[args.what](args)


if __name__ == "__main__":
    main()
