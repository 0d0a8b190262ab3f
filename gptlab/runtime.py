"""Where a process runs: the device, the precision, and (under torchrun) its place in the process group.

Decided once at start-up by `setup_runtime` and passed down; no other module looks at globals for it.
`teardown` ends a distributed run in the one order that is safe on every rank (see its docstring).
"""

import contextlib
import gc
import os
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from gptlab.cli import format_size, setting
from gptlab.errors import UsageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)  # the --dtype flag of every CLI that runs a model
DTYPE_HELP = "autocast precision; auto: bfloat16 on GPUs with native support, float16 on older GPUs, else float32"
DEVICE_HELP = "auto picks cuda, then mps, then cpu; or name one: cpu, cuda (this process's GPU), cuda:N, mps"


def device_setting(group: str = "options") -> Any:
    """The --device setting of every command that runs a model, declared once; pick_device reads its value."""
    return setting("auto", DEVICE_HELP, group=group)


def dtype_setting(group: str = "options") -> Any:
    """The --dtype setting of every command that runs a model, declared once; pick_dtype reads its value."""
    return setting("auto", DTYPE_HELP, choices=DTYPE_CHOICES, group=group)


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: decided once at start-up and passed down."""

    device: torch.device
    dtype: torch.dtype  # autocast precision (float32 = no autocast)
    rank: int = 0
    world_size: int = 1
    fsdp: bool = False  # the model is sharded across the ranks (FSDP2) rather than replicated (DDP)
    local_rank: int = 0  # the rank among this machine's processes
    in_group: bool = False  # started by torchrun: this process joined a process group (even one of 1 process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def prepares_data(self) -> bool:
        """Each machine's first process trains the tokenizer and builds the token cache in out_dir (so a
        multi-node job without a shared out_dir gets a copy per node); the others wait for its files."""
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def mode(self) -> str:
        if not self.distributed:
            return "single process"
        return "FSDP" if self.fsdp else "DDP"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def pick_device(name: str) -> torch.device:
    """auto: cuda, then mps, then cpu. A named device must exist on this machine. A CUDA device always comes
    back with its index, and is made the current one (or cuda:1 work would also open a context on GPU 0)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown --device {name!r}: {DEVICE_HELP}") from None
    if device.type == "cuda":
        return cuda_device(device.index, name)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name} asked for, but this torch build or machine has no MPS")
    if device.type not in ("cpu", "mps"):
        raise UsageError(f"--device {name}: only cpu, cuda and mps are supported")
    return device


