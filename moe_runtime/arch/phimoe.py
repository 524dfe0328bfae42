"""Phi-3.5-MoE: Mixtral's hub keys (`block_sparse_moe.experts.E.w1/w2/w3`, `block_sparse_moe.gate`)
under transformers' names `mlp.experts` / `mlp.router`; LayerNorm (with bias) before the MoE block,
which the speculator folds in; sparsemixer routing picks the top logits in eval mode."""

from __future__ import annotations

from .base import TRANSFORMERS_FUSED, Family, PerExpertKeys

EXPERT = "model.layers.{layer}.block_sparse_moe.experts.{expert}"

ADAPTER = Family(
    model_type="phimoe",
    hub_ids=("microsoft/Phi-3.5-MoE-instruct",),
    layout_list=(
        PerExpertKeys(f"{EXPERT}.w1.weight", f"{EXPERT}.w3.weight", f"{EXPERT}.w2.weight"),
        TRANSFORMERS_FUSED,
    ),
    router="router",
    renames=((r"\.block_sparse_moe\.", ".mlp."), (r"\.mlp\.gate\.weight$", ".mlp.router.weight")),
)
