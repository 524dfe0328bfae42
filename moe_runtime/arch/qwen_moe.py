"""Qwen1.5/2-MoE (a shared expert with a sigmoid gate) and Qwen3-MoE (no shared expert).

Not every layer is MoE: layer i is MoE when it is not in `mlp_only_layers` and
(i + 1) % `decoder_sparse_step` == 0; the others have a dense MLP (intermediate_size), which stays
in the dense part like the shared expert. A routed expert's size is `moe_intermediate_size`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import TRANSFORMERS_FUSED, Family, PerExpertKeys

EXPERT = "model.layers.{layer}.mlp.experts.{expert}"
LAYOUTS = (
    PerExpertKeys(f"{EXPERT}.gate_proj.weight", f"{EXPERT}.up_proj.weight", f"{EXPERT}.down_proj.weight"),
    TRANSFORMERS_FUSED,
)


@dataclass(frozen=True)
class QwenMoE(Family):
    def moe_layers(self, config) -> list[int]:
        step, dense = config.decoder_sparse_step, set(config.mlp_only_layers or ())
        return [i for i in range(config.num_hidden_layers)
                if i not in dense and config.num_experts > 0 and (i + 1) % step == 0]


QWEN2_MOE = QwenMoE(
    model_type="qwen2_moe",
    hub_ids=("Qwen/Qwen1.5-MoE-A2.7B-Chat", "Qwen/Qwen2-57B-A14B-Instruct"),
    layout_list=LAYOUTS, num_experts_attr="num_experts", intermediate_attr="moe_intermediate_size",
)

QWEN3_MOE = QwenMoE(
    model_type="qwen3_moe",
    hub_ids=("Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-235B-A22B"),
    layout_list=LAYOUTS, num_experts_attr="num_experts", intermediate_attr="moe_intermediate_size",
)
