"""Which dtype and which kernel a device computes with, decided in ONE place from its capability.

`choose_compute(device, dtype)` is that place; everything else asks it (loading.resolve_dtype, the
Triton kernel's launch, the benches). The rule, per device:

| device                        | "auto"   | "half"   | bfloat16 asked for          | kernel       |
| ----------------------------- | -------- | -------- | --------------------------- | ------------ |
| CPU                           | float32  | bfloat16 | allowed                     | "int4-cpu"   |
| CUDA, compute capability ≥ 8.0 | float16  | bfloat16 | allowed                     | "triton-hqq" |
| CUDA, compute capability < 8.0 | float16  | float16  | **ValueError** (see below)  | "triton-hqq" |

bf16 on a GPU below 8.0 (Turing's T4, Volta) is *refused*, not mapped: those GPUs have no bf16
tensor-core instructions (bf16 matmuls there are emulated, and Triton's `tl.dot` has no sm_75 path
for them), while `torch.cuda.is_bf16_supported()` still says True. A silent mapping to fp16 would
change a user's numerics behind their back; the error names the GPU, its capability and the
dtypes that are allowed, so the fix is one word. "auto" (the default) never asks for bf16 on CUDA.

"half" is the device's fastest 16-bit dtype (what the benches run 16-bit experts in). The kernel is
the name of the matrix format family the device computes quantized experts with (kernels.forms);
None where no fused kernel runs (the triton package missing, or a GPU below Triton's minimum 7.0):
experts are then dequantized by hqq per use. Note that Triton ≥ 3.3 runs `tl.dot` below 8.0 on an
FMA fallback, not tensor cores (triton-lang/triton#5066): right, but slower than on Ampere+.

Tests pass a `DeviceInfo` instead of a device, so every row is tested without a GPU.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache, lru_cache

import torch

BF16_MIN_CAPABILITY = (8, 0)  # Ampere: bf16 tensor-core MMA
TRITON_MIN_CAPABILITY = (7, 0)  # Triton does not compile for GPUs below Volta
DTYPE_CHOICES = ("auto", "half", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class DeviceInfo:
    """What the choice depends on. capability (major, minor) and sm_count are None on CPU."""

    type: str
    name: str
    capability: tuple[int, int] | None = None
    sm_count: int | None = None

    def describe(self) -> str:
        if self.capability is None:
            return self.name
        return f"{self.name} (compute capability {self.capability[0]}.{self.capability[1]})"


@dataclass(frozen=True)
class ComputeChoice:
    dtype: torch.dtype  # activations, dense weights and the fused kernel's matmul inputs
    kernel: str | None  # "int4-cpu", "triton-hqq", or None: hqq dequantizes per use
    device: DeviceInfo


@cache
def _cuda_info(index: int) -> DeviceInfo:
    props = torch.cuda.get_device_properties(index)
    return DeviceInfo("cuda", props.name, (props.major, props.minor), props.multi_processor_count)


def device_info(device: torch.device | str) -> DeviceInfo:
    """The device's `DeviceInfo` (CUDA properties are read once per GPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_info(device.index if device.index is not None else torch.cuda.current_device())
    return DeviceInfo(device.type, device.type)


def choose_compute(device: torch.device | str | DeviceInfo, dtype: str | torch.dtype = "auto") -> ComputeChoice:
    """The compute dtype and kernel for `device` (or a `DeviceInfo`) given the dtype asked for: one of
    `DTYPE_CHOICES` or a torch dtype. Raises ValueError for a dtype the device cannot compute in."""
    info = device if isinstance(device, DeviceInfo) else device_info(device)
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_CHOICES:
        raise ValueError(f"dtype={name!r} is not allowed: use one of {', '.join(DTYPE_CHOICES)}")
    if info.type != "cuda":
        chosen = {"auto": torch.float32, "half": torch.bfloat16}.get(name) or getattr(torch, name)
        return ComputeChoice(chosen, "int4-cpu" if info.type == "cpu" else None, info)
    bf16 = info.capability >= BF16_MIN_CAPABILITY
    if name == "bfloat16" and not bf16:
        raise ValueError(
            f"dtype='bfloat16' is not allowed on {info.describe()}: bf16 needs compute capability "
            f"{BF16_MIN_CAPABILITY[0]}.{BF16_MIN_CAPABILITY[1]} or newer (Ampere); use one of 'auto' (float16), "
            "'float16', 'float32'")
    chosen = {"auto": torch.float16, "half": torch.bfloat16 if bf16 else torch.float16}.get(name) or getattr(torch, name)
    triton = info.capability >= TRITON_MIN_CAPABILITY and importlib.util.find_spec("triton") is not None
    return ComputeChoice(chosen, "triton-hqq" if triton else None, info)


@lru_cache(maxsize=64)
def check_kernel_dtype(device: torch.device, dtype: torch.dtype) -> None:
    """Raises choose_compute's ValueError when `device` cannot run the fused kernel in `dtype` (cached:
    the kernel's launch calls it)."""
    choose_compute(device, dtype)
