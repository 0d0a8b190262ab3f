"""One command for the first GPU: does the code work there, and how fast is it? Prints one markdown summary.

    python gpu_check.py [--minutes 8]     on one GPU (an H100 takes about 5 minutes)
    python gpu_check.py --dry_run         the same code paths on the CPU with tiny shapes (about 20 s)

Parts (each one guarded: a failing part is reported in its row and the others still run):
    gpu tests   pytest -m gpu (with --dry_run: only collected)
    train       GPT-2 small (configs/gpt2_small.yaml's model and batch, 50,304 random tokens as vocabulary), bf16
                autocast, torch.compile, SDPA (flash): tokens/s and MFU of training.train_step, the step the
                training loop runs; MFU = model FLOPs per second (gpt.flops_per_token) / runtime.peak_flops
    generate    greedy tokens/s, batch 1, with and without the KV cache (and batch 8 with it)
    attention   forward + backward tokens/s of the whole model with the scratch and the sdpa attention core
    ddp         a few DDP training steps in 2 processes under torchrun (with 2+ GPUs; --dry_run: 2 CPU processes)
The exit status is 1 if a part failed.
"""

import dataclasses
import gc
import math
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch.nn.parallel import DistributedDataParallel

from config import TrainConfig
from gpt import GPT, GPTConfig
from gptlab.cli import POSITIVE, check_fields, parse_dataclass, setting
from gptlab.data import TokenSplit
from gptlab.errors import UsageError, run_cli
from gptlab.objectives import NextToken
from gptlab.runtime import Runtime, allow_tf32, peak_flops, pick_dtype, setup_runtime, teardown
from gptlab.training import make_optimizer, train_step

REPO = Path(__file__).resolve().parent
GPT2_VOCAB = 50304  # GPT-2's 50,257 tokens rounded up to a multiple of 64 (friendlier matmul shapes)


@dataclass(frozen=True)
class Plan:
    """The shapes and step counts of one check."""

    model: GPTConfig
    batch_size: int
    compile: bool
    warmup: int  # untimed steps first (compilation, allocator, autotuning)
    steps: int  # timed steps
    new_tokens: int  # per generation run
    attention_batch: int
    ddp_steps: int


def full_plan() -> Plan:
    """GPT-2 small as configs/gpt2_small.yaml trains it (its model settings and micro-batch)."""
    settings = yaml.safe_load((REPO / "configs" / "gpt2_small.yaml").read_text())
    model_fields = {f.name for f in dataclasses.fields(GPTConfig)}
    model = GPTConfig(**{k: v for k, v in settings.items() if k in model_fields}, vocab_size=GPT2_VOCAB)
    return Plan(model, settings["batch_size"], compile=True, warmup=10, steps=50, new_tokens=200,
                attention_batch=8, ddp_steps=10)


def dry_plan() -> Plan:
    model = GPTConfig(vocab_size=300, block_size=32, embedding_dim=32, num_of_layers=2, num_of_heads=2, dropout=0.0)
    return Plan(model, batch_size=4, compile=False, warmup=1, steps=3, new_tokens=20, attention_batch=2, ddp_steps=2)


@dataclass
class Row:
    part: str
    result: str  # a figure, "skipped (why)" or "FAILED (why)"
    detail: str = ""
    seconds: float = 0.0  # the part's wall time


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], object], warmup: int, iters: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def random_tokens(folder: Path, vocab_size: int, n: int) -> TokenSplit:
    """A token file of uniform random ids: speed does not depend on the text, and nothing is downloaded."""
    path = folder / "random_tokens.bin"
    np.random.default_rng(0).integers(0, vocab_size, n, dtype=np.uint16).tofile(path)
    return TokenSplit(path, "uint16", n, n)


def train_config(plan: Plan) -> TrainConfig:
    return TrainConfig(model=plan.model, batch_size=plan.batch_size, compile=plan.compile, warmup_iters=0)


def flash_eligible(plan: Plan, device: torch.device, dtype: torch.dtype) -> str:
    """Whether SDPA's flash kernel takes this model's attention shape (the fused path the model asks for)."""
    if device.type != "cuda":
        return "n/a on cpu"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    c = plan.model
    q = torch.randn(1, c.num_of_heads, c.block_size, c.embedding_dim // c.num_of_heads, device=device, dtype=dtype)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
        return "yes"
    except RuntimeError:
        return "no"


# ---------------------------------------------------------------------- the parts


def check_gpu_tests(plan: Plan, device: torch.device, dry_run: bool, seconds_left: float) -> Row:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    if dry_run:  # only the files that hold GPU tests: collecting the whole suite takes a minute on a CPU
        cmd += ["--collect-only", *sorted(str(p) for p in (REPO / "tests").glob("test_*.py")
                                          if "mark.gpu" in p.read_text(encoding="utf-8"))]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=seconds_left)
    lines = r.stdout.strip().splitlines()
    summary = lines[-1].strip("= ") if lines else r.stderr.strip()[-200:]
    if r.returncode != 0:
        raise RuntimeError(f"pytest exit {r.returncode}: {summary}")
    return Row("gpu tests", summary, "collected only (dry run)" if dry_run else "pytest -m gpu")


