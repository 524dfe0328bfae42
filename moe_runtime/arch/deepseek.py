"""DeepSeek-V2 (incl. V2-Lite) and DeepSeek-V3-style models (Moonlight): MLA attention, the first
`first_k_dense_replace` layers dense, shared experts (resident, in the dense part), routed experts
of `moe_intermediate_size` under per-expert `mlp.experts.E.gate/up/down_proj` keys.

Routing is group-limited: experts form `n_group` groups and only the best `topk_group` groups are
eligible (V2 with topk_method "group_limited_greedy": groups ranked by their best softmax score;
V3: sigmoid scores plus the router's `e_score_correction_bias`, groups ranked by the sum of their
two best). The speculator's guess applies the same group limit to its scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import TRANSFORMERS_FUSED, Family, PerExpertKeys

EXPERT = "model.layers.{layer}.mlp.experts.{expert}"
LAYOUTS = (
    PerExpertKeys(f"{EXPERT}.gate_proj.weight", f"{EXPERT}.up_proj.weight", f"{EXPERT}.down_proj.weight"),
    TRANSFORMERS_FUSED,
)
# MLA: q_proj (no q LoRA, V2-Lite) or q_a_proj/q_b_proj; the compressed kv projections; o_proj
MLA_PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


def group_limited(scores: torch.Tensor, n_group: int, topk_group: int, group_score) -> torch.Tensor:
    """scores [T, E] with the experts outside each token's best `topk_group` groups set to 0."""
    tokens, experts = scores.shape
    groups = group_score(scores.view(tokens, n_group, experts // n_group))  # [T, n_group]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(topk_group, dim=-1).indices, True)
    return scores.masked_fill(~keep.repeat_interleave(experts // n_group, dim=1), 0.0)


@dataclass(frozen=True)
class DeepSeek(Family):
    def moe_layers(self, config) -> list[int]:
        return list(range(config.first_k_dense_replace, config.num_hidden_layers))


@dataclass(frozen=True)
class DeepSeekV2(DeepSeek):
    def guess_scores(self, config, layer: nn.Module):
        if config.topk_method != "group_limited_greedy":
            return super().guess_scores(config, layer)

        def scores(logits: torch.Tensor) -> torch.Tensor:
            probs = torch.softmax(logits.float(), dim=-1)
            return group_limited(probs, config.n_group, config.topk_group, lambda g: g.max(dim=-1).values)

        return scores


@dataclass(frozen=True)
class DeepSeekV3(DeepSeek):
    def guess_scores(self, config, layer: nn.Module):
        correction = self.moe_block(layer).gate.e_score_correction_bias.detach().float()  # [E]

        def scores(logits: torch.Tensor) -> torch.Tensor:
            choice = (torch.sigmoid(logits.float()) + correction).clamp(min=0)
            return group_limited(choice, config.n_group, config.topk_group, lambda g: g.topk(2, dim=-1).values.sum(-1))

        return scores


DEEPSEEK_V2 = DeepSeekV2(
    model_type="deepseek_v2",
    hub_ids=("deepseek-ai/DeepSeek-V2-Lite-Chat", "deepseek-ai/DeepSeek-V2-Lite"),
    layout_list=LAYOUTS, num_experts_attr="n_routed_experts", intermediate_attr="moe_intermediate_size",
    attention=MLA_PROJECTIONS,
)

DEEPSEEK_V3 = DeepSeekV3(
    model_type="deepseek_v3",
    # DeepSeek-V3/R1 on the hub are FP8 (refused: convert to bf16 first); Moonlight-16B-A3B is a bf16
    # deepseek_v3 but its tokenizer needs remote code, which is never enabled here
    hub_ids=(),
    layout_list=LAYOUTS, num_experts_attr="n_routed_experts", intermediate_attr="moe_intermediate_size",
    attention=MLA_PROJECTIONS,
)
