"""Mixtral (8x7B, 8x22B): the hub's per-expert `block_sparse_moe.experts.E.w1/w2/w3` (w1 = gate,
w3 = up, w2 = down) or the fused `mlp.experts.gate_up_proj` / `down_proj` of transformers' modules."""

from __future__ import annotations

from .base import TRANSFORMERS_FUSED, Family, PerExpertKeys

EXPERT = "model.layers.{layer}.block_sparse_moe.experts.{expert}"

ADAPTER = Family(
    model_type="mixtral",
    hub_ids=("mistralai/Mixtral-8x7B-Instruct-v0.1", "mistralai/Mixtral-8x7B-v0.1",
             "mistralai/Mixtral-8x22B-Instruct-v0.1"),
    layout_list=(
        PerExpertKeys(f"{EXPERT}.w1.weight", f"{EXPERT}.w3.weight", f"{EXPERT}.w2.weight"),
        TRANSFORMERS_FUSED,
    ),
    renames=((r"\.block_sparse_moe\.", ".mlp."),),
)
