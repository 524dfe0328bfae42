"""Plain references the tests compare the engine against: hqq's own (de)quantization, and the
Mixtral-shaped workload computed layer by layer with `reference_moe` over weights held in memory."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear, Quantizer

from moe_runtime.bench import workload as wl
from moe_runtime.experts import reference_moe
from moe_runtime.types import ExpertWeights, swiglu


def hqq_dequantized(weight: torch.Tensor, bits: int, group_size: int, quantize_meta: bool,
                    optimize: bool = True) -> torch.Tensor:
    """The reference: hqq's own quantizer and dequantizer on one checkpoint matrix, in the setting the
    store documents (axis 1, groups of `group_size`, HQQ's optimizer or round-to-nearest, fp16 scale and zero, optionally
    themselves 8-bit quantized along axis 0 in groups of up to 128)."""
    w_q, meta = Quantizer.quantize(weight.float(), nbits=bits, channel_wise=True, group_size=group_size,
                                   optimize=optimize, round_zero=(bits == 4), axis=1, bitpack=True, device="cpu")
    for part in ("scale", "zero"):
        value = meta[part].half().float()
        if quantize_meta:
            codes, sub = Quantizer.quantize(value, nbits=8, channel_wise=True, group_size=math.gcd(128, value.numel()),
                                            optimize=False, axis=0, bitpack=True, device="cpu")
            sub["scale"], sub["zero"] = sub["scale"].half().float(), sub["zero"].half().float()
            value = Quantizer.dequantize(codes, sub)
        meta[part] = value
    return Quantizer.dequantize(w_q, meta).reshape(weight.shape)


def hqq_linear_dequantized(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Without meta quantization the setting is exactly hqq's HQQLinear (axis 1), dequantized by hqq."""
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data.copy_(weight)
    quantized = HQQLinear(linear, BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=1),
                          compute_dtype=torch.float16, device="cpu")
    return quantized.dequantize().float()


def workload_reference_step(spec: wl.WorkloadSpec, replay: wl.Replay, token: int) -> torch.Tensor:
    """One token of the workload without cache, store or codec: each layer's experts dequantized by hqq
    (round-to-nearest, as the workload's store) and run by `reference_moe`."""
    n = token % replay.num_tokens
    hidden = wl.first_hidden(spec, n, torch.device("cpu"))
    for layer in range(spec.layers):
        weights = []
        for expert in range(spec.experts):
            matrices = wl.expert_weights(spec, layer, expert)
            if spec.bits is not None:
                matrices = [hqq_dequantized(w, spec.bits, spec.group_size, True, optimize=False) for w in matrices]
            weights.append(ExpertWeights(*(w.to(spec.torch_dtype) for w in matrices)))
        index, routing_weights = wl.routing(replay, layer, n, torch.device("cpu"))
        out = reference_moe(hidden, index, routing_weights.to(hidden.dtype), weights, swiglu(F.silu))
        hidden = wl.residual_step(hidden, out)
    return hidden
