"""runtime.py and the GPU bookkeeping that a CPU can check: the requirements' torch floor, native-bf16 choice,
the GPU peak table by exact name and precision, checkpoints that carry the RNG and loss-scaler states, and a KV
cache allocated in the autocast dtype."""

import re
from pathlib import Path

import pytest
import torch

from gpt import GPT, GPTConfig
from gptlab import runtime

REPO = Path(__file__).resolve().parent.parent


def test_the_requirements_floor_has_what_the_code_imports():
    """--fsdp imports fully_shard and MixedPrecisionPolicy from torch.distributed.fsdp, public from torch 2.6."""
    floor = re.search(r"^torch>=([\d.]+)", (REPO / "requirements.txt").read_text(), re.M).group(1)
    assert tuple(int(x) for x in floor.split(".")) >= (2, 6)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: F401


@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((7, 0), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_dtype_is_bf16_only_where_the_gpu_has_it_natively(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert runtime.pick_dtype("auto", torch.device("cuda")) == expected
    assert runtime.pick_dtype("auto", torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("name, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12), ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
    ("NVIDIA H100 NVL", torch.bfloat16, 835e12), ("NVIDIA L40", torch.bfloat16, 181e12),
    ("NVIDIA L4", torch.bfloat16, 121e12), ("NVIDIA L40S", torch.bfloat16, 362e12),
    ("NVIDIA H100 80GB HBM3", torch.float32, 494e12), ("Tesla T4", torch.float16, 65e12),
    ("Some Unknown GPU", torch.bfloat16, None),
])
def test_peak_flops_by_exact_name_and_precision(monkeypatch, name, dtype, peak):
    """No substring matches ("L4" is not "L40"; a PCIe H100 is not an SXM one), and a float32 run is measured
    against the float32 (TF32) peak, not the bf16 one."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert runtime.peak_flops(torch.device("cuda"), dtype) == peak
    assert runtime.peak_flops(torch.device("cpu"), dtype) is None


def test_the_kv_cache_is_allocated_in_the_autocast_dtype():
    model = GPT(GPTConfig(vocab_size=50, block_size=16, embedding_dim=32, num_of_layers=1, num_of_heads=2,
                          dropout=0.0)).eval()
    assert model.compute_dtype(torch.device("cpu")) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.compute_dtype(torch.device("cpu")) == torch.bfloat16
        tokens = model.generate(torch.zeros(1, 1, dtype=torch.long), 5, temperature=0)
    assert tokens.shape == (1, 6)
