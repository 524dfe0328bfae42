"""CUDA: a Triton kernel computing y = x @ W.T straight from an HQQ record (2/3/4/8-bit, axis-1 groups).

`TRITON_HQQ` is the record form (the matrix format of kernels/forms.py's registry): the bytes a store
writes once, at build time, and every level (disk, host arena, device slot) then holds unchanged. The
kernel reads them as they lie; nothing is converted at load or use.

Record of one [N, K] matrix (pieces named as quant.quantize_matrix names them, reshaped, never recomputed):

    codes       uint8 [N, K*b/8]   b = 2, 4, 8: PER = 8/b codes per byte along K, code k of row n in
                                   byte k // PER at bit (k % PER) * b.
                uint8 [N, K/4]     b = 3: the low 2 bits of each code, packed as 2-bit codes, plus
    codes_hi    uint8 [N, K/8]            the high bit, 8 per byte (bit k % 8): 3.0 bits a code.
    scale_q, zero_q  uint8 [N, K/G]  quantize_meta on: hqq's 8-bit codes of the group scales/zeros,
    scale_scale, scale_zero, zero_scale, zero_zero  fp16 [C]   and their meta scale/zero: group g's
                                   meta column is g % C (hqq quantizes the [N*K/G] scales as a
                                   [META_GROUP, C] matrix along axis 0).
    scale, zero fp16 [N, K/G]     quantize_meta off: as stored.

Inside the kernel, for each element: scale = (scale_q - scale_zero[g % C]) * scale_scale[g % C] (the
same for zero), w = (code - zero) * scale (hqq's convention) in fp32 registers, cast to x's dtype for
the matmul, accumulated in fp32. No dense weight, scale or zero matrix exists outside registers.

A 2-bit Mixtral expert (H 4096, I 14336, group 32, meta on) is 55,394,304 bytes of pieces (+ 64-byte
alignment), the same as quant.ExpertCodec's record; 3-bit is smaller than the codec's (3.0 vs hqq's
3.2 bits a code, `record_sizes`).

Launch: `launch_config` picks the tiles per shape from a table (M = 1: a dot-free GEMV tile; M <= 16:
one 16-row `tl.dot` tile; prefill: 32/64 rows) and splits K across programs when the (N, M) tiles
alone would leave the GPU's SMs idle (decode's down_proj: N = 4096 is 64 programs for a T4's 40 SMs).
The partial sums of a split are added in a fixed order (torch.sum over the splits), so results do
not depend on scheduling. The kernel runs on CPU tensors under `TRITON_INTERPRET=1` (tests).

Dimensions: M tokens, N output features, K input features, G group size, S K-splits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..quant import ALIGN, MATRICES, ExpertCodec, hqq_codes
from .capability import check_kernel_dtype, device_info

META_PIECES = ("scale_q", "zero_q", "scale_scale", "scale_zero", "zero_scale", "zero_zero")
INTERPRETER_SM_COUNT = 40  # under the interpreter, launch as on a T4 (40 SMs), so its configs are the ones tested
_kernel = None


# --- launch configuration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1  # S programs share each (N, M) tile's K range
    num_warps: int = 4

    @property
    def use_dot(self) -> bool:
        return self.block_m >= 16  # tl.dot's smallest tile; M = 1 multiplies and sums instead

    def grid(self, m: int, n: int) -> tuple[int, int, int]:
        return cdiv(n, self.block_n), cdiv(m, self.block_m), self.split_k

    def k_per_split(self, k: int) -> int:
        return cdiv(cdiv(k, self.split_k), self.block_k) * self.block_k


PROGRAMS_PER_SM = 4  # enough programs in flight per SM to hide the latency of the code loads
MIN_K_PER_SPLIT = 512  # a split below this spends more on the partial sums than it saves
MAX_SPLIT_K = 16


@lru_cache(maxsize=4096)  # asked at every launch
def launch_config(m: int, n: int, k: int, sm_count: int) -> LaunchConfig:
    """The tiles for an [M, K] x [K, N] product on a GPU with `sm_count` SMs.

    The table is reasoned from the kernel's shape, not tuned on hardware (none is lent to this project;
    scripts/gpu_check.sh's kernel bench is where it gets measured): decode is bound by the code bytes,
    so it wants many programs in flight; prefill by the matmul, so it wants bigger tiles."""
    if m == 1:
        block_m, block_n, block_k = 1, 64, 128  # [BK, BN] codes, multiply and sum: no 16-row tile wasted
    elif m <= 16:
        block_m, block_n, block_k = 16, 64, 64  # decode batches of 2..16 tokens: one tl.dot tile
    elif m <= 32:
        block_m, block_n, block_k = 32, 64, 64
    else:
        block_m, block_n, block_k = 64, 64, 64  # prefill
    tiles = cdiv(n, block_n) * cdiv(m, block_m)
    wanted = sm_count * PROGRAMS_PER_SM
    split = 1
    if tiles < wanted:
        split = max(1, min(cdiv(wanted, tiles), k // MIN_K_PER_SPLIT, MAX_SPLIT_K))
    per_split = LaunchConfig(block_m, block_n, block_k, split).k_per_split(k)
    return LaunchConfig(block_m, block_n, block_k, cdiv(k, per_split))  # rounding K up to tiles: no empty split


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --- the kernel -------------------------------------------------------------------------------------
def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def hqq_matmul(x_ptr, q_ptr, qhi_ptr, s_ptr, z_ptr, ss_ptr, sz_ptr, zs_ptr, zz_ptr, y_ptr,
                   M, N, K, C, K_PER_SPLIT,
                   BITS: tl.constexpr, HAS_HI: tl.constexpr, META: tl.constexpr, GROUP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   USE_DOT: tl.constexpr, IEEE: tl.constexpr):
        PER: tl.constexpr = 8 // BITS  # codes per byte of `codes`
        MASK: tl.constexpr = (1 << BITS) - 1
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m[:, None] < M  # [BM, 1]
        n_ok = offs_n[None, :] < N  # [1, BN]
        groups_per_row = K // GROUP
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_start = pid_k * K_PER_SPLIT
        for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k[:, None] < K  # [BK, 1]
            x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_ok & (offs_k[None, :] < K),
                        other=0.0)  # [BM, BK]
            ok = k_ok & n_ok  # [BK, BN]
            byte = tl.load(q_ptr + offs_n[None, :] * (K // PER) + offs_k[:, None] // PER, mask=ok, other=0)
            code = (byte.to(tl.int32) >> ((offs_k[:, None] % PER) * BITS)) & MASK  # [BK, BN]
            if HAS_HI:  # 3-bit: the high bit from its own plane
                hi = tl.load(qhi_ptr + offs_n[None, :] * (K // 8) + offs_k[:, None] // 8, mask=ok, other=0)
                code = code | (((hi.to(tl.int32) >> (offs_k[:, None] % 8)) & 1) << BITS)
            g = offs_n[None, :] * groups_per_row + offs_k[:, None] // GROUP  # [BK, BN] group index
            if META:  # the group's scale/zero from their 8-bit codes and meta scale/zero
                col = g % C
                scale = ((tl.load(s_ptr + g, mask=ok, other=0).to(tl.float32)
                          - tl.load(sz_ptr + col, mask=ok, other=0.0).to(tl.float32))
                         * tl.load(ss_ptr + col, mask=ok, other=0.0).to(tl.float32))
                zero = ((tl.load(z_ptr + g, mask=ok, other=0).to(tl.float32)
                         - tl.load(zz_ptr + col, mask=ok, other=0.0).to(tl.float32))
                        * tl.load(zs_ptr + col, mask=ok, other=0.0).to(tl.float32))
            else:
                scale = tl.load(s_ptr + g, mask=ok, other=0.0).to(tl.float32)
                zero = tl.load(z_ptr + g, mask=ok, other=0.0).to(tl.float32)
            w = (code.to(tl.float32) - zero) * scale  # [BK, BN], registers only
            if USE_DOT:
                if IEEE:
                    acc += tl.dot(x, w.to(x.dtype), input_precision="ieee")
                else:
                    acc += tl.dot(x, w.to(x.dtype))
            else:  # M = 1: [BM, BK, 1] * [1, BK, BN] summed over K
                acc += tl.sum(x.to(tl.float32)[:, :, None] * w.to(x.dtype).to(tl.float32)[None, :, :], axis=1)
        out = y_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_ok & n_ok)

    return hqq_matmul


def hqq_matmul(x: torch.Tensor, pieces: dict[str, torch.Tensor], bits: int, group_size: int, n: int, k: int,
               config: LaunchConfig | None = None) -> torch.Tensor:
    """x [M, K] (contiguous, the compute dtype) @ W.T -> [M, N] from the record `pieces` of W.

    `config`: the launch (default: `launch_config` for this shape and device)."""
    global _kernel
    if _kernel is None:
        _kernel = _build_kernel()
    m = x.shape[0]
    if config is None:
        config = launch_config(m, n, k, device_info(x.device).sm_count or INTERPRETER_SM_COUNT)
    # one fp32 partial product per split, added in order below; one split writes y directly
    y = torch.empty((config.split_k, m, n) if config.split_k > 1 else (m, n),
                    dtype=torch.float32 if config.split_k > 1 else x.dtype, device=x.device)
    meta = "scale_q" in pieces
    scale, zero = (pieces["scale_q"], pieces["zero_q"]) if meta else (pieces["scale"], pieces["zero"])
    ss, sz, zs, zz = (pieces[p] for p in META_PIECES[2:]) if meta else (scale,) * 4
    codes = pieces["codes"]
    _kernel[config.grid(m, n)](
        x, codes, pieces.get("codes_hi", codes), scale, zero, ss, sz, zs, zz, y, m, n, k,
        ss.numel() if meta else 1, config.k_per_split(k),
        BITS=2 if bits == 3 else bits, HAS_HI=bits == 3, META=meta, GROUP=group_size,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        USE_DOT=config.use_dot, IEEE=x.dtype == torch.float32, num_warps=config.num_warps)
    return y.sum(dim=0).to(x.dtype) if config.split_k > 1 else y


# --- the record form (kernels.forms' matrix-format contract) -----------------------------------------
def pack_codes(codes: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """codes uint8 [N, K] -> {"codes"[, "codes_hi"]} packed along K as the kernel reads them."""
    if bits == 3:
        return {"codes": _pack_along_k(codes & 3, 2), "codes_hi": _pack_along_k(codes >> 2, 1)}
    return {"codes": _pack_along_k(codes, bits)}


def _pack_along_k(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    n, k = codes.shape
    grouped = codes.reshape(n, k // per, per).to(torch.int32)  # [N, K/PER, PER]
    shifts = torch.arange(per, dtype=torch.int32, device=codes.device) * bits
    return (grouped << shifts).sum(dim=-1).to(torch.uint8)  # [N, K/PER], at most 255


def unpack_codes(pieces: dict[str, torch.Tensor], bits: int, k: int) -> torch.Tensor:
    """The inverse of `pack_codes`: uint8 [N, K] (the plain reading, for `reference`)."""
    if bits == 3:
        return _unpack_along_k(pieces["codes"], 2, k) | (_unpack_along_k(pieces["codes_hi"], 1, k) << 2)
    return _unpack_along_k(pieces["codes"], bits, k)


def _unpack_along_k(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * bits
    return ((packed[:, :, None] >> shifts) & ((1 << bits) - 1)).reshape(packed.shape[0], k)


@dataclass(frozen=True)
class TritonHqqWeight:
    """One [N, K] matrix for `kernels.linear` on CUDA: views of its record pieces, computed in x's dtype."""

    pieces: dict
    bits: int
    group_size: int
    shape: tuple[int, int]

    def linear(self, x: torch.Tensor, config: LaunchConfig | None = None) -> torch.Tensor:
        check_kernel_dtype(x.device, x.dtype)  # bf16 on a GPU below sm_80: a clear ValueError, not a crash
        n, k = self.shape
        y = hqq_matmul(x.reshape(-1, k).contiguous(), self.pieces, self.bits, self.group_size, n, k, config)
        return y.reshape(*x.shape[:-1], n)


