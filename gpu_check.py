"""One command for the first GPU: does the code work there, and how fast is it? One markdown table.

    python gpu_check.py --out gpu_check_out        on one GPU (or two), about 10 minutes at most
    python gpu_check.py --dry_run --out DIR        every part's control flow on the CPU with tiny shapes

Parts, in this order, each in a process of its own with its own time limit, so that a crash or a hang costs
that part only. Each part's row is printed the moment it ends and appended to DIR/table.md; everything the
part printed (pytest's whole output included) is in DIR/<part>.log as it happens; both files are appended to,
never replaced, so a killed run keeps every part that finished.
    train 16x1024   the headline: GPT-2 small (configs/gpt2_small.yaml's model, a 50,304-token vocabulary of
                    random tokens), bf16 autocast, torch.compile (eager if compiling fails, said in the row),
                    16 sequences of 1,024 tokens per step, timed through training.train_step (the step the
                    training loop runs). MFU = model FLOPs per second (gpt.flops_per_token) against the GPU's
                    spec peak (runtime.GPU_PEAK_FLOPS) and against a peak measured on the spot (a large bf16
                    matmul); the attention kernel the compiled step ran (read from the profiler)
    train 8x1024, train 32x1024     the same at two more micro-batch sizes: where MFU stops rising
    generate        tokens/s as generate.py runs (autocast, the KV cache in the compute dtype): batch 1 with
                    and without the cache, batch 8 with it
    attention       forward + backward tokens/s with the scratch and the SDPA attention core
    ddp             DDP over NCCL under torchrun: 1 process on one GPU, 2 on two or more
    gpu tests       pytest of the GPU-marked tests only (offline, no installs), last, bounded
--dry_run also injects a torch.compile failure (every train part falls back to eager) and a hang (a part of its
own that never ends and is stopped at its limit); the injected failures do not count in the exit status.
The exit status is 1 if a part failed.
"""

import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel

from gpt import GPT, GPTConfig
from gptlab.cli import POSITIVE, check_fields, parse_dataclass, setting
from gptlab.errors import UsageError, run_cli
from gptlab.fileio import atomic_write_text, check_output_dir
from gptlab.runtime import Runtime, allow_tf32, peak_flops, pick_device, pick_dtype, setup_runtime, teardown
from gptlab.speed import Trainer, matmul_flops, seconds_per_call, sync, trainer

REPO = Path(__file__).resolve().parent
GPT2_VOCAB = 50304  # GPT-2's 50,257 tokens rounded up to a multiple of 64 (friendlier matmul shapes)
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
             "PYTHONUNBUFFERED": "1"}  # unbuffered: a killed part's log holds all it printed
# Parts start as forks of a server process that has imported this module: a fresh interpreter would spend
# seconds importing torch per part, and a fork of this process could inherit its CUDA state.
FORKSERVER = multiprocessing.get_context("forkserver")


@dataclass(frozen=True)
class Plan:
    """The shapes, step counts and time limits of one check."""

    model: GPTConfig
    batch_sizes: tuple[int, ...]  # micro-batches of the train parts, the headline first
    compile: bool
    warmup: int  # untimed steps after the first (compilation, allocator, autotuning)
    steps: int  # timed steps
    matmul_size: int  # of the square matmul that measures the achievable peak
    new_tokens: int  # per generation run
    attention_batch: int
    ddp_steps: int
    limits: dict[str, float]  # seconds per part, by kind (see parts())
    dry_run: bool = False  # on the CPU, with an injected torch.compile failure and an injected hang


def full_plan() -> Plan:
    """GPT-2 small as configs/gpt2_small.yaml sets it up."""
    settings = yaml.safe_load((REPO / "configs" / "gpt2_small.yaml").read_text())
    model_fields = {f.name for f in dataclasses.fields(GPTConfig)}
    model = GPTConfig(**{k: v for k, v in settings.items() if k in model_fields}, vocab_size=GPT2_VOCAB)
    limits = {"headline": 300, "train": 150, "generate": 90, "attention": 90, "ddp": 150, "gpu tests": 240}
    return Plan(model, (16, 8, 32), compile=True, warmup=10, steps=30, matmul_size=8192, new_tokens=200,
                attention_batch=8, ddp_steps=10, limits=limits)


def dry_plan() -> Plan:
    model = GPTConfig(vocab_size=300, block_size=32, embedding_dim=32, num_of_layers=2, num_of_heads=2, dropout=0.0)
    limits = {"headline": 120, "train": 120, "generate": 120, "attention": 120, "ddp": 120, "gpu tests": 120,
              "hang": 15}  # the hang: long enough to start (imports) on a loaded machine
    return Plan(model, (4, 2, 8), compile=True, warmup=1, steps=2, matmul_size=128, new_tokens=8,
                attention_batch=2, ddp_steps=2, limits=limits, dry_run=True)


