"""The one place that picks the device, the training dtype, and what the device can do at peak.

`auto` means the fastest choice that trains as well as float32: cuda > mps > cpu, and bf16
autocast wherever the hardware computes in bf16 natively (on CPUs, AVX512-BF16 or AMX).
"""

from __future__ import annotations

import contextlib
import platform
import re
from collections.abc import Callable
from pathlib import Path

import torch

from gptlab.errors import GptlabError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Dense peak FLOP/s by device-name fragment, most specific first (vendor datasheets, no
# sparsity; float32 means TF32 tensor cores, which training enables on CUDA). Used for MFU; a
# device missing here reports mfu: null rather than a guess.
PEAK_FLOPS: list[tuple[str, dict[torch.dtype, float]]] = [
    ("H200", {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 494e12}),
    ("H100 PCIe", {torch.bfloat16: 756e12, torch.float16: 756e12, torch.float32: 378e12}),
    ("H100", {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 494e12}),
    ("A100", {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 156e12}),
    ("L40S", {torch.bfloat16: 362e12, torch.float16: 362e12, torch.float32: 183e12}),
    ("L40", {torch.bfloat16: 181e12, torch.float16: 181e12, torch.float32: 90.5e12}),
    ("L4", {torch.bfloat16: 121e12, torch.float16: 121e12, torch.float32: 60e12}),
    ("A10", {torch.bfloat16: 125e12, torch.float16: 125e12, torch.float32: 62.5e12}),
    ("RTX 4090", {torch.bfloat16: 165e12, torch.float16: 165e12, torch.float32: 82.6e12}),
    ("RTX 3090", {torch.bfloat16: 71e12, torch.float16: 71e12, torch.float32: 35.6e12}),
    ("V100", {torch.float16: 125e12, torch.float32: 15.7e12}),
    ("T4", {torch.float16: 65e12, torch.float32: 8.1e12}),
]


def pick_device(name: str, param: str) -> torch.device:
    """The device named by params key `param`; `auto` prefers cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}
    if not available[name]:
        raise GptlabError(f"{param}: {name} was asked for but this PyTorch "
                          f"({torch.__version__}) cannot use it here; use auto instead")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device, param: str) -> torch.dtype:
    """The compute dtype named by params key `param`; `auto` is bf16 where the hardware has it,
    else fp32."""
    if name != "auto":
        dtype = DTYPES[name]
        if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise GptlabError(f"{param}: this GPU has no bfloat16; use float16 or auto")
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (emulated bf16 is slower than fp32)."""
    probes: list[Callable[[], bool]] = [
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False),
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False),
    ]
    return any(probe() for probe in probes)


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; a no-op in float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return cpu_model_name()


def cpu_model_name() -> str:
    """The CPU's marketing name where the OS tells it (platform.processor() is often empty)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of this device in this dtype, if it is in the table."""
    if device.type != "cuda":
        return None
    fragment = peak_entry(torch.cuda.get_device_name(device))
    return dict(PEAK_FLOPS)[fragment].get(dtype) if fragment else None


def peak_entry(name: str) -> str | None:
    """The PEAK_FLOPS entry for a device name, matching whole words ("L4" is not "L40")."""
    for fragment, _ in PEAK_FLOPS:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(fragment)}(?![A-Za-z0-9])", name):
            return fragment
    return None


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this run: allocated on the GPU, or the process's resident size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    # ru_maxrss is in kilobytes on Linux and bytes on macOS.
    scale = 2**20 if platform.system() == "Darwin" else 2**10
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