def check_train(plan: Plan, device: torch.device, dry_run: bool, seconds_left: float) -> Row:
    dtype = pick_dtype("auto", device)
    rt = Runtime(device, dtype)
    c = train_config(plan)
    torch.manual_seed(0)
    model = GPT(plan.model).to(device)
    optimizer = make_optimizer(model, c, device)
    step_model = torch.compile(model) if plan.compile else model
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    tokens = plan.batch_size * plan.model.block_size
    with tempfile.TemporaryDirectory() as tmp:
        split = random_tokens(Path(tmp), plan.model.vocab_size, max(100_000, 20 * tokens))
        counter = iter(range(10 ** 9))
        losses: list[torch.Tensor] = []

        def step() -> None:
            losses.append(train_step(step_model, optimizer, scaler, split, next(counter), c, rt, NextToken()))

        start = time.perf_counter()
        for _ in range(plan.warmup):
            step()
        sync(device)
        warmup_s = time.perf_counter() - start
        seconds = seconds_per_call(step, 0, plan.steps, device)
    loss = float(losses[-1])
    if not math.isfinite(loss):
        raise RuntimeError(f"loss is {loss}")
    peak = peak_flops(device, dtype)
    flops = model.flops_per_token() * tokens / seconds
    mfu = f"MFU {flops / peak * 100:.1f}%" if peak else f"MFU n/a (no peak for {device.type})"
    detail = (f"{model.num_parameters() / 1e6:.3g}M parameters, batch {plan.batch_size} x {plan.model.block_size}, "
              f"{str(dtype).removeprefix('torch.')}, compile {plan.compile}, "
              f"flash {flash_eligible(plan, device, dtype)}; {seconds * 1e3:.1f} ms/step, {flops / 1e12:.3g} TFLOP/s; "
              f"{plan.warmup} warm-up steps (compile included) {warmup_s:.0f} s; loss {loss:.2f} "
              f"(ln vocab = {math.log(plan.model.vocab_size):.2f})")
    return Row("train", f"{tokens / seconds:,.0f} tokens/s, {mfu}", detail)


def check_generate(plan: Plan, device: torch.device, dry_run: bool, seconds_left: float) -> Row:
    torch.manual_seed(0)
    model = GPT(plan.model).to(device).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    rates, outputs = {}, {}
    for use_cache in (True, False):
        def run(cache: bool = use_cache) -> None:
            outputs[cache] = model.generate(prompt, plan.new_tokens, temperature=0, use_cache=cache)

        rates[use_cache] = plan.new_tokens / seconds_per_call(run, 1, 2, device)
    batch = prompt.expand(8, 1).contiguous()
    batched = plan.new_tokens * 8 / seconds_per_call(
        lambda: model.generate(batch, plan.new_tokens, temperature=0), 1, 1, device)
    same = "same tokens" if torch.equal(outputs[True], outputs[False]) else "tokens DIFFER"
    return Row("generate", f"cache {rates[True]:,.0f} tokens/s, no cache {rates[False]:,.0f} tokens/s",
               f"batch 1, greedy, {plan.new_tokens} new tokens, float32 weights; cached vs not: {same}; "
               f"batch 8 with cache: {batched:,.0f} tokens/s")


def check_attention(plan: Plan, device: torch.device, dry_run: bool, seconds_left: float) -> Row:
    rt = Runtime(device, pick_dtype("auto", device))
    rates = {}
    for core in ("scratch", "sdpa"):
        torch.manual_seed(0)
        model = GPT(dataclasses.replace(plan.model, attention=core)).to(device)
        x = torch.randint(0, plan.model.vocab_size, (plan.attention_batch, plan.model.block_size), device=device)

        def forward_backward(m: GPT = model, x: torch.Tensor = x) -> None:
            with rt.autocast():
                _, loss = m(x, x)
            loss.backward()

        rates[core] = x.numel() / seconds_per_call(forward_backward, 2, plan.steps // 3 or 1, device)
        del model
        free(device)
    return Row("attention", f"sdpa {rates['sdpa'] / rates['scratch']:.2f}x scratch",
               f"forward + backward, no compile, {str(rt.dtype).removeprefix('torch.')}, batch "
               f"{plan.attention_batch} x {plan.model.block_size}: scratch {rates['scratch']:,.0f} tokens/s, "
               f"sdpa {rates['sdpa']:,.0f} tokens/s")


def check_ddp(plan: Plan, device: torch.device, dry_run: bool, seconds_left: float) -> Row:
    if not dry_run and torch.cuda.device_count() < 2:
        return Row("ddp", f"skipped ({torch.cuda.device_count()} GPU: DDP needs 2)")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), "--ddp_worker"] + (["--dry_run"] if dry_run else [])
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=seconds_left)
    found = re.search(r"^DDP (.*)$", r.stdout, re.MULTILINE)
    if r.returncode != 0 or not found:
        raise RuntimeError(f"torchrun exit {r.returncode}: {(r.stderr.strip() or r.stdout.strip())[-300:]}")
    fields = dict(item.split("=") for item in found.group(1).split())
    if fields["in_sync"] != "yes":
        raise RuntimeError("the two replicas' weights differ after the steps")
    return Row("ddp", f"{float(fields['tokens_per_s']):,.0f} tokens/s (2 processes)",
               f"{'gloo on cpu' if dry_run else 'nccl'}, no compile, batch {plan.batch_size} per process, "
               f"{plan.ddp_steps} timed steps, loss {float(fields['loss']):.2f}, replicas in sync")


