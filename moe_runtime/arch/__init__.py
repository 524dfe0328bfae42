"""Architecture adapters, one file per MoE family; `adapter_for(config)` picks one by model type."""

from __future__ import annotations

from . import granitemoe, mixtral, olmoe, phimoe, qwen_moe
from .base import ExpertWeights, MoEAdapter, MoEShape, RouterView, dense_linear, swiglu

ADAPTERS: dict[str, MoEAdapter] = {
    adapter.model_type: adapter
    for adapter in (mixtral.ADAPTER, qwen_moe.QWEN2_MOE, qwen_moe.QWEN3_MOE, olmoe.ADAPTER, phimoe.ADAPTER,
                    granitemoe.ADAPTER)
}

__all__ = ["ADAPTERS", "ExpertWeights", "MoEAdapter", "MoEShape", "RouterView", "adapter_for", "dense_linear",
           "swiglu"]


def adapter_for(config) -> MoEAdapter:
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported architecture {model_type!r}: supported model types are {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]
