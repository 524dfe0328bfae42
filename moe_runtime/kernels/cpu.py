"""CPU: HQQ experts through torch's packed int4 kernel (`aten._weight_int4pack_mm_for_cpu`).

The kernel computes y = x @ W.T with W[n, k] = (q[n, k] - 8) * scale[g, n] + bias[g, n], g = k // G,
q a 4-bit code, G in 32/64/128/256. HQQ's w = (c - zero) * scale is the same with q = c + 8 - mid
and bias = (mid - zero) * scale (mid = 2**(bits-1)), so 2-, 3- and 4-bit codes go in exactly (a
2-bit code is a 4-bit code). An 8-bit code c = 16 hi + lo is two 4-bit codes: W = (hi - 8) 16s + (lo - 8) s + (136 - zero) s,
i.e. one int4 matrix twice as wide ([hi | lo] along K) multiplied with [x | x]. Only the scales and
biases are rounded (to bf16, the dtype the kernel is fast in here); the codes are exact.

Dimensions: N output features, K input features, G group size, S splits of a code (1, or 2 for 8-bit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant import hqq_codes

INT4_GROUPS = (32, 64, 128, 256)
COMPUTE_DTYPE = torch.bfloat16  # measured: fp32/fp16 activations take the kernel's slow path (docs/results.md)


def int4_supports(bits: int, shape: tuple[int, int], group_size: int) -> bool:
    """Whether a [N, K] matrix quantized to `bits` with groups of `group_size` (axis 1) fits the kernel
    (and a layout `int4_codes` reads back: N a multiple of 64, or N < 64 a multiple of 16)."""
    n, k = shape
    rows_ok = n % 64 == 0 or (n < 64 and n % 16 == 0)
    return bits in (2, 3, 4, 8) and group_size in INT4_GROUPS and k % group_size == 0 and rows_ok


def int4_shapes(bits: int, shape: tuple[int, int], group_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of the packed pieces of one matrix (for a slot's byte layout)."""
    n, k = shape
    splits = 2 if bits == 8 else 1
    return {"packed": ((n, splits * k // 2), torch.uint8),
            "scale_bias": ((splits * k // group_size, n, 2), COMPUTE_DTYPE)}


def _pack_tiled(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] (0..15), N % 64 == 0 -> the kernel's layout: per block of 64 rows, for each k,
    32 bytes holding rows j (low nibble) and j + 32 (high nibble). Two passes over uint8, instead of
    the op's int32 input (4x the bytes) and its generic path."""
    n, k = codes.shape
    blocks = codes.reshape(n // 64, 2, 32, k)  # [N/64, half, 32, K]
    packed = blocks[:, 0] | (blocks[:, 1] << 4)  # [N/64, 32, K]
    return packed.transpose(1, 2).contiguous().reshape(n, k // 2)  # [N/64, K, 32] -> [N, K/2]


_TILED_MATCHES_OP: bool | None = None


def pack_int4_is_tiled() -> bool:
    """Whether `_pack_tiled` reproduces torch's converter byte for byte (checked once per process
    against the op, whose layout is torch's to change)."""
    global _TILED_MATCHES_OP
    if _TILED_MATCHES_OP is None:
        probe = torch.randint(0, 16, (128, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        op = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe.to(torch.int32), 1)
        _TILED_MATCHES_OP = op.dtype == torch.uint8 and torch.equal(op, _pack_tiled(probe))
    return _TILED_MATCHES_OP


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] -> what `_convert_weight_to_int4pack_for_cpu` returns for them: the tiled
    packer where it matches the op (`pack_int4_is_tiled`), otherwise the op itself."""
    if pack_int4_is_tiled() and codes.shape[0] % 64 == 0:
        return _pack_tiled(codes)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


def _pack_split_8bit(codes: torch.Tensor) -> torch.Tensor:
    """8-bit codes [N, K] -> pack_int4 of [hi | lo] ([N, 2K] nibble codes) without building that matrix:
    per block of 64 rows, row j's nibble pairs with row j + 32's in one byte."""
    n, k = codes.shape
    blocks = codes.reshape(n // 64, 2, 32, k)  # [N/64, half, 32, K]
    first, second = blocks[:, 0], blocks[:, 1]
    his = (first >> 4) | (second & 0xF0)  # [N/64, 32, K]: the hi nibbles of rows j (low) and j + 32 (high)
    los = (first & 0x0F) | (second << 4)  # the lo nibbles, likewise
    packed = torch.cat([his, los], dim=2)  # [N/64, 32, 2K]
    return packed.transpose(1, 2).contiguous().reshape(n, k)  # [N/64, 2K, 32] -> [N, 2K/2]


def int4_pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
              group_size: int) -> dict[str, torch.Tensor]:
    """HQQ pieces (codes uint8 [N, K], scale, zero fp32 [N, K/G]) -> the kernel's pieces."""
    if bits == 8:
        if pack_int4_is_tiled() and codes.shape[0] % 64 == 0:
            packed = _pack_split_8bit(codes)
        else:
            packed = pack_int4(torch.cat([codes >> 4, codes & 15], dim=1))  # [N, 2K]: hi | lo
        scale_hi, bias_hi = 16 * scale, (136 - zero) * scale
        scale = torch.cat([scale_hi, scale], dim=1)  # [N, 2K/G]
        bias = torch.cat([bias_hi, torch.zeros_like(zero)], dim=1)
    else:
        # centre the codes on the kernel's 8 (c + 6 for 2-bit, c + 4 for 3-bit): the bias, rounded to
        # bf16, then stays small (~|mid - zero| * scale instead of ~(8 - zero) * scale)
        mid = 1 << (bits - 1)
        bias = (mid - zero) * scale
        packed = pack_int4(codes)
        if bits < 4:
            packed += (8 - mid) * 0x11  # both nibbles of every byte: c + 8 - mid stays within 0..15
    scale_bias = torch.stack([scale.t(), bias.t()], dim=-1).to(COMPUTE_DTYPE).contiguous()  # [S*K/G, N, 2]
    return {"packed": packed, "scale_bias": scale_bias}


@dataclass(frozen=True)
class Int4CpuWeight:
    """A packed [N, K] weight for `kernels.linear`: views into a cache slot, never a dense matrix."""

    packed: torch.Tensor  # uint8 [N, S*K/2]
    scale_bias: torch.Tensor  # bf16 [S*K/G, N, 2]
    group_size: int
    splits: int  # 2 for 8-bit codes (hi and lo nibbles), else 1

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2 // self.splits

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.shape
        x2 = x.reshape(-1, k).to(COMPUTE_DTYPE)  # [t, K]
        if self.splits == 2:
            x2 = torch.cat([x2, x2], dim=1)  # [t, 2K]: the hi and the lo codes see the same input
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.packed, self.group_size,
                                                       self.scale_bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], n)


def int4_codes(packed: torch.Tensor) -> torch.Tensor:
    """The kernel's packed layout [N, K/2] back to 4-bit codes uint8 [N, K] (plain PyTorch, for the
    reference): per block of 64 rows, k-major bytes holding rows j (low nibble) and j + 32 (high);
    below 64 rows, k-major bytes holding rows 2i (low) and 2i + 1 (high)."""
    n, half = packed.shape
    k = 2 * half
    if n % 64 == 0:
        tiles = packed.reshape(n // 64, k, 32).transpose(1, 2)  # [N/64, 32, K]
        return torch.stack([tiles & 15, tiles >> 4], dim=1).reshape(n, k)  # [N/64, half, 32, K]
    pairs = packed.reshape(k, n // 2).t()  # [N/2, K]
    return torch.stack([pairs & 15, pairs >> 4], dim=1).reshape(n, k)  # rows 2i, 2i + 1


class Int4CpuFormat:
    """The matrix format of torch's int4 CPU kernel (a `kernels.forms.MatrixFormat`): codes as 4-bit
    nibbles in the kernel's tiles, scale and bias interleaved in bf16. A 2/3-bit code takes 4 bits here
    (2x a 2-bit record's codes), the price of computing in place with no conversion at load or use."""

    name = "int4-cpu"
    converts_per_use = False
    device_type = "cpu"
    target = "CPU (torch int4 kernel)"

    def supports(self, bits: int, shape: tuple[int, int], group_size: int) -> bool:
        return int4_supports(bits, shape, group_size)

    def shapes(self, info: dict, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return int4_shapes(info["nbits"], tuple(info["shape"]), info["group_size"])

    def pack(self, tensors: dict[str, torch.Tensor], info: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return int4_pack(*hqq_codes(tensors, info), info["nbits"], info["group_size"])

    def weight(self, views: dict[str, torch.Tensor], info: dict) -> Int4CpuWeight:
        return Int4CpuWeight(views["packed"], views["scale_bias"], info["group_size"], 2 if info["nbits"] == 8 else 1)

    def reference(self, views: dict[str, torch.Tensor], info: dict, dtype: torch.dtype) -> torch.Tensor:
        """W [N, K] = (q - 8) * scale + bias per group, summed over the splits of an 8-bit code."""
        n, k = tuple(info["shape"])
        group, splits = info["group_size"], 2 if info["nbits"] == 8 else 1
        codes = int4_codes(views["packed"]).float().reshape(n, splits * k // group, group)  # [N, S*K/G, G]
        scale, bias = views["scale_bias"].float().unbind(-1)  # [S*K/G, N] each
        w = (codes - 8) * scale.t()[..., None] + bias.t()[..., None]  # [N, S*K/G, G]
        return w.reshape(n, splits, k).sum(dim=1).to(dtype)  # hi and lo parts of an 8-bit code add up


INT4_CPU = Int4CpuFormat()
