"""Tests of gptlab.device: device and dtype choice, autocast, the peak FLOP/s table and memory.

There is no GPU here, so CUDA and MPS are tested only for what a CPU machine can observe (the
errors when they are asked for); assertions that need the hardware are skipped without it.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
import torch
from helpers import PASSIVE_THREADS
from torch import nn

from gptlab.device import (
    DTYPES,
    PEAK_FLOPS,
    autocast,
    cpu_has_native_bf16,
    device_name,
    peak_entry,
    peak_flops,
    peak_memory_mb,
    pick_device,
    pick_dtype,
)
from gptlab.errors import GptlabError
from gptlab.params import TrainParams

CPU = torch.device("cpu")
HAS_CUDA = torch.cuda.is_available()
HAS_MPS = torch.backends.mps.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
PROC_STATUS = Path("/proc/self/status")
# The device names pick_device knows besides auto.
DEVICES = ("cpu", "cuda", "mps")


# --- pick_device -------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_CUDA or HAS_MPS, reason="auto picks the accelerator when there is one")
def test_auto_device_is_cpu_without_an_accelerator():
    assert pick_device("auto", "train.device") == CPU


@needs_cuda
def test_auto_device_prefers_cuda():
    assert pick_device("auto", "train.device").type == "cuda"


def test_cpu_device_is_always_available():
    device = pick_device("cpu", "train.device")
    assert isinstance(device, torch.device)
    assert device == CPU


@pytest.mark.parametrize("name", [
    pytest.param("cuda", marks=pytest.mark.skipif(HAS_CUDA, reason="CUDA is available")),
    pytest.param("mps", marks=pytest.mark.skipif(HAS_MPS, reason="MPS is available")),
])
def test_unavailable_device_names_the_parameter(name):
    # A one-line error pointing at the params key, not a crash at the first .to(device).
    with pytest.raises(GptlabError, match=rf"^train\.device: {name} .*use auto instead"):
        pick_device(name, "train.device")


# --- pick_dtype --------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "dtype"), [
    ("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16),
])
def test_explicit_dtype_names_map_to_torch_dtypes(name, dtype):
    assert pick_dtype(name, CPU, "train.dtype") is dtype


@pytest.mark.parametrize(("param", "table"), [("dtype", DTYPES), ("device", DEVICES)])
def test_every_value_params_accept_is_handled(param, table):
    # train.dtype / train.device values the params loader lets through, besides auto: one
    # missing here would pass validation and then crash with a KeyError.
    accepted = set(get_args(TrainParams.model_fields[param].annotation)) - {"auto"}
    assert accepted == set(table)


def test_auto_dtype_on_cpu_is_bf16_exactly_when_the_cpu_has_it():
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert pick_dtype("auto", CPU, "train.dtype") is expected


def test_auto_dtype_on_mps_is_float32():
    # Decided from the device type alone, so it needs no Apple GPU to check.
    assert pick_dtype("auto", torch.device("mps"), "train.dtype") is torch.float32


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/cpuinfo")
def test_cpu_bf16_probe_agrees_with_the_kernel_cpu_flags():
    flags = set(Path("/proc/cpuinfo").read_text().split())
    hardware_bf16 = bool(flags & {"avx512_bf16", "amx_tile"})
    assert cpu_has_native_bf16() is hardware_bf16


@needs_cuda
def test_auto_dtype_on_cuda_is_half_precision():
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    expected = torch.bfloat16 if native else torch.float16
    assert pick_dtype("auto", torch.device("cuda"), "train.dtype") is expected


@pytest.mark.parametrize(("native", "auto"), [(True, torch.bfloat16), (False, torch.float16)])
def test_a_gpu_that_only_emulates_bf16_trains_in_fp16(monkeypatch, native, auto):
    """torch counts emulated bf16 (a V100, a T4) unless asked not to: emulation is slow, and
    fp16 with a gradient scaler runs on those GPUs' tensor cores."""
    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return native or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    cuda = torch.device("cuda")
    assert pick_dtype("auto", cuda, "train.dtype") is auto
    if native:
        assert pick_dtype("bfloat16", cuda, "train.dtype") is torch.bfloat16
    else:
        with pytest.raises(GptlabError, match=r"train\.dtype: this cuda device has no bfloat16"):
            pick_dtype("bfloat16", cuda, "train.dtype")


@pytest.mark.parametrize("sonoma", [True, False])
def test_bf16_on_mps_needs_a_macos_that_has_it(monkeypatch, sonoma):
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer",
                        lambda major, minor: sonoma and (major, minor) <= (14, 0))
    mps = torch.device("mps")
    assert pick_dtype("auto", mps, "train.dtype") is torch.float32
    if sonoma:
        assert pick_dtype("bfloat16", mps, "train.dtype") is torch.bfloat16
    else:
        with pytest.raises(GptlabError, match=r"train\.dtype: this mps device has no bfloat16"):
            pick_dtype("bfloat16", mps, "train.dtype")


