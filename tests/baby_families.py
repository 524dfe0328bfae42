"""Baby checkpoints of every supported MoE family, written by transformers' own `save_pretrained`
(so the key layout is the hub's) in several shards, with random weights and a tiny tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf
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
    }


def save_baby(name: str, path: Path, seed: int = 0, max_shard_size: str = "40KB") -> Path:
    """Write the baby `name` model to `path` with transformers' save_pretrained; returns `path`."""
    torch.manual_seed(seed)
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
            for tensor in (view.bias, view.norm_bias):
                if tensor is not None:
                    tensor.normal_(0, 0.1)
    path = Path(path)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(path)
    return path
