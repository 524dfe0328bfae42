"""The types and small functions the whole core shares: one expert's weights, the expert function's
signature, the MoE shape, a router's view. A leaf: it imports only torch, so every module may import it
(the adapters in `arch/` build on it; the core never imports `arch/`).

Dimensions: H hidden size, I one expert's FFN size, E routed experts, T tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F


class ExpertWeights(NamedTuple):
    """One expert: gate, up [I, H], down [H, I]; biases gate_bias, up_bias [I], down_bias [H] or None."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


def dense_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ w.T (+ bias)` for a plain weight; the `linear` the expert functions get by default."""
    return F.linear(x, w, bias)


ExpertFn = Callable[[torch.Tensor, ExpertWeights, Callable], torch.Tensor]


def swiglu(act: Callable) -> ExpertFn:
    """down(act(gate x) * up x), each projection with its bias when the expert has one."""

    def expert_fn(x: torch.Tensor, w: ExpertWeights, linear=dense_linear) -> torch.Tensor:
        return linear(act(linear(x, w.gate, w.gate_bias)) * linear(x, w.up, w.up_bias), w.down, w.down_bias)

    return expert_fn


def softmax_scores(logits: torch.Tensor) -> torch.Tensor:
    """[T, E] router logits -> [T, E] routing probabilities (ranks experts as top-k of softmax does)."""
    return torch.softmax(logits.float(), dim=-1)


@dataclass(frozen=True)
class MoEShape:
    """`num_layers` counts MoE layers only: the engine, store, stats and traces index them 0..n-1;
    `moe_layers[i]` is MoE layer i's index among the decoder layers."""

    num_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    moe_layers: tuple[int, ...] = ()
    expert_bias: bool = False

    def __post_init__(self) -> None:
        if not self.moe_layers:
            object.__setattr__(self, "moe_layers", tuple(range(self.num_layers)))
        if len(self.moe_layers) != self.num_layers:
            raise ValueError(f"MoEShape: {len(self.moe_layers)} MoE layer indices for num_layers={self.num_layers}")


@dataclass(frozen=True)
class RouterView:
    """What the speculator needs of one MoE layer: its router (weight [E, H], bias [E] or None)
    and the norm applied to the residual stream right before the MoE block (weight, bias [H])."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    norm_weight: torch.Tensor
    norm_bias: torch.Tensor | None
