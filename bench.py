"""Speed benchmarks; each prints a markdown table and the exact configuration it measured.

    python bench.py train     [--device cpu] [--dtype float32] [--compile] [--profile] [model flags]
                                                                              training step (and its profile)
    python bench.py attention [--device cpu]                                  scratch vs SDPA
    python bench.py generate  [--device cpu]                                  KV cache vs none
    python bench.py peers --corpus FILE [--baseline DIR] [--nanogpt DIR]      whole training runs side by side
    python bench.py memory --config FILE [--vocab_size N] [--cards 8GB ...]   memory plans (no device needed)
    python bench.py checkpoint [--config FILE] [--rounds N]                   save time: one file vs sharded

Model flags (train): --embedding_dim --num_of_layers --num_of_heads --block_size --batch_size --vocab_size
--attention; the defaults are nanoGPT's CPU recipe (4 layers, 4 heads, 128 wide, block 64, batch 12,
dropout 0, a 65-token character-level vocabulary).

Training is timed through training.train_step, the very function the training loop runs, on random
tokens; tokens/s counts the tokens of every optimiser step, and MFU divides the model FLOPs per second
(gpt.flops_per_token) by the device's dense peak at the precision in use (--peak_tflops, or for known GPUs
gptlab/runtime.py's GPU_PEAK_FLOPS: bf16 or fp16, and TF32 for float32); elsewhere MFU is n/a.
"""

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

from config import TrainConfig, load_yaml
from gpt import GPT, GPTConfig
from gptlab.checkpoint import ShardedSaver, save_checkpoint
from gptlab.cli import (
    NON_NEGATIVE,
    POSITIVE,
    SIZE,
    check_fields,
    format_size,
    parse_dataclass,
    parse_size,
    setting,
    setting_from,
)
from gptlab.errors import UsageError, run_cli
from gptlab.memory import Step, default_budget, estimate, plan
from gptlab.metrics import read_metrics
from gptlab.runtime import (
    DTYPES,
    Runtime,
    check_fits,
    device_setting,
    dtype_setting,
    peak_flops,
    pick_device,
    pick_dtype,
)
from gptlab.sharding import FULL_STATE
from gptlab.speed import seconds_per_call, trainer
from gptlab.tokenizer import corpus_files, train_tokenizer


def model_setting(name: str, default: Any) -> Any:
    """A GPTConfig setting (its help, choices and check) with the benchmark's default."""
    return setting_from(GPTConfig, name, default)


def model_config(args: Any) -> GPTConfig:
    """The model a benchmark times: its GPTConfig settings, the others at GPTConfig's defaults but dropout 0."""
    shared = {f.name for f in fields(GPTConfig)} & {f.name for f in fields(args)}
    return GPTConfig(**{name: getattr(args, name) for name in shared}, dropout=0.0)


@dataclass(frozen=True)
class TrainBench:
    embedding_dim: int = model_setting("embedding_dim", 128)
    num_of_layers: int = model_setting("num_of_layers", 4)
    num_of_heads: int = model_setting("num_of_heads", 4)
    block_size: int = model_setting("block_size", 64)
    batch_size: int = setting(12, "sequences per step", rule=POSITIVE)
    vocab_size: int = model_setting("vocab_size", 65)  # of random tokens
    attention: str = model_setting("attention", "sdpa")
    dtype: str = dtype_setting()
    compile: bool = setting(False, "torch.compile the model")
    peak_tflops: float | None = setting(None, "device peak for MFU (known GPUs are looked up)", rule=POSITIVE)
    warmup: int = setting(10, "untimed steps first", rule=NON_NEGATIVE)
    iters: int = setting(100, "timed steps", rule=POSITIVE)
    profile: bool = setting(False, "also print where the time of the timed steps goes")
    health_interval: int | None = setting(None, "time the training loop's health guard too: 0 = the guard "
                                          "alone, N = with per-layer telemetry every N steps (default: the bare "
                                          "step)", rule=NON_NEGATIVE)
    device: str = device_setting()

    def __post_init__(self) -> None:
        check_fields(self)
        model_config(self)  # checks the settings together (the heads divide the width)


@dataclass(frozen=True)
class AttentionBench:
    sizes: tuple[str, ...] = setting(("64,4,128,12", "128,4,256,8", "256,6,384,4"),
                                     "models to time, each BLOCK,LAYERS,WIDTH,BATCH")
    vocab_size: int = setting(2048, "vocabulary size (random tokens)", rule=POSITIVE)
    warmup: int = setting(3, "untimed steps first", rule=NON_NEGATIVE)
    iters: int = setting(10, "timed steps", rule=POSITIVE)
    device: str = device_setting()

    def __post_init__(self) -> None:
        check_fields(self)
        for block, layers, width, _ in self.models():  # checks each size, and that its heads divide its width
            GPTConfig(block_size=block, embedding_dim=width, num_of_layers=layers, num_of_heads=attention_heads(width))

    def models(self) -> list[tuple[int, int, int, int]]:
        return [model_size(text) for text in self.sizes]


