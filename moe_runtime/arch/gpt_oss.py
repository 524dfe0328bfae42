"""gpt-oss (20b, 120b): experts with biases, a clamped GLU, gate and up interleaved in one tensor.

transformers' layout: `mlp.experts.gate_up_proj` [E, H, 2I] (x @ W, gate in the even columns, up
in the odd ones) with `gate_up_proj_bias` [E, 2I], `down_proj` [E, I, H] with `down_proj_bias`
[E, H]. The hub checkpoints store the two weight tensors in MXFP4 (`quant_method: mxfp4`):
`*_blocks` [E, rows, cols/32, 16] (two 4-bit codes per byte) and `*_scales` [E, rows, cols/32]
(a power-of-two exponent + 127 per 32 values). They are dequantized on the way into the store
with transformers' own `convert_moe_packed_tensors` (exact: every FP4 value times a power of two
fits bf16/fp32); the store then holds the compute dtype, or HQQ codes with `expert_bits`.
Attention has biases, per-head sinks and sliding-window layers (transformers handles both; it
offers no sdpa path for sinks, so the model is built with eager attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from ..types import ExpertWeights
from .base import Family, key_pattern

EXPERTS = "model.layers.{layer}.mlp.experts"


def _split(gate_up: torch.Tensor, gate_up_bias: torch.Tensor, down: torch.Tensor, down_bias: torch.Tensor):
    """gate_up [H, 2I] (interleaved columns), down [I, H] -> ExpertWeights in the x @ W.T convention."""
    return ExpertWeights(gate_up[:, 0::2].T.contiguous(), gate_up[:, 1::2].T.contiguous(), down.T.contiguous(),
                         gate_up_bias[0::2].contiguous(), gate_up_bias[1::2].contiguous(), down_bias)


@dataclass(frozen=True)
class InterleavedKeys:
    """transformers' own gpt-oss layout (what save_pretrained of a dequantized model writes)."""

    prefix: str = EXPERTS

    def keys(self, layer: int, expert: int) -> tuple[str, ...]:
        p = self.prefix.format(layer=layer)
        return f"{p}.gate_up_proj", f"{p}.gate_up_proj_bias", f"{p}.down_proj", f"{p}.down_proj_bias"

    def matches(self, key: str) -> bool:
        return any(key_pattern(t).match(key) for t in self.keys("{layer}", 0))

    def read(self, checkpoint, layer: int, expert: int) -> ExpertWeights:
        return _split(*(checkpoint.get_slice(k, expert) for k in self.keys(layer, expert)))


@dataclass(frozen=True)
class Mxfp4Keys:
    """The hub's MXFP4 layout: blocks + scales for gate_up [2I, H] and down [H, I], biases as is."""

    prefix: str = EXPERTS

    def keys(self, layer: int, expert: int) -> tuple[str, ...]:
        p = self.prefix.format(layer=layer)
        return (f"{p}.gate_up_proj_blocks", f"{p}.gate_up_proj_scales", f"{p}.gate_up_proj_bias",
                f"{p}.down_proj_blocks", f"{p}.down_proj_scales", f"{p}.down_proj_bias")

    def matches(self, key: str) -> bool:
        return any(key_pattern(t).match(key) for t in self.keys("{layer}", 0))

    def read(self, checkpoint, layer: int, expert: int) -> ExpertWeights:
        gu_blocks, gu_scales, gu_bias, d_blocks, d_scales, d_bias = (
            checkpoint.get_slice(k, expert) for k in self.keys(layer, expert))
        # [rows, cols/32, 16] + [rows, cols/32] -> [1, cols, rows] (transformers' x @ W orientation)
        gate_up = convert_moe_packed_tensors(gu_blocks[None], gu_scales[None], dtype=torch.float32)[0]
        down = convert_moe_packed_tensors(d_blocks[None], d_scales[None], dtype=torch.float32)[0]
        return _split(gate_up, gu_bias, down, d_bias)


@dataclass(frozen=True)
class GptOss(Family):
    def expert_fn(self, config):
        alpha, limit = config.swiglu_alpha, config.swiglu_limit

        def clamped_glu(x: torch.Tensor, w: ExpertWeights, linear) -> torch.Tensor:
            gate = linear(x, w.gate, w.gate_bias).clamp(max=limit)
            up = linear(x, w.up, w.up_bias).clamp(min=-limit, max=limit)
            return linear((up + 1) * gate * torch.sigmoid(gate * alpha), w.down, w.down_bias)

        return clamped_glu


ADAPTER = GptOss(
    model_type="gpt_oss",
    hub_ids=("openai/gpt-oss-20b", "openai/gpt-oss-120b"),
    layout_list=(Mxfp4Keys(), InterleavedKeys()),
    router="router",
    expert_bias=True,
    attn_implementation="eager",
    checkpoint_quantization=("mxfp4",),
)
