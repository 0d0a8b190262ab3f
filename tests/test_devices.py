"""Each CLI's device selection against a stand-in for the CUDA API on a CPU machine.

The stand-in holds to torch 2.13's contracts: `torch.cuda.set_device` takes what torch's own
`torch.cuda._utils._get_device_index` takes (an int, or a CUDA device with an index: a bare `cuda` raises
ValueError) and an index below the device count (else CUDA's "invalid device ordinal"). A valid call ends the
command there (`DeviceChosen`), so each test runs exactly the CLI's path up to its choice of GPU."""

import dataclasses
import inspect
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
from conftest import corpus_slice

import bench
import config
import evaluate
import finetune
import generate
import gpu_check
import playground
from gpt import GPTConfig
from gptlab import runtime
from gptlab.errors import UsageError


class DeviceChosen(Exception):
    def __init__(self, index: int) -> None:
        super().__init__(f"set_device({index})")
        self.index = index


class FakeCuda:
    """torch.cuda's device calls on a machine with `count` GPUs. stop: end the command at its choice."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.stop = True
        self.current = 0

    def set_device(self, device: object) -> None:
        index = torch.cuda._utils._get_device_index(device)  # torch's own argument check
        if index < 0:  # torch: a no-op
            return
        if index >= self.count:
            raise RuntimeError("CUDA error: invalid device ordinal")
        if self.stop:
            raise DeviceChosen(index)
        self.current = index


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    fake = FakeCuda(2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: fake.count)
    monkeypatch.setattr(torch.cuda, "set_device", fake.set_device)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return fake


def torchrun_env(monkeypatch: pytest.MonkeyPatch, local_rank: int) -> None:
    """What torchrun sets for the second process of a 2-process job on one machine."""
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))


def chosen_gpu(command, argv: list[str]) -> int:
    with pytest.raises(DeviceChosen) as chosen:
        command(argv)
    return chosen.value.index


def cli_commands(tmp_path) -> dict[str, tuple]:
    """CLI name -> (its main, its arguments up to --device)."""
    corpus = str(corpus_slice(tmp_path, 2000))
    return {
        "playground": (playground.main, [corpus, "--checkpoint", str(tmp_path / "run.tar")]),
        "generate": (generate.main, ["--checkpoint", str(tmp_path / "missing.tar"), "--prompt", "a"]),
        "evaluate": (evaluate.main, [corpus, "--checkpoint", str(tmp_path / "missing.tar")]),
        "finetune": (finetune.main, ["--checkpoint", str(tmp_path / "missing.tar"), "--train", corpus,
                                     "--val", corpus, "--out", str(tmp_path / "ft.tar"),
                                     "--predictions", str(tmp_path / "p.jsonl")]),
        "bench train": (bench.main, ["train"]),
        "bench attention": (bench.main, ["attention"]),
        "bench generate": (bench.main, ["generate"]),
    }


CLIS = ("playground", "generate", "evaluate", "finetune", "bench train", "bench attention", "bench generate")


@pytest.mark.parametrize("cli", CLIS)
@pytest.mark.parametrize(("device", "gpu"), [("cuda", 0), ("auto", 0), ("cuda:1", 1)])
def test_each_cli_selects_a_cuda_device_the_way_torch_accepts(two_gpus, tmp_path, cli, device, gpu):
    command, argv = cli_commands(tmp_path)[cli]
    assert chosen_gpu(command, [*argv, "--device", device]) == gpu


def test_each_gpu_check_part_runs_on_the_first_gpu(two_gpus):
    plan = gpu_check.full_plan()
    for part in gpu_check.parts(plan):
        assert chosen_gpu(lambda _, part=part: gpu_check.run_part_here(part, plan), []) == 0


@pytest.mark.parametrize("cli", ("playground", "generate", "bench train"))
def test_a_gpu_index_past_the_count_is_a_usage_error(two_gpus, tmp_path, cli):
    command, argv = cli_commands(tmp_path)[cli]
    with pytest.raises(UsageError, match="asked for GPU 2, but this machine has 2 CUDA GPU"):
        command([*argv, "--device", "cuda:2"])


def test_under_torchrun_each_rank_takes_the_gpu_of_its_local_rank(two_gpus, tmp_path, monkeypatch):
    torchrun_env(monkeypatch, local_rank=1)
    playground_main, argv = cli_commands(tmp_path)["playground"]
    assert chosen_gpu(playground_main, [*argv, "--device", "cuda"]) == 1
    assert chosen_gpu(playground_main, [*argv, "--device", "auto"]) == 1
    assert chosen_gpu(gpu_check.main, ["--ddp_worker", str(tmp_path / "ddp.json")]) == 1  # gpu_check's DDP rank
    with pytest.raises(UsageError, match="would put every rank on one GPU"):
        playground_main([*argv, "--device", "cuda:0"])


def test_the_picked_device_carries_its_index_and_is_made_current(two_gpus, monkeypatch):
    """DDP's device_ids and NCCL's device_id need the index; `cuda` alone would mean whatever is current."""
    two_gpus.stop = False
    assert runtime.pick_device("cuda") == torch.device("cuda", 0) and two_gpus.current == 0
    assert runtime.pick_device("cuda:1") == torch.device("cuda", 1) and two_gpus.current == 1
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert runtime.pick_device("auto") == torch.device("cuda", 1)


def test_a_local_rank_past_the_gpu_count_says_how_many_processes_fit(two_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(UsageError, match="LOCAL_RANK: start at most 2 processes per machine"):
        runtime.pick_device("cuda")


def test_no_gpu_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="torch sees no CUDA GPU"):
        runtime.pick_device("cuda")


def test_a_one_process_torchrun_run_destroys_its_process_group(monkeypatch):
    with socket.socket() as s:  # a free port for the group's store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    rt = runtime.setup_runtime("cpu", "float32")
    assert dist.is_initialized() and not rt.distributed
    runtime.teardown(rt)
    assert not dist.is_initialized()


def test_tf32_is_set_through_the_per_backend_api_without_a_warning():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            runtime.allow_tf32(torch.device("cuda", 0))
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    finally:
        matmul.fp32_precision, conv.fp32_precision = before


def test_the_device_setting_is_declared_once():
    """Every command that runs a model takes --device from runtime.device_setting: one default, one help."""
    for cls in (config.TrainConfig, bench.TrainBench, bench.AttentionBench, bench.GenerateBench,
                evaluate.EvaluateArgs, finetune.FinetuneConfig, generate.GenerateArgs):
        device = next(f for f in dataclasses.fields(cls) if f.name == "device")
        assert (device.default, device.metadata["help"]) == ("auto", runtime.DEVICE_HELP), cls.__name__


def test_the_dtype_setting_is_declared_once():
    """Every command that runs a model at a chosen precision takes --dtype from runtime.dtype_setting."""
    for cls in (config.TrainConfig, bench.TrainBench, evaluate.EvaluateArgs, finetune.FinetuneConfig,
                generate.GenerateArgs):
        dtype = next(f for f in dataclasses.fields(cls) if f.name == "dtype")
        assert (dtype.default, dtype.metadata["help"], dtype.metadata["choices"]) == (
            "auto", runtime.DTYPE_HELP, runtime.DTYPE_CHOICES), cls.__name__
        source = inspect.getsource(inspect.getmodule(cls))
        assert "DTYPE_HELP" not in source and "DTYPE_CHOICES" not in source, cls.__name__  # no copy to drift


def test_bench_takes_the_model_settings_from_gptconfig():
    """bench.py's model flags are GPTConfig's (help, choices, check), only their defaults its own, and the model
    it times is built from them."""
    model = {f.name: f for f in dataclasses.fields(GPTConfig)}
    for cls in (bench.TrainBench, bench.GenerateBench):
        shared = [f for f in dataclasses.fields(cls) if f.name in model]
        shape = {"embedding_dim", "num_of_layers", "num_of_heads", "block_size", "vocab_size"}
        assert shape <= {f.name for f in shared}
        for f in shared:
            for key in ("help", "choices", "rule"):
                assert f.metadata[key] == model[f.name].metadata[key], (cls.__name__, f.name, key)
    args = bench.TrainBench(embedding_dim=32, num_of_heads=2, attention="scratch")
    assert bench.model_config(args) == GPTConfig(vocab_size=65, block_size=64, embedding_dim=32, num_of_layers=4,
                                                 num_of_heads=2, attention="scratch", dropout=0.0)