class TritonHqqFormat:
    """The matrix format the Triton kernel reads (see the module docstring for the record's pieces)."""

    name = "triton-hqq"
    converts_per_use = False  # the kernel reads the record as it lies
    device_type = "cuda"
    target = "CUDA (Triton kernel)"

    def supports(self, bits: int, shape: tuple[int, int], group_size: int) -> bool:
        """2/3/4/8 bits, groups dividing K, K a multiple of 8 (a packed row ends on a byte); any N."""
        _, k = shape
        return bits in (2, 3, 4, 8) and k % group_size == 0 and k % 8 == 0

    def shapes(self, info: dict, dtype: torch.dtype | None = None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The record's pieces of one matrix. `dtype` (the compute dtype) does not change them: scales and
        zeros stay as stored (fp16 or 8-bit codes) whatever the kernel computes in."""
        (n, k), bits, group = tuple(info["shape"]), info["nbits"], info["group_size"]
        if not self.supports(bits, (n, k), group):
            raise ValueError(f"the triton-hqq format does not take {bits}-bit [{n}, {k}] matrices with group "
                             f"{group}: it needs bits 2/3/4/8, K a multiple of 8 and of the group size")
        out = {"codes": ((n, k * (2 if bits == 3 else bits) // 8), torch.uint8)}
        if bits == 3:
            out["codes_hi"] = ((n, k // 8), torch.uint8)
        groups = (n, k // group)
        if "scale_meta" in info:
            columns = n * k // group // info["scale_meta"]["group_size"]  # C
            out.update(scale_q=(groups, torch.uint8), zero_q=(groups, torch.uint8))
            out.update({p: ((columns,), torch.float16) for p in META_PIECES[2:]})
        else:
            out.update(scale=(groups, torch.float16), zero=(groups, torch.float16))
        return out

    def pack(self, tensors: dict[str, torch.Tensor], info: dict, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """quant.quantize_matrix's (tensors, info) -> the record's pieces: codes repacked bit-exactly
        (once, at store build time), scales/zeros and their meta as stored, only reshaped."""
        shapes = self.shapes(info, dtype)
        codes, _, _ = hqq_codes(tensors, info)
        out = pack_codes(codes, info["nbits"])
        for piece in shapes:
            if piece not in out:
                out[piece] = tensors[piece].reshape(shapes[piece][0]).contiguous()
        for piece, (shape, piece_dtype) in shapes.items():
            if tuple(out[piece].shape) != shape or out[piece].dtype != piece_dtype:
                raise RuntimeError(f"triton-hqq piece {piece} is {tuple(out[piece].shape)} {out[piece].dtype}, "
                                   f"expected {shape} {piece_dtype}")
        return out

    def weight(self, views: dict[str, torch.Tensor], info: dict) -> TritonHqqWeight:
        return TritonHqqWeight(dict(views), info["nbits"], info["group_size"], tuple(info["shape"]))

    def reference(self, views: dict[str, torch.Tensor], info: dict, dtype: torch.dtype) -> torch.Tensor:
        """Plain PyTorch dequantization [N, K] in `dtype`, in hqq's order of operations (so it equals
        quant.dequantize_matrix, i.e. hqq's Quantizer.dequantize, bit for bit)."""
        (n, k), group = tuple(info["shape"]), info["group_size"]
        codes = unpack_codes(views, info["nbits"], k).reshape(n * k // group, group)  # hqq's [N*K/G, G]
        if "scale_q" in views:
            parts = []
            for part in ("scale", "zero"):
                columns = views[f"{part}_scale"].numel()
                q = views[f"{part}_q"].reshape(-1, columns).to(dtype)  # [META_GROUP, C], hqq's axis-0 groups
                parts.append(((q - views[f"{part}_zero"].to(dtype)) * views[f"{part}_scale"].to(dtype)).reshape(-1, 1))
            scale, zero = parts
        else:
            scale, zero = (views[p].reshape(-1, 1).to(dtype) for p in ("scale", "zero"))
        return ((codes.to(dtype) - zero) * scale).reshape(n, k)

    def nbytes(self, info: dict) -> int:
        """Bytes of one matrix's pieces laid out one after another at quant.ALIGN (as ExpertLayout does)."""
        total = 0
        for shape, dtype in self.shapes(info).values():
            total = -(-total // ALIGN) * ALIGN + math.prod(shape) * dtype.itemsize
        return total


TRITON_HQQ = TritonHqqFormat()


def record_sizes(hidden: int = 4096, intermediate: int = 14336, bits=(2, 3, 4, 8), group_size: int | dict = 32,
                 quantize_meta: bool = True) -> list[dict]:
    """Per bit width: one expert's record bytes as quant.ExpertCodec lays it out today and as
    `TRITON_HQQ` pieces (gate, up, down), from shapes only (meta tensors: no memory, no math)."""
    rows = []
    for b in bits:
        group = group_size[b] if isinstance(group_size, dict) else group_size
        codec = ExpertCodec(hidden, intermediate, b, group, quantize_meta, torch.float16, optimize=False)
        triton = 0
        for name in MATRICES:
            triton = -(-triton // ALIGN) * ALIGN + TRITON_HQQ.nbytes(codec.layout.hqq_meta[name])
        rows.append({"bits": b, "group": group, "codec_bytes": codec.nbytes, "triton_hqq_bytes": triton})
    return rows