@dataclass(frozen=True)
class GenerateBench:
    new_tokens: int = setting(500, "tokens to generate", rule=POSITIVE)
    block_size: int = model_setting("block_size", 256)
    embedding_dim: int = model_setting("embedding_dim", 256)
    num_of_layers: int = model_setting("num_of_layers", 4)
    num_of_heads: int = model_setting("num_of_heads", 4)
    vocab_size: int = model_setting("vocab_size", 2048)
    repeats: int = setting(2, "timed runs (after one warm-up)", rule=POSITIVE)
    device: str = device_setting()

    def __post_init__(self) -> None:
        check_fields(self)
        model_config(self)  # checks the settings together (the heads divide the width)


@dataclass(frozen=True)
class PeersBench:
    corpus: str = setting("", "the text to train on, required (nanoGPT's CPU recipe trains on Tiny Shakespeare)")
    baseline: str | None = setting(None, "another checkout of this repository (an older commit) to time alongside")
    nanogpt: str | None = setting(None, "a nanoGPT checkout whose data/shakespeare_char/prepare.py has been run")
    short: int = setting(100, "steps of the short run", rule=POSITIVE)
    long: int = setting(500, "steps of the long run; ms/step = (long time - short time) / (long - short)",
                        rule=POSITIVE)
    rounds: int = setting(2, "rounds, each timing every program once at both lengths; the best is kept",
                          rule=POSITIVE)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.long <= self.short:
            raise UsageError(f"--long {self.long} must be above --short {self.short}")
        for name, needs in (("baseline", "playground.py"), ("nanogpt", "data/shakespeare_char/train.bin")):
            folder = getattr(self, name)
            if folder is not None and not (Path(folder) / needs).is_file():
                raise UsageError(f"--{name} {folder!r} has no {needs}" + (
                    " (run python data/shakespeare_char/prepare.py there first)" if name == "nanogpt" else ""))
        if not self.corpus:
            raise UsageError("say what to train on: --corpus FILE (nanoGPT's recipe uses Tiny Shakespeare)")
        if not Path(self.corpus).is_file():
            raise UsageError(f"--corpus {self.corpus} is not a file")


@dataclass(frozen=True)
class MemoryBench:
    config: str = setting("configs/gpt2_small.yaml", "the training config (YAML) to plan for")
    vocab_size: int = setting(50257, "the tokenizer's vocabulary size (GPT-2's: 50257)", rule=POSITIVE)
    dtype: str = setting("bfloat16", "autocast precision of the run", choices=tuple(DTYPES))
    cards: tuple[str, ...] = setting(("8GB", "12GB", "16GB", "24GB", "40GB", "80GB"), "GPU memory sizes to plan for",
                                    rule=SIZE)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class CheckpointBench:
    config: str = setting("configs/gpt2_small.yaml", "the training config (YAML) whose model is saved")
    vocab_size: int = setting(50257, "the tokenizer's vocabulary size (GPT-2's: 50257)", rule=POSITIVE)
    rounds: int = setting(3, "rounds, each saving once in each format (interleaved: a machine loaded by others "
                          "slows both alike)", rule=POSITIVE)
    out: str | None = setting(None, "folder to write the checkpoints in (default: the system's temporary folder); "
                              "they are deleted at the end")

    def __post_init__(self) -> None:
        check_fields(self)


# What a CUDA context holds before the run allocates anything (0.3-0.6 GiB, by driver and GPU): the free memory
# that --max_memory's default starts from on a card of a given size.
CUDA_CONTEXT = 2**29


