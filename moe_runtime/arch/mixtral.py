"""Mixtral (8x7B, 8x22B): the original hub layout and the fused one transformers 5 writes."""

from __future__ import annotations

import re

from torch import nn

from .base import MoEShape


class MixtralAdapter:
    """Mixtral: original keys `block_sparse_moe.experts.E.w1/w2/w3` or transformers 5's fused ones."""

    model_type = "mixtral"
    _expert_key = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
    _fused_key = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")

    def shape(self, config) -> MoEShape:
        return MoEShape(
            num_layers=config.num_hidden_layers,
            num_experts=config.num_local_experts,
            top_k=config.num_experts_per_tok,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
        )

    def is_expert_key(self, key: str) -> bool:
        return bool(self._expert_key.match(key) or self._fused_key.match(key))

    def original_expert_keys(self, layer: int, expert: int) -> tuple[str, str, str]:
        """(gate, up, down) keys of the original layout: w1 = gate, w3 = up, w2 = down."""
        prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
        return f"{prefix}.w1.weight", f"{prefix}.w3.weight", f"{prefix}.w2.weight"

    def fused_expert_keys(self, layer: int) -> tuple[str, str]:
        """(gate_up [E, 2I, H], down [E, H, I]) keys of the layout transformers 5 writes."""
        prefix = f"model.layers.{layer}.mlp.experts"
        return f"{prefix}.gate_up_proj", f"{prefix}.down_proj"

    def dense_key(self, key: str) -> str:
        """Checkpoint key of a non-expert tensor -> parameter name in the transformers model."""
        return key.replace(".block_sparse_moe.", ".mlp.")

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(model.model.layers)

    def moe_block(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def router_weight(self, layer: nn.Module):
        return layer.mlp.gate.weight

    def moe_norm_weight(self, layer: nn.Module):
        """The norm applied to the residual stream right before this layer's MoE block."""
        return layer.post_attention_layernorm.weight

    def attention_linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        attn = layer.self_attn
        return {name: getattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}

