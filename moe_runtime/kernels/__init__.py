"""Computing with experts as their records hold them: `linear` and the matrix formats (forms.py).

`linear(x, w, bias=None)` is x @ w.T (+ bias) for whatever `w` is: a dense tensor (F.linear) or a
packed quantized weight (a fused kernel that reads the codes; never a full dequantized matrix).
`reference_linear` is the plain path the fused ones are tested against: hqq's own dequantization
followed by F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import dequantize_matrix
from .cpu import INT4_CPU, Int4CpuWeight
from .forms import CUDA_FORMAT, FORMATS, HQQ_STORED, MatrixFormat, choose_format
from .triton_hqq import TRITON_HQQ, TritonHqqWeight

__all__ = ["CUDA_FORMAT", "FORMATS", "HQQ_STORED", "INT4_CPU", "TRITON_HQQ", "Int4CpuWeight", "MatrixFormat",
           "TritonHqqWeight", "choose_format", "linear", "reference_linear"]


def linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ w.T (+ bias) -> [..., N]; w a dense [N, K] tensor or a packed weight."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    y = w.linear(x)
    return y if bias is None else y + bias


def reference_linear(x: torch.Tensor, tensors: dict[str, torch.Tensor], info: dict,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """hqq's Quantizer.dequantize of one matrix's pieces, then F.linear (in x's dtype)."""
    weight = dequantize_matrix(tensors, info, x.dtype).reshape(info["shape"])
    return F.linear(x, weight, bias)