def bench_memory(args: MemoryBench) -> None:
    """The --max_memory plan, from the memory model alone, of a config on cards of the given sizes: the budget
    each would default to (free memory after the CUDA context, less the margin), the micro-batch, whether blocks
    are recomputed, and the estimated peak."""
    c = TrainConfig.from_dict(load_yaml(args.config))
    config = replace(c.model, vocab_size=args.vocab_size)
    sequences = c.batch_size * c.grad_accum_steps
    step = Step(c.batch_size, c.grad_accum_steps, DTYPES[args.dtype], c.optimizer, "cuda")
    print(f"{args.config}: {sequences} sequences of {config.block_size} tokens per step (batch_size "
          f"{c.batch_size} x grad_accum_steps {c.grad_accum_steps}), vocabulary {args.vocab_size}, {args.dtype}, "
          f"{c.optimizer}, one GPU, eager (no compile)")
    print("| card | budget | micro-batch x steps | activation checkpointing | estimated peak |\n|---|---|---|---|---|")
    for card in args.cards:
        budget = default_budget(parse_size(card) - CUDA_CONTEXT)
        try:
            p = plan(config, sequences, step, budget, c.batch_size)
        except UsageError:
            print(f"| {card} | {format_size(budget)} | does not fit | | |")
            continue
        print(f"| {card} | {format_size(budget)} | {p.micro_batch} x {p.micro_steps} | "
              f"{'on' if p.activation_checkpointing else 'off'} | {format_size(p.need)} |")