def ddp_worker(plan: Plan, dry_run: bool) -> None:
    """One rank of check_ddp. The run's objects live in ddp_steps, so they are gone before teardown."""
    rt = setup_runtime("cpu" if dry_run else "cuda", "auto")
    try:
        line = ddp_steps(plan, rt)
        if rt.is_main:
            print(line, flush=True)
    finally:
        teardown(rt, sys.exception())


def ddp_steps(plan: Plan, rt: Runtime) -> str:
    """Train a few steps under DDP, then check that every replica holds the same weights: the result line."""
    c = train_config(plan)
    torch.manual_seed(0)
    model = GPT(plan.model).to(rt.device)
    optimizer = make_optimizer(model, c, rt.device)
    ddp = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
    tokens = plan.batch_size * plan.model.block_size
    with tempfile.TemporaryDirectory() as tmp:
        split = random_tokens(Path(tmp), plan.model.vocab_size, max(100_000, 20 * tokens))
        counter = iter(range(10 ** 9))
        losses: list[torch.Tensor] = []
        seconds = seconds_per_call(
            lambda: losses.append(train_step(ddp, optimizer, scaler, split, next(counter), c, rt, NextToken())),
            2, plan.ddp_steps, rt.device)
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()])
    gathered = [torch.empty_like(checksum) for _ in range(rt.world_size)]
    dist.all_gather(gathered, checksum)
    in_sync = all(torch.equal(g, gathered[0]) for g in gathered)
    return (f"DDP tokens_per_s={rt.world_size * tokens / seconds:.1f} loss={float(losses[-1]):.4f} "
            f"in_sync={'yes' if in_sync else 'no'}")


# ---------------------------------------------------------------------- driver

PARTS = {"gpu tests": check_gpu_tests, "train": check_train, "generate": check_generate,
         "attention": check_attention, "ddp": check_ddp}


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_part(name: str, check: Callable[..., Row], plan: Plan, device: torch.device, dry_run: bool,
             deadline: float) -> Row:
    """One part, guarded: an exception becomes a FAILED row; a spent time budget, a skipped one."""
    seconds_left = deadline - time.monotonic()
    if seconds_left < 5:
        return Row(name, "skipped (time budget used up)")
    print(f"-- {name}", file=sys.stderr, flush=True)
    start = time.monotonic()
    try:
        row = check(plan, device, dry_run, seconds_left)
    except subprocess.TimeoutExpired:
        row = Row(name, "FAILED (ran past the time budget)")
    except Exception as e:  # any failure of one part is reported, and the next part still runs
        message = " ".join(str(e).split())[:300]
        row = Row(name, f"FAILED ({type(e).__name__}: {message})")
    free(device)
    return dataclasses.replace(row, seconds=time.monotonic() - start)


def summary(rows: list[Row], device: torch.device, dry_run: bool, elapsed: float) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [f"## gpu_check{' --dry_run' if dry_run else ''}: {name}, torch {torch.__version__}, {elapsed:.0f} s",
             "", "| part | result | detail | seconds |", "|---|---|---|---|"]
    lines += [f"| {r.part} | {r.result} | {r.detail} | {r.seconds:.0f} |" for r in rows]
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class GpuCheckArgs:
    dry_run: bool = setting(False, "the same code paths on the CPU with tiny shapes")
    minutes: float = setting(8.0, "time budget; parts that would start after it are skipped", rule=POSITIVE)
    ddp_worker: bool = setting(False, "internal: one rank of the DDP part, started by torchrun")

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.dry_run and not torch.cuda.is_available():
            raise UsageError("torch sees no CUDA GPU here: run `python gpu_check.py --dry_run` for the CPU rehearsal")


def parse_args(argv: list[str] | None = None) -> GpuCheckArgs:
    return parse_dataclass(GpuCheckArgs, "Check this code on one GPU and print one markdown summary of its speed.",
                           argv)


def main() -> None:
    args = parse_args()
    plan = dry_plan() if args.dry_run else full_plan()
    if args.ddp_worker:
        return ddp_worker(plan, args.dry_run)
    start = time.monotonic()
    deadline = start + args.minutes * 60
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", torch.cuda.current_device())
    allow_tf32(device)
    rows = [run_part(name, check, plan, device, args.dry_run, deadline) for name, check in PARTS.items()]
    print(summary(rows, device, args.dry_run, time.monotonic() - start), flush=True)
    if any(r.result.startswith("FAILED") for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
