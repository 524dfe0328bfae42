"""The adapter contract: what the engine needs to know of a Mixture-of-Experts family.

transformers builds the model (attention, router, shared experts, generate); the engine swaps
each MoE layer's `experts` module for an offloaded one. What differs between families is data,
held by one adapter per family (one file each in this package):

- the MoE shape from the config: which decoder layers are MoE (DeepSeek's dense first layers,
  Qwen's `mlp_only_layers` / `decoder_sparse_step`), experts, top-k, one expert's FFN size;
- the expert key layout(s) on the hub (`ExpertKeys`: per-expert keys, fused keys, gpt-oss's
  interleaved gate/up with biases, MXFP4 blocks + scales) and the renames of all other keys to
  transformers' parameter names. All checkpoint-name translation lives here and nowhere else;
- the expert function `fn(x [t, H], weights: ExpertWeights, linear) -> [t, H]`, taken from the
  config (SwiGLU with `hidden_act`, gpt-oss's clamped GLU with biases);
- where the router and the norm before it live (`RouterView`, for the speculator) and how the
  router's logits rank experts (`guess_scores`);
- which attention projections may be HQQ-quantized (DeepSeek's MLA has its own names).

Dimensions: H hidden size, I one expert's FFN size, E routed experts, T tokens.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Protocol

import torch
from torch import nn
from transformers.activations import ACT2FN

from ..types import ExpertFn, ExpertWeights, MoEShape, RouterView, softmax_scores, swiglu


class Checkpointish(Protocol):
    def __contains__(self, key: str) -> bool: ...
    def get(self, key: str) -> torch.Tensor: ...
    def get_slice(self, key: str, index: int) -> torch.Tensor: ...


class ExpertKeys(Protocol):
    """One way a checkpoint stores a layer's experts. `layer` is the decoder layer index."""

    def keys(self, layer: int, expert: int) -> tuple[str, ...]:
        """The checkpoint tensors one expert is read from."""
        ...

    def matches(self, key: str) -> bool:
        """Whether a checkpoint key belongs to this layout (goes to the expert store, not the dense part)."""
        ...

    def read(self, checkpoint: Checkpointish, layer: int, expert: int) -> ExpertWeights:
        ...


@cache
def key_pattern(template: str) -> re.Pattern:
    """'model.layers.{layer}.mlp.experts.{expert}.w1.weight' -> a regex matching any layer/expert."""
    escaped = re.escape(template).replace(r"\{layer\}", r"\d+").replace(r"\{expert\}", r"\d+")
    return re.compile(f"^{escaped}$")


@dataclass(frozen=True)
class PerExpertKeys:
    """One tensor per expert and projection, e.g. `model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight`."""

    gate: str
    up: str
    down: str

    def keys(self, layer: int, expert: int) -> tuple[str, ...]:
        return tuple(t.format(layer=layer, expert=expert) for t in (self.gate, self.up, self.down))

    def matches(self, key: str) -> bool:
        return any(key_pattern(t).match(key) for t in (self.gate, self.up, self.down))

    def read(self, checkpoint, layer: int, expert: int) -> ExpertWeights:
        return ExpertWeights(*(checkpoint.get(k) for k in self.keys(layer, expert)))


@dataclass(frozen=True)
class FusedKeys:
    """A layer's experts stacked: gate_up [E, 2I, H] (gate rows first, then up), down [E, H, I]."""

    gate_up: str
    down: str

    def keys(self, layer: int, expert: int) -> tuple[str, ...]:
        return self.gate_up.format(layer=layer), self.down.format(layer=layer)

    def matches(self, key: str) -> bool:
        return bool(key_pattern(self.gate_up).match(key) or key_pattern(self.down).match(key))

    def read(self, checkpoint, layer: int, expert: int) -> ExpertWeights:
        gate_up_key, down_key = self.keys(layer, expert)
        gate, up = checkpoint.get_slice(gate_up_key, expert).chunk(2, dim=0)  # [2I, H] -> 2 x [I, H]
        return ExpertWeights(gate, up, checkpoint.get_slice(down_key, expert))


