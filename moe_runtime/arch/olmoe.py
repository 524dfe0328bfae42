"""OLMoE (1B-7B: 64 experts, top-8): per-expert gate/up/down_proj keys, q/k norms in attention."""

from __future__ import annotations

from .base import TRANSFORMERS_FUSED, Family, PerExpertKeys

EXPERT = "model.layers.{layer}.mlp.experts.{expert}"

ADAPTER = Family(
    model_type="olmoe",
    hub_ids=("allenai/OLMoE-1B-7B-0924-Instruct", "allenai/OLMoE-1B-7B-0125-Instruct"),
    layout_list=(
        PerExpertKeys(f"{EXPERT}.gate_proj.weight", f"{EXPERT}.up_proj.weight", f"{EXPERT}.down_proj.weight"),
        TRANSFORMERS_FUSED,
    ),
    num_experts_attr="num_experts",
)
