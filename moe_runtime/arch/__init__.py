"""Architecture adapters, one file per MoE family; `adapter_for(config)` picks one by model type.

The adapters build on the core (`moe_runtime.types` and friends); the core never imports this package.
"""

from __future__ import annotations

from ..types import ExpertWeights, MoEShape, RouterView, dense_linear, swiglu
from . import deepseek, gpt_oss, granitemoe, mixtral, olmoe, phimoe, qwen_moe
from .base import MoEAdapter

ADAPTERS: dict[str, MoEAdapter] = {
    adapter.model_type: adapter
    for adapter in (mixtral.ADAPTER, qwen_moe.QWEN2_MOE, qwen_moe.QWEN3_MOE, olmoe.ADAPTER, phimoe.ADAPTER,
                    granitemoe.ADAPTER, deepseek.DEEPSEEK_V2, deepseek.DEEPSEEK_V3,
                    gpt_oss.ADAPTER)
}

__all__ = ["ADAPTERS", "ExpertWeights", "MoEAdapter", "MoEShape", "RouterView", "adapter_for", "dense_linear",
           "swiglu"]


def adapter_for(config) -> MoEAdapter:
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported architecture {model_type!r}: supported model types are {', '.join(sorted(ADAPTERS))}"
        )
    adapter = ADAPTERS[model_type]
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
        if str(method) not in adapter.checkpoint_quantization:
            readable = ", ".join(adapter.checkpoint_quantization) or "none"
            raise ValueError(f"the {model_type} checkpoint is pre-quantized with {method!r}, which is not supported "
                             f"(pre-quantized formats read for {model_type}: {readable}); use an unquantized "
                             "(bf16/fp16/fp32) checkpoint and expert_bits for quantization")
    return adapter