# transformers' own fused modules (`mlp.experts.gate_up_proj` / `down_proj`), as its checkpoints save them
TRANSFORMERS_FUSED = FusedKeys("model.layers.{layer}.mlp.experts.gate_up_proj", "model.layers.{layer}.mlp.experts.down_proj")


class MoEAdapter(Protocol):
    """One MoE family. Registered in `moe_runtime.arch.ADAPTERS` under `model_type`."""

    model_type: str
    hub_ids: tuple[str, ...]  # checkpoints on the hub this adapter is meant for
    attn_implementation: str  # what the model is built with ("sdpa", or "eager" where sdpa is unsupported)
    checkpoint_quantization: tuple[str, ...]  # `quant_method`s of pre-quantized hub checkpoints it reads

    def shape(self, config) -> MoEShape: ...

    def layouts(self, config) -> tuple[ExpertKeys, ...]:
        """The expert key layouts a checkpoint of this family may use, in order of preference."""
        ...

    def is_expert_key(self, key: str, config) -> bool: ...

    def dense_key(self, key: str) -> str:
        """Checkpoint key of a non-expert tensor -> parameter name in the transformers model."""
        ...

    def expert_fn(self, config) -> ExpertFn: ...

    def layers(self, model: nn.Module) -> list[nn.Module]: ...

    def moe_block(self, layer: nn.Module) -> nn.Module:
        """The layer's MoE block, whose `.experts` the engine replaces."""
        ...

    def router_view(self, layer: nn.Module) -> RouterView: ...

    def guess_scores(self, config, layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """For decoder layer `layer`'s router: [T, E] logits -> [T, E] non-negative scores whose
        ranking predicts the router's choice (the speculator ranks and averages them)."""
        ...

    def attention_linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """The attention projections that may be HQQ-quantized, by attribute name on `layer.self_attn`."""
        ...


@dataclass(frozen=True)
class Family:
    """An adapter as data; a family whose differences go beyond the fields overrides a method."""

    model_type: str
    hub_ids: tuple[str, ...]
    layout_list: tuple[ExpertKeys, ...]
    num_experts_attr: str = "num_local_experts"
    intermediate_attr: str = "intermediate_size"
    block: str = "mlp"  # attribute of the decoder layer holding the MoE block
    router: str = "gate"  # attribute of the MoE block holding the router
    norm: str = "post_attention_layernorm"  # the norm right before the MoE block
    renames: tuple[tuple[str, str], ...] = ()  # (regex, replacement) hub key -> parameter name
    attention: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    expert_bias: bool = False
    attn_implementation: str = "sdpa"
    checkpoint_quantization: tuple[str, ...] = ()  # `quant_method`s of pre-quantized checkpoints it reads

    def moe_layers(self, config) -> list[int]:
        return list(range(config.num_hidden_layers))

    def shape(self, config) -> MoEShape:
        moe_layers = tuple(self.moe_layers(config))
        return MoEShape(
            num_layers=len(moe_layers),
            num_experts=getattr(config, self.num_experts_attr),
            top_k=config.num_experts_per_tok,
            hidden_size=config.hidden_size,
            intermediate_size=getattr(config, self.intermediate_attr),
            moe_layers=moe_layers,
            expert_bias=self.expert_bias,
        )

    def layouts(self, config) -> tuple[ExpertKeys, ...]:
        return self.layout_list

    def is_expert_key(self, key: str, config) -> bool:
        return any(layout.matches(key) for layout in self.layouts(config))

    def dense_key(self, key: str) -> str:
        for pattern, replacement in self.renames:
            key = re.sub(pattern, replacement, key)
        return key

    def expert_fn(self, config) -> ExpertFn:
        return swiglu(ACT2FN[config.hidden_act])

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(model.model.layers)

    def moe_block(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.block)

    def router_view(self, layer: nn.Module) -> RouterView:
        router, norm = getattr(self.moe_block(layer), self.router), getattr(layer, self.norm)
        return RouterView(router.weight, getattr(router, "bias", None), norm.weight, getattr(norm, "bias", None))

    def guess_scores(self, config, layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        return softmax_scores

    def attention_linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        attn = layer.self_attn
        return {name: getattr(attn, name) for name in self.attention
                if isinstance(getattr(attn, name, None), nn.Linear)}
