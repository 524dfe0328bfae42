"""CUDA: a Triton kernel computing y = x @ W.T straight from HQQ codes (2/3/4/8-bit, axis-1 groups).

Each program reads its [BLOCK_K, BLOCK_N] tile of packed codes once, dequantizes it in registers
with the group's scale and zero (w = (c - zero) * scale, hqq's convention) and accumulates
x_tile @ w_tile in fp32 with `tl.dot`; no dense weight exists outside registers. Rows of x beyond
M are masked, so decode (M = 1..8) and prefill use the same kernel.

Layout (written by `triton_pack` when an expert enters a GPU slot): codes packed along K, PER =
8 // bits codes per byte, code k of row n in byte k // PER at bit (k % PER) * bits; 3-bit codes are
stored as 4-bit ones. scale and zero [N, K/G] in the compute dtype (fp16 on Turing, bf16 on Ampere+).
The kernel also runs on CPU tensors under `TRITON_INTERPRET=1` (tests).

Dimensions: M tokens, N output features, K input features, G group size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK_K = 64
BLOCK_N = 64  # the same tiles under the interpreter as on a GPU
_kernel = None


def stored_bits(bits: int) -> int:
    return 4 if bits == 3 else bits


def triton_supports(bits: int, shape: tuple[int, int], group_size: int) -> bool:
    _, k = shape
    return bits in (2, 3, 4, 8) and k % BLOCK_K == 0 and k % group_size == 0


def triton_shapes(bits: int, shape: tuple[int, int], group_size: int, dtype: torch.dtype) -> dict:
    n, k = shape
    return {"codes": ((n, k * stored_bits(bits) // 8), torch.uint8),
            "scale": ((n, k // group_size), dtype), "zero": ((n, k // group_size), dtype)}


def triton_pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HQQ pieces (codes uint8 [N, K], scale, zero fp32 [N, K/G]) -> the kernel's pieces."""
    width = stored_bits(bits)
    per = 8 // width
    n, k = codes.shape
    grouped = codes.reshape(n, k // per, per).to(torch.int32)  # [N, K/PER, PER]
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * width
    packed = (grouped << shifts).sum(dim=-1).to(torch.uint8)  # [N, K/PER]
    return {"codes": packed, "scale": scale.to(dtype).contiguous(), "zero": zero.to(dtype).contiguous()}


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def hqq_matmul(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, N, K,
                   BITS: tl.constexpr, GROUP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        PER: tl.constexpr = 8 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m[:, None] < M
        n_ok = offs_n[None, :] < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_ok, other=0.0)  # [BM, BK]
            byte = tl.load(q_ptr + offs_n[None, :] * (K // PER) + offs_k[:, None] // PER,
                           mask=n_ok, other=0).to(tl.int32)  # [BK, BN]
            code = (byte >> ((offs_k[:, None] % PER) * BITS)) & MASK
            group = offs_n[None, :] * (K // GROUP) + offs_k[:, None] // GROUP  # [BK, BN]
            scale = tl.load(s_ptr + group, mask=n_ok, other=0.0).to(tl.float32)
            zero = tl.load(z_ptr + group, mask=n_ok, other=0.0).to(tl.float32)
            w = ((code.to(tl.float32) - zero) * scale).to(x.dtype)  # [BK, BN], registers only
            acc += tl.dot(x, w)
        tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_ok & n_ok)

    return hqq_matmul


def hqq_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
               group_size: int, n: int, k: int) -> torch.Tensor:
    """x [M, K] @ W.T -> [M, N], W given by packed `codes` and scale/zero [N, K/G]."""
    global _kernel
    if _kernel is None:
        _kernel = _build_kernel()
    m = x.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = 16  # tl.dot's smallest tile; rows beyond M are masked
    grid = (triton_cdiv(n, BLOCK_N), triton_cdiv(m, block_m))
    _kernel[grid](x, codes, scale, zero, y, m, n, k, BITS=stored_bits(bits), GROUP=group_size,
                  BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return y


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class HqqTritonWeight:
    """A packed [N, K] weight for `kernels.linear` on CUDA: views into a cache slot."""

    codes: torch.Tensor  # uint8 [N, K*bits/8]
    scale: torch.Tensor  # [N, K/G], compute dtype
    zero: torch.Tensor  # [N, K/G], compute dtype
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * 8 // stored_bits(self.bits)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.shape
        x2 = x.reshape(-1, k).to(self.scale.dtype).contiguous()  # [M, K]
        y = hqq_matmul(x2, self.codes, self.scale, self.zero, self.bits, self.group_size, n, k)
        return y.to(x.dtype).reshape(*x.shape[:-1], n)