def bench_checkpoint(args: CheckpointBench) -> None:
    """Seconds to save a model of the config with its AdamW moments, in one process on the CPU, as one file
    (save_checkpoint, as --checkpoint_format file) and as a sharded folder (ShardedSaver, as --checkpoint_format
    dcp): for the folder, the seconds training waits (the state copied) and those until it is on disk."""
    config = replace(TrainConfig.from_dict(load_yaml(args.config)).model, vocab_size=args.vocab_size)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters())

    def state(options: StateDictOptions) -> dict:  # the bulk of playground.checkpoint_state
        return {"model_config": asdict(config), "model": get_model_state_dict(model, options=options),
                "optimizer": get_optimizer_state_dict(model, optimizer, options=options), "tokenizer": "{}"}

    print(f"{args.config}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters with AdamW's two "
          f"moments, float32; torch {torch.__version__}, {os.cpu_count()} CPUs, one process")
    print("| round | file: seconds | dcp: training waits | dcp: on disk |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=args.out) as work:
        saver = ShardedSaver(Path(work) / "folder", is_main=True, distributed=False)
        for i in range(args.rounds):
            start = time.perf_counter()
            save_checkpoint(state(FULL_STATE), Path(work) / "file.tar")
            file_s = time.perf_counter() - start
            start = time.perf_counter()
            saver.save(state(StateDictOptions()))
            waits_s = time.perf_counter() - start
            saver.wait()
            print(f"| {i + 1} | {file_s:.2f} | {waits_s:.2f} | {time.perf_counter() - start:.2f} |")
        sizes = [sum(f.stat().st_size for f in Path(work, name).rglob("*") if f.is_file()) if name == "folder"
                 else Path(work, name).stat().st_size for name in ("file.tar", "folder")]
        print(f"sizes: file {sizes[0] / 1e9:.2f} GB, folder {sizes[1] / 1e9:.2f} GB")


def check_fits_device(config: GPTConfig, batch_size: int, device: torch.device,
                      dtype: torch.dtype = torch.float32) -> None:
    """Refuse, before allocating, a training step (AdamW) that the device cannot hold (gptlab/memory.py)."""
    need = estimate(config, Step(batch_size, dtype=dtype, device_type=device.type)).peak
    check_fits(need, device, f"a {config.num_of_layers}-layer, {config.embedding_dim}-wide model (batch {batch_size})")


def bench_train(args: TrainBench) -> None:
    device = pick_device(args.device)
    rt = Runtime(device, pick_dtype(args.dtype, device))
    config = model_config(args)
    check_fits_device(config, args.batch_size, device, rt.dtype)
    run = trainer(config, args.batch_size, rt, args.compile, args.health_interval)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with (torch.profiler.profile(activities=activities) if args.profile else contextlib.nullcontext()) as prof:
        seconds = seconds_per_call(run.step, args.warmup, args.iters, device)
    tokens, flops_per_token = run.tokens_per_step, run.model.flops_per_token()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device, rt.dtype)
    mfu = f"{flops_per_token * tokens / seconds / peak * 100:.1f}%" if peak else "n/a"
    print(f"config: {vars(args)}\nparameters: {run.model.num_parameters() / 1e6:.2f}M, "
          f"{flops_per_token * tokens / 1e9:.2f} GFLOP per step")
    health = {None: "off", 0: "guard"}.get(args.health_interval, f"guard + telemetry / {args.health_interval}")
    print("| device | dtype | attention | compile | health | ms/step | tokens/s | MFU |\n"
          "|---|---|---|---|---|---|---|---|")
    print(f"| {device} | {str(rt.dtype).removeprefix('torch.')} | {config.attention} | {args.compile} | "
          f"{health} | {seconds * 1e3:.1f} | {tokens / seconds:,.0f} | {mfu} |")
    if args.profile:  # warm-up steps included; the profiler itself slows the steps a little
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def model_size(text: str) -> tuple[int, int, int, int]:
    """'64,4,128,12' -> (block_size, num_of_layers, embedding_dim, batch_size)."""
    try:
        block, layers, width, batch = (int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--sizes: want BLOCK,LAYERS,WIDTH,BATCH (like 64,4,128,12), not {text!r}") from None
    if min(block, layers, width, batch) <= 0 or max(block, layers, width, batch) > 2 ** 31:
        raise UsageError(f"--sizes: each of BLOCK,LAYERS,WIDTH,BATCH must be a positive number, got {text!r}")
    return block, layers, width, batch


def attention_heads(width: int) -> int:
    """The heads of a model `bench.py attention` times: one per 64 features, at least 2."""
    return max(2, width // 64)


def bench_attention(args: AttentionBench) -> None:
    """Forward + backward of a whole GPT with each attention core, at a few sizes."""
    device = pick_device(args.device)
    for block, layers, width, batch in args.models():
        check_fits_device(GPTConfig(vocab_size=args.vocab_size, block_size=block, embedding_dim=width,
                                    num_of_layers=layers, num_of_heads=attention_heads(width)), batch, device)
    print(f"device {device}, float32, heads = max(2, width / 64), vocab {args.vocab_size}, dropout 0, "
          f"{args.warmup} warm-up + {args.iters} timed steps")
    print("| block | layers | width | heads | batch | scratch tokens/s | sdpa tokens/s | sdpa speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for block, layers, width, batch in args.models():
        heads = attention_heads(width)
        rates = []
        for core in ("scratch", "sdpa"):
            torch.manual_seed(0)
            model = GPT(GPTConfig(vocab_size=args.vocab_size, block_size=block, embedding_dim=width,
                                  num_of_layers=layers, num_of_heads=heads, dropout=0.0, attention=core)).to(device)
            x = torch.randint(0, args.vocab_size, (batch, block), device=device)
            rates.append(batch * block / seconds_per_call(lambda m=model, x=x: m(x, x)[1].backward(),
                                                          args.warmup, args.iters, device))
        print(f"| {block} | {layers} | {width} | {heads} | {batch} | {rates[0]:,.0f} | {rates[1]:,.0f} | "
              f"{rates[1] / rates[0]:.2f}x |")


def bench_generate(args: GenerateBench) -> None:
    """Tokens/s generating --new_tokens greedily from one token, with and without the KV cache."""
    device = pick_device(args.device)
    config = model_config(args)
    check_fits_device(config, 1, device)
    torch.manual_seed(0)
    model = GPT(config).to(device).eval()
    start = torch.zeros(1, 1, dtype=torch.long, device=device)
    print(f"device {device}, float32, batch 1, {config}, {model.num_parameters() / 1e6:.2f}M parameters, "
          f"{args.new_tokens} new tokens, greedy, mean of {args.repeats} runs after 1 warm-up")
    print("| KV cache | tokens/s | speed-up |\n|---|---|---|")
    rates = {}
    for use_cache in (False, True):
        seconds = seconds_per_call(
            lambda cache=use_cache: model.generate(start, args.new_tokens, temperature=0, use_cache=cache),
            1, args.repeats, device)
        rates[use_cache] = args.new_tokens / seconds
    for use_cache in (False, True):
        print(f"| {'yes' if use_cache else 'no'} | {rates[use_cache]:,.0f} | {rates[use_cache] / rates[False]:.2f}x |")


# nanoGPT's CPU recipe (its README): 4 layers, 4 heads, 128 wide, context 64, batch 12, no dropout, characters.
RECIPE = {"num_of_layers": 4, "num_of_heads": 4, "embedding_dim": 128, "block_size": 64, "batch_size": 12,
          "dropout": 0.0}
NANOGPT_NAMES = {"num_of_layers": "n_layer", "num_of_heads": "n_head", "embedding_dim": "n_embd"}


def our_command(folder: Path, corpus: str, tokenizer: Path, steps: int, work: Path, name: str) -> list[str]:
    """playground.py of the checkout in `folder` at the recipe, in its default configuration otherwise;
    no evaluation or sample, so runs of two lengths differ by their steps only. Each run writes its own
    checkpoint `name`.tar (and metrics file) in `work`."""
    flags = [f"--{key}={value}" for key, value in RECIPE.items()]
    return [sys.executable, str(folder / "playground.py"), corpus, f"--tokenizer={tokenizer}", *flags,
            f"--max_iters={steps}", "--eval_interval=1000000", "--checkpoint_interval=1000000",
            "--sample_tokens=0", f"--out_dir={work}", f"--checkpoint={work / name}.tar"]


def nanogpt_command(steps: int, work: Path) -> list[str]:
    """nanoGPT's train.py at its documented CPU recipe (run in its checkout); it evaluates once, at step 0."""
    flags = [f"--{NANOGPT_NAMES.get(key, key)}={value}" for key, value in RECIPE.items()]
    return [sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
            "--eval_iters=20", "--log_interval=1", *flags, f"--max_iters={steps}", "--lr_decay_iters=2000",
            "--eval_interval=1000000", f"--out_dir={work}"]


def wall_seconds(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UsageError(f"{' '.join(command[:3])} ... failed in {cwd}: {last}")
    return time.perf_counter() - start


def bench_peers(args: PeersBench) -> None:
    """Whole training runs of this checkout, --baseline and --nanogpt at nanoGPT's CPU recipe, alternating
    programs within each round: ms/step from the difference of a long and a short run (start-up cancels), the
    best round kept; and whether this checkout's logged training losses equal the baseline's exactly."""
    programs = {"this checkout": Path(__file__).resolve().parent}  # name -> checkout folder
    if args.baseline:
        programs["baseline"] = Path(args.baseline).resolve()
    if args.nanogpt:
        programs["nanoGPT"] = Path(args.nanogpt).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        work, corpus = Path(tmp), str(Path(args.corpus).resolve())
        tokenizer = work / "chars.json"  # characters only: bpe without merges, as nanoGPT's char-level data
        train_tokenizer(corpus_files([Path(corpus)]), "bpe", 67, show_progress=False).save(tokenizer)

        def run(name: str, steps: int, tag: str) -> float:
            """Wall seconds of one run of program `name`; `tag` names its checkpoint and metrics files."""
            command = nanogpt_command(steps, work / name) if name == "nanoGPT" else \
                our_command(programs[name], corpus, tokenizer, steps, work / name, tag)
            return wall_seconds(command, programs[name])

        for name in programs:  # warm-up: token caches, file caches, imports
            run(name, args.short, "warmup")
        per_step: dict[str, list[float]] = {name: [] for name in programs}
        for r in range(args.rounds):
            for name in programs:
                long, short = run(name, args.long, f"round{r}_long"), run(name, args.short, f"round{r}_short")
                per_step[name].append((long - short) / (args.long - args.short))
        same = ""
        if args.baseline:  # the training lines of the first long runs: {"step", "loss", ...}
            ours, theirs = ([row["loss"] for row in read_metrics(work / name / "round0_long.metrics.jsonl")
                             if "loss" in row] for name in ("this checkout", "baseline"))
            same = f"; training losses at the {len(ours)} logged steps equal to the baseline's: " \
                   f"{bool(ours) and ours == theirs}"
    best = {name: min(times) for name, times in per_step.items()}
    print(f"nanoGPT's CPU recipe {RECIPE}, characters, ({args.long} - {args.short} steps), {args.rounds} rounds{same}")
    print("| program | ms/step, each round | best ms/step | this checkout's speed-up over it |\n|---|---|---|---|")
    for name, times in per_step.items():
        print(f"| {name} | {', '.join(f'{t * 1e3:.1f}' for t in times)} | {best[name] * 1e3:.1f} | "
              f"{best[name] / best['this checkout']:.2f}x |")


BENCHMARKS: dict[str, tuple[type, Callable[..., None], str]] = {
    "train": (TrainBench, bench_train, "training step throughput and MFU"),
    "attention": (AttentionBench, bench_attention, "scratch vs SDPA attention, forward + backward"),
    "generate": (GenerateBench, bench_generate, "generation with and without the KV cache"),
    "peers": (PeersBench, bench_peers, "whole training runs beside an older checkout and nanoGPT"),
    "memory": (MemoryBench, bench_memory, "memory plans of a config on GPUs of several sizes, from the model"),
    "checkpoint": (CheckpointBench, bench_checkpoint, "save time of one checkpoint file vs a sharded folder"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: bench.py {{{','.join(BENCHMARKS)}}} [flags]   (bench.py WHAT --help lists the "
              "flags)\n" +
              "\n".join(f"  {name:10} {about}" for name, (_, _, about) in BENCHMARKS.items()))
        return
    if not argv or argv[0] not in BENCHMARKS:
        got = f", not {argv[0]!r}" if argv else ""
        raise UsageError(f"say what to benchmark: {', '.join(BENCHMARKS)}{got} (bench.py --help)")
    cls, run, about = BENCHMARKS[argv[0]]
    run(parse_dataclass(cls, f"bench.py {argv[0]}: {about}", argv[1:]))


if __name__ == "__main__":
    run_cli(main)
