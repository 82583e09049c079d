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
from gptlab.io import peak_rss_mb

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tensor_core_peaks(half: float, tf32: float) -> dict[torch.dtype, float]:
    """Peak FLOP/s of a GPU whose bf16 and fp16 tensor cores run at the same rate."""
    return {torch.bfloat16: half, torch.float16: half, torch.float32: tf32}


# Dense peak FLOP/s by device-name fragment, most specific first (vendor datasheets, no
# sparsity; float32 means TF32 tensor cores, which training enables on CUDA). Used for MFU; a
# device missing here reports mfu: null rather than a guess.
#
# GeForce figures are NVIDIA's "FP16/BF16 tensor with FP32 accumulate" (the accumulation
# PyTorch's matmuls use), half the "FP16 accumulate" figure often quoted. On GeForce Ampere and
# Ada it is twice the shader FP32 rate at boost clock (cores x 2 x clock) and TF32 equals that
# rate; the cards not in NVIDIA's whitepapers (marked "derived") were computed so.
PEAK_FLOPS: list[tuple[str, dict[torch.dtype, float]]] = [
    # Hopper. torch names the SXM part "NVIDIA H100 80GB HBM3", so a bare "H100" is SXM.
    ("GH200", tensor_core_peaks(989e12, 494e12)),
    ("H200 NVL", tensor_core_peaks(835e12, 418e12)),
    ("H200", tensor_core_peaks(989e12, 494e12)),
    ("H100 NVL", tensor_core_peaks(835e12, 418e12)),
    ("H100 PCIe", tensor_core_peaks(756e12, 378e12)),
    ("H100", tensor_core_peaks(989e12, 494e12)),
    ("A100", tensor_core_peaks(312e12, 156e12)),
    ("L40S", tensor_core_peaks(362e12, 183e12)),
    ("L40", tensor_core_peaks(181e12, 90.5e12)),
    ("L4", tensor_core_peaks(121e12, 60e12)),
    ("A10", tensor_core_peaks(125e12, 62.5e12)),
    # GeForce RTX 40 (Ada); 4090 and 4080 from the Ada whitepaper.
    ("RTX 4090", tensor_core_peaks(165e12, 82.6e12)),
    ("RTX 4080 SUPER", tensor_core_peaks(104e12, 52.2e12)),  # derived
    ("RTX 4080", tensor_core_peaks(97.5e12, 48.7e12)),
    ("RTX 4070 Ti SUPER", tensor_core_peaks(88.2e12, 44.1e12)),  # derived
    ("RTX 4070 Ti", tensor_core_peaks(80.2e12, 40.1e12)),  # derived
    ("RTX 4070 SUPER", tensor_core_peaks(71.0e12, 35.5e12)),  # derived
    ("RTX 4070", tensor_core_peaks(58.3e12, 29.1e12)),  # derived
    ("RTX 4060 Ti", tensor_core_peaks(44.1e12, 22.1e12)),  # derived
    ("RTX 4060", tensor_core_peaks(30.2e12, 15.1e12)),  # derived
    # GeForce RTX 30 (Ampere); 3090, 3080 (10 GB) and 3070 from the GA102 whitepaper.
    ("RTX 3090 Ti", tensor_core_peaks(80e12, 40e12)),  # derived
    ("RTX 3090", tensor_core_peaks(71e12, 35.6e12)),
    ("RTX 3080 Ti", tensor_core_peaks(68.2e12, 34.1e12)),  # derived
    ("RTX 3080", tensor_core_peaks(59.5e12, 29.8e12)),
    ("RTX 3070 Ti", tensor_core_peaks(43.5e12, 21.7e12)),  # derived
    ("RTX 3070", tensor_core_peaks(40.6e12, 20.3e12)),
    ("RTX 3060 Ti", tensor_core_peaks(32.4e12, 16.2e12)),  # derived
    ("RTX 3060", tensor_core_peaks(25.5e12, 12.7e12)),  # derived
    # No bf16 before Ampere.
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
        if dtype == torch.bfloat16 and device.type in ("cuda", "mps") and not has_bf16(device):
            raise GptlabError(f"{param}: this {device.type} device has no bfloat16; use float16 "
                              f"or auto")
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if has_bf16(device) else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def has_bf16(device: torch.device) -> bool:
    """Whether a GPU computes in bf16 natively: torch counts emulated bf16 too by default (a V100
    or T4 runs it, slowly, where fp16 tensor cores would be fast)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "mps":
        return torch.backends.mps.is_macos_or_newer(14, 0)  # Metal has bf16 from macOS 14
    return cpu_has_native_bf16()


def allow_tf32(device: torch.device) -> None:
    """Let float32 matmuls use TF32 tensor cores on CUDA: ten bits of mantissa are plenty for
    training, and several times faster."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


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
    if "Laptop" in name:
        # Laptop parts share the desktop names ("RTX 4090 Laptop GPU") but not their chips or
        # clocks: an MFU of null is better than one against a desktop card's peak.
        return None
    for fragment, _ in PEAK_FLOPS:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(fragment)}(?![A-Za-z0-9])", name):
            return fragment
    return None


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels: a clock read before this times the launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def reset_peak_memory(device: torch.device) -> None:
    """Start the device's peak-memory count afresh, so a run reports its own peak."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this run: allocated on the GPU, or the process's resident size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()
