"""HQQ-quantized attention projections: an `nn.Linear` whose weight is packed once into the format its
device computes from, and computed by `kernels.linear` like an expert's matrices."""

from __future__ import annotations

import torch
from torch import nn

from ..quant import quantize_matrix
from . import linear
from .forms import choose_format


class HQQLinear(nn.Module):
    """A linear layer whose weight is kept HQQ-quantized (its bias stays as is), packed once into the
    format its device computes from (`kernels.forms.choose_format`: a fused kernel where one fits, else
    hqq's pieces dequantized per call)."""

    def __init__(self, linear: nn.Linear, bits: int, group_size: int, quantize_meta: bool,
                 optimize: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        device = linear.weight.device
        tensors, self.info = quantize_matrix(linear.weight.detach(), bits, group_size, quantize_meta, optimize,
                                             str(device))
        self.info["dtype"] = self.dtype
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.fmt = choose_format(bits, group_size, [(self.out_features, self.in_features)], device, warn=False)
        self.kind = self.fmt.name
        tensors = {name: tensor.to(device) for name, tensor in tensors.items()}
        pieces = self.fmt.pack(tensors, self.info, self.dtype)
        for name, tensor in pieces.items():
            self.register_buffer(name, tensor.to(device))
        self.names = list(pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.fmt.weight({name: getattr(self, name) for name in self.names}, self.info)
        return linear(x, weight, self.bias)
