"""Architecture adapters, one file per MoE family; `adapter_for(config)` picks one by model type."""

from __future__ import annotations

from .base import MoEAdapter, MoEShape
from .mixtral import MixtralAdapter

ADAPTERS: dict[str, MoEAdapter] = {adapter.model_type: adapter for adapter in (MixtralAdapter(),)}

__all__ = ["ADAPTERS", "MoEAdapter", "MoEShape", "adapter_for"]


def adapter_for(config) -> MoEAdapter:
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported architecture {model_type!r}: supported model types are {', '.join(ADAPTERS)}"
        )
    return ADAPTERS[model_type]