@dataclass
class Row:
    part: str
    result: str  # figures, "skipped (why)" or "FAILED (why)"
    detail: str = ""
    seconds: float = 0.0  # the part's wall time, its process's start included


@dataclass(frozen=True)
class Part:
    name: str
    check: Callable[[Plan, torch.device], Row]  # runs in the part's own process
    limit_s: float
    injected: bool = False  # a failure --dry_run injects on purpose: not counted in the exit status


def one_line(e: BaseException, limit: int = 300) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:limit]


def utc_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------- train


def spec_peak(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """The device's datasheet peak at this precision, and how to read it (or why there is none)."""
    peak = peak_flops(device, dtype)
    if peak:
        return peak, f"{peak / 1e12:,.0f} TFLOP/s (datasheet)"
    if device.type != "cuda":
        return None, f"none for {device.type}"
    return None, (f"none: {torch.cuda.get_device_name(device)!r} is not in GPU_PEAK_FLOPS in gptlab/runtime.py; "
                  f"add its dense (no sparsity) bf16 and fp32 peaks from its datasheet, under that exact name")


def failing_backend(graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
    """A torch.compile backend that fails as a broken compiler would: --dry_run's injected failure."""
    raise RuntimeError("injected compile failure (--dry_run)")


def compile_or_eager(run: Trainer, inject: bool) -> str:
    """Compile the step's model and run the first step; if compiling fails, go on with the eager model.
    Returns what happened, in words. torch.compile fails at the first call, not at torch.compile()."""
    run.step_model = torch.compile(run.model, backend=failing_backend) if inject else torch.compile(run.model)
    try:
        run.step()
        return "on"
    except Exception as e:  # whatever the compiler raised: the eager model still measures the GPU
        traceback.print_exc()  # into the part's log
        run.step_model = run.model
        run.optimizer.zero_grad(set_to_none=True)
        run.step()
        return f"FAILED, eager instead ({one_line(e, 160)})"


# The dispatcher ops SDPA picks its kernel by, as the profiler names them (a compiled graph calls them too).
ATTENTION_OPS = {"flash": "aten::_scaled_dot_product_flash_attention",  # also ..._for_cpu
                 "memory-efficient": "aten::_scaled_dot_product_efficient_attention",
                 "cudnn": "aten::_scaled_dot_product_cudnn_attention",
                 "math": "aten::_scaled_dot_product_attention_math"}


def attention_kernels(run: Trainer) -> str:
    """The SDPA kernels one step of run.step_model (compiled or not) ran, as the profiler saw them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run.step()
    names = {event.key for event in prof.key_averages()}
    found = [kind for kind, op in ATTENTION_OPS.items() if any(name.startswith(op) for name in names)]
    return ", ".join(found) or "no SDPA kernel (scratch attention, or SDPA decomposed)"


def check_train(plan: Plan, device: torch.device, batch_size: int) -> Row:
    rt = Runtime(device, pick_dtype("auto", device))
    spec, spec_text = spec_peak(device, rt.dtype)
    achievable = matmul_flops(device, rt.dtype, plan.matmul_size, iters=20)
    run = trainer(plan.model, batch_size, rt)
    start = time.perf_counter()
    compiled = compile_or_eager(run, plan.dry_run) if plan.compile else "off"
    for _ in range(plan.warmup):
        run.step()
    sync(device)
    untimed_steps, untimed_s = run.iteration, time.perf_counter() - start
    seconds = seconds_per_call(run.step, 0, plan.steps, device)
    loss = float(run.step())
    if not math.isfinite(loss):
        raise RuntimeError(f"loss is {loss}")
    kernels = attention_kernels(run)
    tokens = run.tokens_per_step
    flops = run.model.flops_per_token() * tokens / seconds
    mfu = f"MFU {flops / spec:.1%} of spec" if spec else "MFU n/a (no spec peak)"
    eager = "; EAGER: compile failed" if compiled.startswith("FAILED") else ""
    memory = f", peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
    return Row("", f"{tokens / seconds:,.0f} tokens/s, {mfu}, {flops / achievable:.1%} of measured matmul peak{eager}",
               f"{run.model.num_parameters() / 1e6:.3g}M parameters, batch {batch_size} x {plan.model.block_size}, "
               f"{dtype_name(rt.dtype)}, compile {compiled}, attention kernel: {kernels}; {seconds * 1e3:.1f} ms/step, "
               f"{flops / 1e12:.3g} TFLOP/s; spec peak {spec_text}; measured peak {achievable / 1e12:.3g} TFLOP/s "
               f"({plan.matmul_size}^3 {dtype_name(rt.dtype)} matmul); first {untimed_steps} steps untimed "
               f"(compile included) {untimed_s:.0f} s; loss {loss:.2f} (ln vocab = "
               f"{math.log(plan.model.vocab_size):.2f}){memory}")


# ---------------------------------------------------------------------- generate, attention


def check_generate(plan: Plan, device: torch.device) -> Row:
    """As generate.py runs: under autocast, where the KV cache is kept in the compute dtype."""
    rt = Runtime(device, pick_dtype("auto", device))
    torch.manual_seed(0)
    model = GPT(plan.model).to(device).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    rates = {}
    with rt.autocast():
        for use_cache in (True, False):
            rates[use_cache] = plan.new_tokens / seconds_per_call(
                lambda cache=use_cache: model.generate(prompt, plan.new_tokens, temperature=0, use_cache=cache),
                1, 2, device)
        batch = prompt.expand(8, 1).contiguous()
        batched = plan.new_tokens * 8 / seconds_per_call(
            lambda: model.generate(batch, plan.new_tokens, temperature=0), 1, 1, device)
        cache_dtype = dtype_name(model.compute_dtype(device))
    return Row("", f"cache {rates[True]:,.0f} tokens/s, no cache {rates[False]:,.0f} tokens/s",
               f"batch 1, greedy, {plan.new_tokens} new tokens, {dtype_name(rt.dtype)} autocast, KV cache in "
               f"{cache_dtype}; batch 8 with cache: {batched:,.0f} tokens/s; speed only: the weights are untrained, "
               f"so greedy picks are near-ties and cached and uncached tokens are not compared here")


def check_attention(plan: Plan, device: torch.device) -> Row:
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

        rates[core] = x.numel() / seconds_per_call(forward_backward, 2, plan.steps, device)
        del model
    return Row("", f"sdpa {rates['sdpa'] / rates['scratch']:.2f}x scratch",
               f"forward + backward, no compile, {dtype_name(rt.dtype)}, batch {plan.attention_batch} x "
               f"{plan.model.block_size}: scratch {rates['scratch']:,.0f} tokens/s, sdpa {rates['sdpa']:,.0f} tokens/s")


# ---------------------------------------------------------------------- ddp


def check_ddp(plan: Plan, device: torch.device) -> Row:
    """torchrun, 1 process per GPU up to 2; its output goes to this part's log as it comes."""
    processes = 1 if device.type == "cpu" else min(2, torch.cuda.device_count())
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "ddp.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               str(REPO / "gpu_check.py"), "--ddp_worker", str(result)] + (["--dry_run"] if plan.dry_run else [])
        code = subprocess.run(cmd, cwd=REPO).returncode
        if code != 0 or not result.exists():
            raise RuntimeError(f"torchrun exit {code} (its output is in this part's log)")
        got = json.loads(result.read_text())
    if not got["in_sync"]:
        raise RuntimeError("the replicas' weights differ after the steps")
    if not got["group_destroyed"]:
        raise RuntimeError("the process group was still alive after teardown")
    return Row("", f"{got['tokens_per_s']:,.0f} tokens/s ({processes} process{'es' * (processes > 1)}, "
                   f"{got['backend']})",
               f"no compile, {got['dtype']}, batch {plan.batch_sizes[0]} x {plan.model.block_size} per process, "
               f"{plan.ddp_steps} timed steps, loss {got['loss']:.2f}, replicas in sync, process group destroyed")


def ddp_worker(plan: Plan, result: Path) -> None:
    """One rank of check_ddp. The run's objects live in ddp_steps, so they are gone before teardown."""
    rt = setup_runtime("cpu" if plan.dry_run else "cuda", "auto")
    try:
        measured = ddp_steps(plan, rt)
    finally:
        teardown(rt, sys.exception())
    if rt.is_main:
        measured["group_destroyed"] = not dist.is_initialized()
        atomic_write_text(result, json.dumps(measured), "DDP result")


def ddp_steps(plan: Plan, rt: Runtime) -> dict:
    """Train a few steps under DDP, then check that every replica holds the same weights."""
    run = trainer(plan.model, plan.batch_sizes[0], rt)
    run.step_model = DistributedDataParallel(run.model, device_ids=[rt.device.index] if rt.device.type == "cuda"
                                             else None)
    seconds = seconds_per_call(run.step, 2, plan.ddp_steps, rt.device)
    loss = float(run.step())
    checksum = torch.stack([p.detach().double().sum() for p in run.model.parameters()])
    gathered = [torch.empty_like(checksum) for _ in range(rt.world_size)]
    dist.all_gather(gathered, checksum)
    return {"tokens_per_s": rt.world_size * run.tokens_per_step / seconds, "loss": loss,
            "in_sync": all(torch.equal(g, gathered[0]) for g in gathered), "backend": dist.get_backend(),
            "dtype": dtype_name(rt.dtype)}


# ---------------------------------------------------------------------- gpu tests, the injected hang


def gpu_test_files() -> list[str]:
    """The test files that hold GPU-marked tests: only they are collected (and imported)."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if "mark.gpu" in p.read_text(encoding="utf-8"))


def check_gpu_tests(plan: Plan, device: torch.device) -> Row:
    """pytest -m gpu, its whole output copied into this part's log line by line as it comes."""
    # --dry_run: on a CPU the GPU tests would be skipped anyway; collecting them walks the same path.
    only_collect = ["--collect-only"] if plan.dry_run else []
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-rfEs", *only_collect,
           *gpu_test_files()]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = ""
    for line in proc.stdout:
        sys.stdout.write(line)
        last = line.strip() or last
    code = proc.wait()
    summary = last.strip("= ")
    if code != 0:
        raise RuntimeError(f"pytest exit {code}: {summary}")
    return Row("", summary, f"{'collected only (dry run): ' if plan.dry_run else ''}pytest -m gpu on "
                            f"{', '.join(gpu_test_files())}")


def hang(plan: Plan, device: torch.device) -> Row:
    """--dry_run's injected hang: never returns, so the driver must stop it at its limit."""
    print("hanging on purpose (--dry_run)", flush=True)
    while True:
        time.sleep(60)


def parts(plan: Plan) -> list[Part]:
    """Every part in the order they run: train first (what the run is for), pytest last."""
    block, limits = plan.model.block_size, plan.limits
    trains = [Part(f"train {b}x{block}", partial(check_train, batch_size=b),
                   limits["headline" if i == 0 else "train"]) for i, b in enumerate(plan.batch_sizes)]
    others = [Part("generate", check_generate, limits["generate"]),
              Part("attention", check_attention, limits["attention"]),
              Part("ddp", check_ddp, limits["ddp"])]
    injected = [Part("hang (injected)", hang, limits["hang"], injected=True)] if plan.dry_run else []
    return [*trains, *others, *injected, Part("gpu tests", check_gpu_tests, limits["gpu tests"])]


# ---------------------------------------------------------------------- one part, in its own process


def run_part_here(part: Part, plan: Plan) -> Row:
    """Pick the device and run the check; a failure becomes a FAILED row, its traceback goes to the log."""
    device = torch.device("cpu") if plan.dry_run else pick_device("cuda")
    allow_tf32(device)
    try:
        row = part.check(plan, device)
    except Exception as e:
        traceback.print_exc()
        return Row(part.name, f"FAILED ({one_line(e)})")
    return dataclasses.replace(row, part=part.name)


def part_process(name: str, dry_run: bool, log: str, row_out: Connection) -> None:
    """The body of a part's process. It is forked from a server that has imported this module (torch
    included) and never touched CUDA, so it starts at once. It runs in a session of its own (stop() ends it
    and all it starts); everything it and its children print goes to its log; its row comes back via row_out."""
    os.setsid()
    log_fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    os.dup2(log_fd, sys.stdout.fileno())
    os.dup2(log_fd, sys.stderr.fileno())
    plan = dry_plan() if dry_run else full_plan()
    part = {p.name: p for p in parts(plan)}[name]
    row_out.send(dataclasses.asdict(run_part_here(part, plan)))


def log_path(out: Path, part: Part) -> Path:
    return out / (re.sub(r"[^a-z0-9]+", "_", part.name.lower()).strip("_") + ".log")


def stop(proc: multiprocessing.Process) -> None:
    """End a part's process and all it started: SIGTERM first (torchrun passes it on to its workers, which
    run in sessions of their own), then SIGKILL to whatever of its group is left after 10 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    proc.join(10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.join()


def run_part(part: Part, plan: Plan, out: Path, seconds_left: float) -> Row:
    """Run one part in a process of its own, its output appended to its log, within its limit (or the time
    left, if less). A hang or a crash becomes a FAILED row."""
    if seconds_left < 10:
        return Row(part.name, "skipped (time budget used up)")
    limit = min(part.limit_s, seconds_left)
    log = log_path(out, part)
    append(log, f"==== {part.name}: started {utc_now()}, limit {limit:.0f} s")
    rows, row_out = FORKSERVER.Pipe(duplex=False)
    proc = FORKSERVER.Process(target=part_process, args=(part.name, plan.dry_run, str(log), row_out))
    start = time.monotonic()
    proc.start()
    row_out.close()  # the child's end: a child that dies leaves the pipe empty
    try:
        proc.join(limit)
        hung = proc.is_alive()
    finally:  # a hang, or Ctrl-C here: the part runs in a session of its own and would outlive this process
        if proc.is_alive():
            stop(proc)
    seconds = time.monotonic() - start
    with contextlib.suppress(EOFError):  # EOF: the part ended without sending its row
        if rows.poll():
            return dataclasses.replace(Row(**rows.recv()), seconds=seconds)
    if hung:
        return Row(part.name, f"FAILED (no result within its {limit:.0f} s limit: stopped; see {log.name})",
                   seconds=seconds)
    return Row(part.name, f"FAILED (exit {proc.exitcode} without a result; see {log.name})", seconds=seconds)


# ---------------------------------------------------------------------- the table


def cell(text: str) -> str:
    """Text safe in a markdown table cell: one line, and a | that does not end the cell."""
    return " ".join(text.split()).replace("|", "\\|")


def table_row(row: Row) -> str:
    return f"| {cell(row.part)} | {cell(row.result)} | {cell(row.detail)} | {row.seconds:.0f} |"


def table_header(plan: Plan) -> str:
    if plan.dry_run:
        machine = "cpu (dry run)"
    else:
        machine = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return (f"\n## gpu_check{' --dry_run' if plan.dry_run else ''}: {machine}, torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}, started {utc_now()}\n\n"
            "| part | result | detail | seconds |\n|---|---|---|---|")


def append(path: Path, text: str) -> None:
    """Append and flush to disk: what is written survives a kill of this process or of the machine's job (an
    append-only table, so not fileio.atomic_write, which would rewrite it whole)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------- command line