def cuda_device(index: int | None, name: str) -> torch.device:
    """GPU `index`; without one, this process's GPU: LOCAL_RANK's under torchrun, else the first.
    torch.cuda.set_device takes only an index (a bare torch.device("cuda") raises ValueError)."""
    if not torch.cuda.is_available():
        raise UsageError(f"--device {name} asked for, but torch sees no CUDA GPU")
    by_rank = index is None and "LOCAL_RANK" in os.environ
    if index is None:
        index = int(os.environ.get("LOCAL_RANK", 0))
    count = torch.cuda.device_count()
    if index >= count:
        which = f"GPU {index} (LOCAL_RANK: start at most {count} processes per machine)" if by_rank else f"GPU {index}"
        raise UsageError(f"--device {name} asked for {which}, but this machine has {count} CUDA GPU(s)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def native_bf16(device: torch.device) -> bool:
    """bfloat16 in hardware: CUDA compute capability 8.0 (Ampere) or newer. torch.cuda.is_bf16_supported()
    also counts emulation (T4, V100), which is slower than float16 there."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on GPUs with native support, float16 (with a loss scaler) on older GPUs, else float32."""
    if name != "auto":
        return DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if native_bf16(device) else torch.float16


def allow_tf32(device: torch.device) -> None:
    """float32 matmuls and convolutions on a GPU's tensor cores (TF32) where float32 is asked for: nearly free
    accuracy-wise. New torch has a per-backend setting (the old global one mixed with it draws warnings)."""
    if device.type != "cuda":
        return
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:  # torch before 2.9
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# Dense peak FLOP/s of GPUs (vendor datasheets, no sparsity) by exact device name, per precision: the
# denominator of MFU. float32 runs use the TF32 tensor-core peak (what `allow_tf32` turns on).
GPU_PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": {"bf16": 989e12, "fp32": 494e12},  # SXM
    "NVIDIA H100 PCIe": {"bf16": 756e12, "fp32": 378e12},
    "NVIDIA H100 NVL": {"bf16": 835e12, "fp32": 418e12},
    "NVIDIA H200": {"bf16": 989e12, "fp32": 494e12},
    "NVIDIA A100-SXM4-80GB": {"bf16": 312e12, "fp32": 156e12},
    "NVIDIA A100-SXM4-40GB": {"bf16": 312e12, "fp32": 156e12},
    "NVIDIA A100-PCIE-40GB": {"bf16": 312e12, "fp32": 156e12},
    "NVIDIA A100 80GB PCIe": {"bf16": 312e12, "fp32": 156e12},
    "NVIDIA L40S": {"bf16": 362e12, "fp32": 183e12},
    "NVIDIA L40": {"bf16": 181e12, "fp32": 90.5e12},
    "NVIDIA L4": {"bf16": 121e12, "fp32": 60e12},
    "NVIDIA A10": {"bf16": 125e12, "fp32": 62.5e12},
    "NVIDIA GeForce RTX 4090": {"bf16": 165e12, "fp32": 82.6e12},
    "Tesla T4": {"fp16": 65e12, "fp32": 8.1e12},
    "Tesla V100-SXM2-16GB": {"fp16": 125e12, "fp32": 15.7e12},
}
_PRECISION = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """The device's peak FLOP/s at the precision in use, if it is a GPU in the table (by exact name); None
    otherwise (a CPU's peak is not guessed). A GPU whose bf16 and fp16 peaks are equal lists one of them."""
    if device.type != "cuda":
        return None
    peaks = GPU_PEAK_FLOPS.get(torch.cuda.get_device_name(device), {})
    precision = _PRECISION[dtype]
    if precision in ("bf16", "fp16"):
        return peaks.get(precision) or peaks.get("bf16") or peaks.get("fp16")
    return peaks.get(precision)


def local_runtime(device: str, dtype: str) -> Runtime:
    """One process on one device (generate, evaluate, finetune, or training without torchrun)."""
    picked = pick_device(device)
    allow_tf32(picked)
    return Runtime(picked, pick_dtype(dtype, picked))


def setup_runtime(device: str, dtype: str, fsdp: bool = False) -> Runtime:
    """Single process, or one rank of a torchrun job (RANK/WORLD_SIZE/LOCAL_RANK in the environment)."""
    if "RANK" not in os.environ:
        return local_runtime(device, dtype)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda:"):
        raise UsageError(f"--device {device} under torchrun would put every rank on one GPU: use --device cuda "
                         f"(each rank takes the GPU of its LOCAL_RANK)")
    picked = pick_device(device)  # cuda: the GPU of this rank's LOCAL_RANK
    allow_tf32(picked)
    dist.init_process_group(backend="nccl" if picked.type == "cuda" else "gloo",
                            device_id=picked if picked.type == "cuda" else None)
    return Runtime(picked, pick_dtype(dtype, picked), rank, world_size, fsdp=fsdp and world_size > 1,
                   local_rank=local_rank, in_group=True)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


# How long a rank that finished waits at the final barrier for the others: rank 0 may still be writing a
# large checkpoint or sampling from a large model on a CPU. After an error, the others may never come.
FINAL_BARRIER_TIMEOUT_S = 30 * 60.0
FAILED_BARRIER_TIMEOUT_S = 30.0


def final_barrier(rt: Runtime, timeout_s: float, key: str = "final_barrier") -> None:
    """Wait until every rank has reached this point, or raise TimeoutError after `timeout_s` seconds.

    It meets in the process group's key-value store rather than in a collective: a rank that stopped in the
    middle of the training loop may still have a collective of its own in flight, which a barrier collective
    would be matched against; a store key cannot be confused with anything, and a wait for it that times out
    leaves no half-done collective behind for `destroy_process_group` to wait on. Polling with short sleeps
    lets Ctrl-C through; the pause grows to 0.5 s so that many waiting ranks do not flood the store."""
    store = dist.distributed_c10d._get_default_store()  # the group's own store (torchrun's); no public name
    if store.add(f"{key}/arrived", 1) == rt.world_size:  # the last rank to arrive lets everyone go
        store.set(f"{key}/all_arrived", "1")
    deadline, pause = time.monotonic() + timeout_s, 0.005
    while not store.check([f"{key}/all_arrived"]):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rt.rank}: not every rank reached the end of the run within {timeout_s:.0f} s")
        time.sleep(pause)
        pause = min(2 * pause, 0.5)


