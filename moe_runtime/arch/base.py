"""The adapter contract: what the engine needs to know of a Mixture-of-Experts family.

An adapter names the checkpoint keys of one expert, translates the other checkpoint keys to the
names transformers uses, and finds the experts/router/norm modules in a built model. The engine
sees only (gate, up, down) tensors and module handles, never a hub key name: all checkpoint-name
translation lives in the adapters. Dimensions: H hidden size, I expert FFN size, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class MoEShape:
    num_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int


class MoEAdapter(Protocol):
    """One MoE family. Registered in `moe_runtime.arch.ADAPTERS` under `model_type`."""

    model_type: str

    def shape(self, config) -> MoEShape:
        """The MoE dimensions from a transformers config."""
        ...

    def is_expert_key(self, key: str) -> bool:
        """Whether a checkpoint key holds expert weights (stored in the expert store, not the dense part)."""
        ...

    def original_expert_keys(self, layer: int, expert: int) -> tuple[str, str, str]:
        """Checkpoint keys of one expert's (gate [I, H], up [I, H], down [H, I]) in the per-expert layout."""
        ...

    def fused_expert_keys(self, layer: int) -> tuple[str, str]:
        """Checkpoint keys of a layer's fused (gate_up [E, 2I, H], down [E, H, I]) layout."""
        ...

    def dense_key(self, key: str) -> str:
        """Checkpoint key of a non-expert tensor -> parameter name in the transformers model."""
        ...

    def layers(self, model: nn.Module) -> list[nn.Module]:
        """The decoder layers of a built transformers model."""
        ...

    def moe_block(self, layer: nn.Module) -> nn.Module:
        """The layer's MoE block, whose `.experts` the engine replaces."""
        ...

    def router_weight(self, layer: nn.Module) -> torch.Tensor:
        """The router's weight [E, H] (for the speculator)."""
        ...

    def moe_norm_weight(self, layer: nn.Module) -> torch.Tensor:
        """The norm weight [H] applied to the residual stream right before this layer's MoE block."""
        ...

    def attention_linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """The attention projections that may be HQQ-quantized, by attribute name on `layer.self_attn`."""
        ...
