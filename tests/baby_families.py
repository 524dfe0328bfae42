"""Baby checkpoints of every supported MoE family, written by transformers' own `save_pretrained`
(so the key layout is the hub's) in several shards, with random weights and a tiny tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers as tf
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from moe_runtime.arch import adapter_for
from tiny_models import tiny_tokenizer

VOCAB = 300  # tiny_tokenizer's size
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, num_experts_per_tok=2, tie_word_embeddings=False)
MLA = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4)


def family_configs() -> dict:
    """name -> transformers config of a baby model (3-4 layers, 4-8 experts, top-2)."""
    return {
        "mixtral": tf.MixtralConfig(**COMMON, num_hidden_layers=3, intermediate_size=24, num_local_experts=4),
        "qwen2_moe": tf.Qwen2MoeConfig(**COMMON, num_hidden_layers=4, intermediate_size=40, moe_intermediate_size=16,
                                       shared_expert_intermediate_size=24, num_experts=8, mlp_only_layers=[1],
                                       norm_topk_prob=False),
        "qwen3_moe": tf.Qwen3MoeConfig(**COMMON, num_hidden_layers=4, intermediate_size=40, moe_intermediate_size=16,
                                       num_experts=6, head_dim=8, decoder_sparse_step=2, norm_topk_prob=True),
        "olmoe": tf.OlmoeConfig(**COMMON, num_hidden_layers=3, intermediate_size=16, num_experts=8),
        "phimoe": tf.PhimoeConfig(**COMMON, num_hidden_layers=3, intermediate_size=16, num_local_experts=4),
        "granitemoe": tf.GraniteMoeConfig(**COMMON, num_hidden_layers=3, intermediate_size=16, num_local_experts=4,
                                          residual_multiplier=0.5, embedding_multiplier=2.0),
        "deepseek_v2": tf.DeepseekV2Config(**{**COMMON, **MLA}, num_hidden_layers=3, intermediate_size=40,
                                           moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
                                           first_k_dense_replace=1, q_lora_rank=None, n_group=4, topk_group=2,
                                           topk_method="group_limited_greedy", routed_scaling_factor=1.5),
        "deepseek_v3": tf.DeepseekV3Config(**{**COMMON, **MLA}, num_hidden_layers=3, intermediate_size=40,
                                           moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=2,
                                           first_k_dense_replace=1, q_lora_rank=12, n_group=4, topk_group=2,
                                           norm_topk_prob=True, routed_scaling_factor=2.5),
        "gpt_oss": tf.GptOssConfig(**COMMON, num_hidden_layers=3, intermediate_size=32, num_local_experts=4,
                                   head_dim=8, sliding_window=4, swiglu_limit=1.0),  # MXFP4 needs 32 | H, I
    }


def save_baby(name: str, path: Path, seed: int = 0, max_shard_size: str = "40KB") -> Path:
    """Write the baby `name` model to `path` with transformers' save_pretrained; returns `path`.

    "gpt_oss:mxfp4" is gpt-oss with its experts in the hub's MXFP4 layout (random codes and scales).
    """
    torch.manual_seed(seed)
    name, _, variant = name.partition(":")
    config = family_configs()[name]
    tokenizer = tiny_tokenizer()
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    adapter = adapter_for(config)
    layers = adapter.layers(model)
    with torch.no_grad():  # far from uniform routing, norms that differ between layers
        for i in adapter.shape(config).moe_layers:
            view = adapter.router_view(layers[i])
            view.weight.normal_(0, 0.5)
            view.norm_weight.uniform_(0.5, 1.5)
            correction = getattr(getattr(adapter.moe_block(layers[i]), "gate", None), "e_score_correction_bias", None)
            for tensor in (view.bias, view.norm_bias, correction):
                if tensor is not None:
                    tensor.normal_(0, 0.1)
    path = Path(path)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(path)
    if variant == "mxfp4":
        _to_mxfp4(path, config)
    return path


def _to_mxfp4(path: Path, config) -> None:
    """Replace gpt-oss's expert weights by random MXFP4 blocks and scales, as the hub stores them."""
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    experts, hidden, inter = config.num_local_experts, config.hidden_size, config.intermediate_size
    shapes = {"gate_up_proj": (experts, 2 * inter, hidden // 32), "down_proj": (experts, hidden, inter // 32)}
    for file in sorted(set(index["weight_map"].values())):
        tensors = load_file(path / file)
        for key in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
            del tensors[key], index["weight_map"][key]
            blocks_shape = shapes[key.rsplit(".", 1)[1]]
            tensors[f"{key}_blocks"] = torch.randint(0, 256, (*blocks_shape, 16), dtype=torch.uint8)
            tensors[f"{key}_scales"] = torch.randint(121, 126, blocks_shape, dtype=torch.uint8)  # 2^-6 .. 2^-2
            index["weight_map"].update({f"{key}_blocks": file, f"{key}_scales": file})
        save_file(tensors, path / file, metadata={"format": "pt"})
    index_file.write_text(json.dumps(index))
    config_file = path / "config.json"
    saved = json.loads(config_file.read_text())
    saved["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    config_file.write_text(json.dumps(saved, indent=1))
