"""Granite-MoE (granite-3.x-*-a*m): experts fused on the hub as `block_sparse_moe.input_linear.weight`
[E, 2I, H] (gate rows, then up) and `output_linear.weight` [E, H, I]; the router is `router.layer`."""

from __future__ import annotations

from .base import Family, FusedKeys

BLOCK = "model.layers.{layer}.block_sparse_moe"

ADAPTER = Family(
    model_type="granitemoe",
    hub_ids=("ibm-granite/granite-3.1-3b-a800m-instruct", "ibm-granite/granite-3.1-1b-a400m-instruct"),
    layout_list=(
        FusedKeys(f"{BLOCK}.input_linear.weight", f"{BLOCK}.output_linear.weight"),
        FusedKeys(f"{BLOCK}.experts.gate_up_proj", f"{BLOCK}.experts.down_proj"),
    ),
    block="block_sparse_moe",
    router="router",
    renames=((r"\.block_sparse_moe\.router\.layer\.weight$", ".block_sparse_moe.router.weight"),),
)