@dataclasses.dataclass(frozen=True)
class GpuCheckArgs:
    out: str = setting("gpu_check_out", "folder for table.md (the rows) and one .log per part; appended to")
    dry_run: bool = setting(False, "every part's control flow on the CPU with tiny shapes, with an injected "
                                   "compile failure and an injected hang")
    minutes: float = setting(10.0, "time budget; a part gets at most what is left of it", rule=POSITIVE)
    ddp_worker: str | None = setting(None, "internal: one rank of the ddp part under torchrun; rank 0 writes "
                                           "its result to this file", hidden=True)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.ddp_worker is not None and "RANK" not in os.environ:
            raise UsageError("--ddp_worker is internal: gpu_check.py starts it under torchrun for its ddp part")
        if not self.dry_run and not torch.cuda.is_available():
            raise UsageError("torch sees no CUDA GPU here: run `python gpu_check.py --dry_run` for the CPU rehearsal")


def parse_args(argv: list[str] | None = None) -> GpuCheckArgs:
    return parse_dataclass(GpuCheckArgs, "Check this code on one GPU: each part's row and log under --out.", argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    plan = dry_plan() if args.dry_run else full_plan()
    if args.ddp_worker is not None:
        return ddp_worker(plan, Path(args.ddp_worker))
    drive(plan, args)


def drive(plan: Plan, args: GpuCheckArgs) -> None:
    """Every part in turn: its row printed and appended to table.md as it ends."""
    check_output_dir(args.out, "--out")
    out, deadline = Path(args.out), time.monotonic() + args.minutes * 60
    os.environ.update(CHILD_ENV)  # before the fork server starts: it and every part inherit them
    FORKSERVER.set_forkserver_preload(["__main__"])
    header = table_header(plan)
    print(f"rows: {out / 'table.md'}; each part's whole output: {out}/<part>.log\n{header}", flush=True)
    append(out / "table.md", header)
    failed = []
    for part in parts(plan):
        print(f"-- {part.name} (limit {part.limit_s:.0f} s)", file=sys.stderr, flush=True)
        row = run_part(part, plan, out, deadline - time.monotonic())
        print(table_row(row), flush=True)
        append(out / "table.md", table_row(row))
        if row.result.startswith("FAILED") and not part.injected:
            failed.append(part.name)
    if failed:
        print(f"failed: {', '.join(failed)} (their logs are in {out})", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