def teardown(rt: Runtime, error: BaseException | None = None) -> None:
    """End this process's part in a distributed run, in the order that is safe on every rank and on every
    exit path (normal end: error=None; an exception or Ctrl-C: error is it). Call it in a `finally`.

    1. A final barrier. Rank 0 works alone at the end (the last checkpoint, the loss plot, the sample); a rank
       that destroyed its group and exited meanwhile sometimes aborted at exit on torch 2.14.1 (gloo, FSDP,
       a loaded CPU: `terminate called without an active exception`, SIGABRT), so a job that did all its
       work was reported failed. After an error the barrier waits briefly and is not required to succeed.
    2. Release what still refers to the group. An exception's traceback keeps the failed frames alive, and
       with them the sharded model and optimizer, whose DTensors hold the device mesh and its group; clearing
       those frames and collecting cycles frees them while the group still exists, not at interpreter exit.
    3. Destroy the group.
    """
    if not (rt.in_group and dist.is_initialized()):  # a 1-process torchrun run has a group to destroy too
        return
    try:
        final_barrier(rt, FAILED_BARRIER_TIMEOUT_S if error else FINAL_BARRIER_TIMEOUT_S)
    except (TimeoutError, RuntimeError):  # a timeout, or the store gone with a failed peer
        if error is None:  # this rank finished but another did not: the job failed, say so
            raise
    finally:
        if error is not None:
            traceback.clear_frames(error.__traceback__)
        gc.collect()
        dist.destroy_process_group()


def available_memory(device: torch.device) -> int | None:
    """Bytes the device can hold: a GPU's free memory, or the machine's RAM; None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(need: int, device: torch.device, what: str) -> None:
    """Refuse work that needs more than the device's memory (`need` bytes) before allocating any of it."""
    have = available_memory(device)
    if have is not None and need > have:
        raise UsageError(f"{what} needs about {format_size(need)}, but {device} has {format_size(have)}: use a "
                         f"smaller model or batch")


def seconds_since_start() -> float:
    """How long this process has existed (Linux: from /proc), so a time budget can include the imports;
    0 where it cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def agree_on(value: int, rt: Runtime) -> int:
    """Rank 0's value, on every rank."""
    if not rt.distributed:
        return value
    t = torch.tensor([value], device=rt.device if rt.device.type == "cuda" else "cpu")
    dist.broadcast(t, src=0)
    return int(t.item())


def mean_over_ranks(loss: torch.Tensor, rt: Runtime) -> float:
    """The mean of a scalar tensor over the ranks, on the host (a sync: call it where one is wanted)."""
    if rt.distributed:
        loss = loss.clone()
        dist.all_reduce(loss)
        loss /= rt.world_size
    return loss.item()


def gather_rng_states(rt: Runtime) -> dict[str, list[torch.Tensor]]:
    """Every rank's RNG states (dropout masks: the CPU generator, and the GPU's on CUDA), so a resumed run draws
    the same masks."""
    states = {"torch": torch.get_rng_state()}
    if rt.device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(rt.device)
    if not rt.distributed:
        return {name: [state] for name, state in states.items()}
    gathered: dict[str, list[torch.Tensor]] = {}
    for name, state in states.items():
        gathered[name] = [torch.empty_like(state) for _ in range(rt.world_size)]
        if rt.device.type == "cpu":
            dist.all_gather(gathered[name], state)
        else:
            dist.all_gather_object(gathered[name], state)
    return gathered


def restore_rng_states(saved: dict[str, list[torch.Tensor]], rt: Runtime) -> None:
    """This rank's RNG states from a checkpoint (one written by fewer ranks gives its states round-robin)."""
    torch.set_rng_state(saved["torch"][rt.rank % len(saved["torch"])])
    if rt.device.type == "cuda" and "cuda" in saved:
        torch.cuda.set_rng_state(saved["cuda"][rt.rank % len(saved["cuda"])], rt.device)
