"""Matrix formats: what one quantized matrix looks like in a record, for one kind of kernel.

The store writes every expert in the form its target computes from (quant.ExpertCodec lays the
record out from a format's `shapes` and fills it with `pack`, once, when the store is built). Every
level then holds the same bytes: a move between levels is one contiguous copy, and computing is
`kernels.linear(x, format.weight(views))` on views of wherever the record lies. Formats:

- `INT4_CPU` (kernels/cpu.py): torch's int4 CPU kernel; codes as 4-bit nibbles in its tiles.
- `TRITON_HQQ` (kernels/triton_hqq.py): the Triton kernel's record form, codes packed along K and
  scales/zeros as stored (8-bit meta-quantized codes dequantized inside the kernel), no larger than
  hqq's own record. `CUDA_FORMAT` names the format CUDA uses: the one place to change it.
- `HQQ_STORED` (quant.py, hqq's own form): hqq's pieces (packed codes, meta-quantized scale/zero),
  dequantized by hqq on every use. The fallback where no fused kernel fits; the one format that
  converts per use (`converts_per_use`, counted in `Counters.converted_bytes`). The `MatrixFormat`
  contract lives in quant.py too, beside the codec that lays records out from it.

`choose_format(bits, group, shapes, device)` picks one for an expert's matrices. Unquantized
experts have no matrix format: their record is the dense matrices.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

from ..quant import HQQ_STORED, MatrixFormat
from .cpu import INT4_CPU
from .triton_hqq import TRITON_HQQ

CUDA_FORMAT: MatrixFormat = TRITON_HQQ  # the format CUDA stores are written in (one place)
FORMATS: dict[str, MatrixFormat] = {f.name: f for f in (INT4_CPU, TRITON_HQQ, HQQ_STORED)}


def fused_format(device: torch.device) -> MatrixFormat | None:
    """The fused-kernel format of a device type, or None (no kernel for it here)."""
    if device.type == "cpu":
        return INT4_CPU
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return CUDA_FORMAT
    return None


def choose_format(bits: int, group_size: int, shapes: list[tuple[int, int]], device: torch.device,
                  warn: bool = True) -> MatrixFormat:
    """The format `device` computes `bits`-bit matrices of these [N, K] shapes from: its fused kernel's
    where every shape fits it, else hqq's pieces dequantized per use (with a warning)."""
    fused = fused_format(torch.device(device))
    if fused is not None and all(fused.supports(bits, tuple(shape), group_size) for shape in shapes):
        return fused
    if warn:
        inputs = sorted({shape[1] for shape in shapes})
        warnings.warn(f"no fused kernel for {bits}-bit matrices with group size {group_size} and input sizes "
                      f"{inputs} on {torch.device(device).type} (CPU: groups of 32/64/128/256 dividing the input "
                      "size, output sizes a multiple of 64 or of 16 below 64; CUDA: the triton package, input sizes "
                      "a multiple of 8 and of the group size): they are dequantized by hqq on every use, which is slow",
                      stacklevel=3)
    return HQQ_STORED
