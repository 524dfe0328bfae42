"""Matrix formats: what one quantized matrix looks like in a record, for one kind of kernel.

The store writes every expert in the form its target computes from (quant.ExpertCodec lays the
record out from a format's `shapes` and fills it with `pack`, once, when the store is built). Every
level then holds the same bytes: a move between levels is one contiguous copy, and computing is
`kernels.linear(x, format.weight(views))` on views of wherever the record lies. Formats:

- `INT4_CPU` (kernels/cpu.py): torch's int4 CPU kernel; codes as 4-bit nibbles in its tiles.
- `TRITON_PACKED` (kernels/triton_hqq.py's kernel): codes packed along K, scale and zero in the
  compute dtype (larger than hqq's record where scales are meta-quantized; TRITON_HQQ replaces it). `CUDA_FORMAT` names the format CUDA uses: the one place to change it.
- `HQQ_STORED`: hqq's own pieces (packed codes, meta-quantized scale/zero), dequantized by hqq on
  every use. The fallback where no fused kernel fits; the one format that converts per use
  (`converts_per_use`, counted in `Counters.converted_bytes`).

`choose_format(bits, group, shapes, device)` picks one for an expert's matrices. Unquantized
experts have no matrix format: their record is the dense matrices.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from ..quant import dequantize_matrix
from .cpu import INT4_CPU
from .triton_hqq import HqqTritonWeight, triton_pack, triton_shapes, triton_supports


class MatrixFormat(Protocol):
    """One quantized [N, K] matrix (HQQ axis-1 groups) in a record, for one kind of kernel.

    shapes(info, dtype): named pieces -> (shape, dtype); pack(tensors, info, dtype): quant.quantize_matrix's
    (tensors, info) -> those pieces, exactly (codes bit-exact), at store build time only; weight(views, info):
    what kernels.linear computes with, from views of the record (no copy, no conversion); reference(views,
    info, dtype) -> the dense [N, K] matrix in plain PyTorch (tests: equals hqq's dequantize)."""

    name: str
    converts_per_use: bool

    def supports(self, bits: int, shape: tuple[int, int], group_size: int) -> bool: ...

    def shapes(self, info: dict, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]: ...

    def pack(self, tensors: dict[str, torch.Tensor], info: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]: ...

    def weight(self, views: dict[str, torch.Tensor], info: dict): ...

    def reference(self, views: dict[str, torch.Tensor], info: dict, dtype: torch.dtype) -> torch.Tensor: ...


@dataclass(frozen=True)
class HqqDequantWeight:
    """hqq's pieces of one matrix, dequantized by hqq on each use (the fallback: slow, converts per use)."""

    pieces: dict
    info: dict
    dtype: torch.dtype

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize_matrix(self.pieces, self.info, self.dtype).reshape(tuple(self.info["shape"]))
        return F.linear(x.to(self.dtype), weight).to(x.dtype)


class HqqStoredFormat:
    name = "hqq"
    converts_per_use = True

    def supports(self, bits: int, shape: tuple[int, int], group_size: int) -> bool:
        return bits in (2, 3, 4, 8) and (shape[0] * shape[1]) % group_size == 0

    def shapes(self, info: dict, dtype: torch.dtype) -> dict:
        return {name: (tuple(shape), piece_dtype) for name, (shape, piece_dtype) in info["pieces"].items()}

    def pack(self, tensors: dict[str, torch.Tensor], info: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return tensors

    def weight(self, views: dict[str, torch.Tensor], info: dict) -> HqqDequantWeight:
        return HqqDequantWeight(views, info, info["dtype"])

    def reference(self, views: dict[str, torch.Tensor], info: dict, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_matrix(views, info, dtype).reshape(tuple(info["shape"]))


class TritonPackedFormat:
    """The Triton kernel's layout: codes packed along K (3-bit as 4-bit), scale and zero [N, K/G] in
    the compute dtype (fp16; bf16 where the model computes in bf16)."""

    name = "triton"
    converts_per_use = False

    def supports(self, bits: int, shape: tuple[int, int], group_size: int) -> bool:
        return triton_supports(bits, shape, group_size)

    @staticmethod
    def _dtype(dtype: torch.dtype) -> torch.dtype:
        return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float16

    def shapes(self, info: dict, dtype: torch.dtype) -> dict:
        return triton_shapes(info["nbits"], tuple(info["shape"]), info["group_size"], self._dtype(dtype))

    def pack(self, tensors: dict[str, torch.Tensor], info: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        from ..quant import hqq_codes

        return triton_pack(*hqq_codes(tensors, info), info["nbits"], self._dtype(dtype))

    def weight(self, views: dict[str, torch.Tensor], info: dict) -> HqqTritonWeight:
        return HqqTritonWeight(views["codes"], views["scale"], views["zero"], info["nbits"], info["group_size"])

    def reference(self, views: dict[str, torch.Tensor], info: dict, dtype: torch.dtype) -> torch.Tensor:
        n, k = tuple(info["shape"])
        width = 4 if info["nbits"] == 3 else info["nbits"]
        per = 8 // width
        shifts = torch.arange(per, device=views["codes"].device, dtype=torch.int32) * width
        codes = (views["codes"].to(torch.int32)[..., None] >> shifts) & ((1 << width) - 1)  # [N, K/PER, PER]
        codes = codes.reshape(n, k // info["group_size"], info["group_size"]).float()
        w = (codes - views["zero"].float()[..., None]) * views["scale"].float()[..., None]
        return w.reshape(n, k).to(dtype)


HQQ_STORED = HqqStoredFormat()
TRITON_PACKED = TritonPackedFormat()
CUDA_FORMAT: MatrixFormat = TRITON_PACKED  # the format CUDA stores are written in (one place)
FORMATS: dict[str, MatrixFormat] = {f.name: f for f in (INT4_CPU, TRITON_PACKED, HQQ_STORED)}


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
                      "divisible by 64 and by the group): they are dequantized by hqq on every use, which is slow",
                      stacklevel=3)
    return HQQ_STORED