# --- autocast ----------------------------------------------------------------------------------


def linear_output_dtype() -> torch.dtype:
    layer = nn.Linear(8, 4)
    return layer(torch.randn(2, 8)).dtype


def test_float32_autocast_is_a_null_context():
    context = autocast(CPU, torch.float32)
    assert isinstance(context, contextlib.nullcontext)
    with context:
        assert not torch.is_autocast_enabled("cpu")
        assert linear_output_dtype() is torch.float32


def test_bf16_autocast_on_cpu_computes_linear_layers_in_bf16():
    assert not torch.is_autocast_enabled("cpu")
    with autocast(CPU, torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") is torch.bfloat16
        assert linear_output_dtype() is torch.bfloat16
    # Scoped: the forward pass only, never left on for the optimizer step.
    assert not torch.is_autocast_enabled("cpu")
    assert linear_output_dtype() is torch.float32


@needs_cuda
def test_bf16_autocast_on_cuda_targets_cuda():
    with autocast(torch.device("cuda"), torch.bfloat16):
        assert torch.is_autocast_enabled("cuda")
        assert not torch.is_autocast_enabled("cpu")


# --- device_name and peak_flops ----------------------------------------------------------------


def test_cpu_device_name_is_a_non_empty_string():
    name = device_name(CPU)
    assert isinstance(name, str)
    assert name.strip()


def test_mps_device_name_needs_no_apple_gpu():
    assert device_name(torch.device("mps")) == "Apple MPS"


@pytest.mark.parametrize("device", [CPU, torch.device("mps")], ids=["cpu", "mps"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_peak_flops_is_unknown_off_cuda(device, dtype):
    # MFU is then reported as null rather than against a made-up peak.
    assert peak_flops(device, dtype) is None




def test_peak_flops_table_has_positive_half_precision_figures():
    for fragment, peaks in PEAK_FLOPS:
        assert fragment.strip() == fragment and fragment, fragment
        half = [peaks[dtype] for dtype in (torch.bfloat16, torch.float16) if dtype in peaks]
        assert half, f"{fragment}: no bf16 or fp16 peak"
        assert all(value > 0 for value in peaks.values()), fragment
        assert set(peaks) <= {torch.float32, torch.bfloat16, torch.float16}, fragment
        # Tensor-core fp32 (TF32) never outruns half precision: a swapped entry would fail.
        if torch.float32 in peaks:
            assert peaks[torch.float32] <= max(half), fragment


def test_peak_flops_fragments_are_unique():
    fragments = [fragment for fragment, _ in PEAK_FLOPS]
    assert len(fragments) == len(set(fragments))


def test_more_specific_fragments_come_first():
    # Lookup takes the first fragment found in the device name, so a fragment listed after a
    # shorter one it contains ("H100 PCIe" after "H100") could never be chosen.
    fragments = [fragment for fragment, _ in PEAK_FLOPS]
    for i, earlier in enumerate(fragments):
        for later in fragments[i + 1:]:
            assert earlier not in later, f"{later!r} is shadowed by the earlier {earlier!r}"
    # Equivalently: every entry is the one chosen for a device named by it.
    for fragment in fragments:
        assert peak_entry(f"NVIDIA {fragment}") == fragment


@pytest.mark.parametrize(("name", "fragment"), [
    ("NVIDIA H100 80GB HBM3", "H100"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H200", "H200"),
    ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA L4", "L4"),
    ("NVIDIA A10", "A10"),
    ("NVIDIA GeForce RTX 4090", "RTX 4090"),
    ("NVIDIA GeForce RTX 3090", "RTX 3090"),
    ("Tesla V100-SXM2-16GB", "V100"),
    ("Tesla T4", "T4"),
    ("NVIDIA GeForce GTX 1080 Ti", None),
    ("NVIDIA L40", "L40"),
    ("NVIDIA RTX A1000", None),  # not an A100
    ("NVIDIA T400", None),  # not a T4
])
def test_real_device_names_find_their_entry(name, fragment):
    # Names as torch.cuda.get_device_name reports them.
    assert peak_entry(name) == fragment


@pytest.mark.parametrize(("name", "fragment"), [
    # Hopper variants: the bare "H100" of the SXM part must not swallow NVL or PCIe.
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200 NVL", "H200 NVL"),
    ("NVIDIA GH200 480GB", "GH200"),
    ("NVIDIA H800", None),
    ("NVIDIA H20", None),
    # GeForce RTX 40: a Ti or SUPER is another card than the plain one.
    ("NVIDIA GeForce RTX 4080 SUPER", "RTX 4080 SUPER"),
    ("NVIDIA GeForce RTX 4080", "RTX 4080"),
    ("NVIDIA GeForce RTX 4070 Ti SUPER", "RTX 4070 Ti SUPER"),
    ("NVIDIA GeForce RTX 4070 Ti", "RTX 4070 Ti"),
    ("NVIDIA GeForce RTX 4070 SUPER", "RTX 4070 SUPER"),
    ("NVIDIA GeForce RTX 4070", "RTX 4070"),
    ("NVIDIA GeForce RTX 4060 Ti", "RTX 4060 Ti"),
    ("NVIDIA GeForce RTX 4060", "RTX 4060"),
    # GeForce RTX 30.
    ("NVIDIA GeForce RTX 3090 Ti", "RTX 3090 Ti"),
    ("NVIDIA GeForce RTX 3080 Ti", "RTX 3080 Ti"),
    ("NVIDIA GeForce RTX 3080", "RTX 3080"),
    ("NVIDIA GeForce RTX 3070 Ti", "RTX 3070 Ti"),
    ("NVIDIA GeForce RTX 3070", "RTX 3070"),
    ("NVIDIA GeForce RTX 3060 Ti", "RTX 3060 Ti"),
    ("NVIDIA GeForce RTX 3060", "RTX 3060"),
    ("NVIDIA GeForce RTX 3050", None),
    # Laptop chips carry desktop names but not desktop clocks.
    ("NVIDIA GeForce RTX 4090 Laptop GPU", None),
    ("NVIDIA GeForce RTX 3080 Ti Laptop GPU", None),
])
def test_more_device_names_find_their_entry(name, fragment):
    assert peak_entry(name) == fragment


@pytest.mark.parametrize(("name", "bf16_tflops"), [
    ("NVIDIA H100 80GB HBM3", 989),  # how torch names the SXM part
    ("NVIDIA H100 NVL", 835),
    ("NVIDIA H100 PCIe", 756),
    ("NVIDIA H200", 989),
])
def test_h100_variants_get_their_own_peak(name, bf16_tflops):
    assert dict(PEAK_FLOPS)[peak_entry(name)][torch.bfloat16] == bf16_tflops * 1e12


def test_geforce_tf32_peak_is_half_the_bf16_peak():
    # On GeForce Ampere and Ada, bf16 with fp32 accumulation runs at twice the TF32 rate; a
    # typo in either figure breaks the ratio.
    for fragment, peaks in PEAK_FLOPS:
        if fragment.startswith("RTX "):
            assert peaks[torch.float32] == pytest.approx(peaks[torch.bfloat16] / 2, rel=0.01), \
                fragment


def test_l40_does_not_borrow_the_l4_peak():
    # Unknown (MFU null) would be acceptable; another GPU's figure is not.
    assert peak_entry("NVIDIA L40") in (None, "L40")


@needs_cuda
def test_peak_flops_on_this_gpu_follows_the_table():
    device = torch.device("cuda")
    fragment = peak_entry(torch.cuda.get_device_name(device))
    expected = dict(PEAK_FLOPS)[fragment].get(torch.bfloat16) if fragment else None
    assert peak_flops(device, torch.bfloat16) == expected


# --- peak_memory_mb ----------------------------------------------------------------------------


def proc_status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (reported in kB), in MiB."""
    for line in PROC_STATUS.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"{field} not in {PROC_STATUS}")


@pytest.mark.skipif(not PROC_STATUS.exists(), reason="needs Linux /proc")
def test_cpu_peak_memory_is_the_resident_high_water_mark_in_mib():
    peak = peak_memory_mb(CPU)
    assert isinstance(peak, float)
    assert peak > 0
    # Same figure as the kernel's own high-water mark: catches a kB/bytes/MiB mix-up.
    assert peak == pytest.approx(proc_status_mb("VmHWM"), rel=0.05)


# In a process of its own: in the test session the peak depends on what earlier tests
# allocated, and pages the kernel reclaims meanwhile can keep a new block under it.
PEAK_GROWTH = """
import numpy as np, torch
from gptlab.device import peak_memory_mb
before = peak_memory_mb(torch.device("cpu"))
block = np.ones(200 * 2**20, dtype=np.uint8)  # np.ones writes every page
print(peak_memory_mb(torch.device("cpu")) - before, int(block[-1]))
"""


@pytest.mark.skipif(not PROC_STATUS.exists(), reason="needs Linux /proc")
def test_cpu_peak_memory_grows_when_the_process_uses_more():
    result = subprocess.run([sys.executable, "-c", PEAK_GROWTH], capture_output=True,
                            text=True, env={**os.environ, **PASSIVE_THREADS}, check=True)
    growth, last = result.stdout.split()
    assert int(last) == 1 and float(growth) >= 150


