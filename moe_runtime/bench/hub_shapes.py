"""The families' hub shapes as config dicts (transcribed from each repo's public config.json; no network).

`python -m moe_runtime.bench --shape NAME` builds a store of random weights in one of these shapes
(bench/shape.py). Only the fields that build the model are kept: token ids, training-only settings
(aux-loss coefficients, dropout) and `torch_dtype` are left out; each entry notes any other omission.
`tiny-olmoe` is not a hub model: a baby OLMoE for tests (seconds), with the int4 CPU kernel's
smallest matrix sizes.
"""

from __future__ import annotations

# name -> (hub repo the shape is copied from, config dict)
HUB_SHAPES: dict[str, tuple[str, dict]] = {
    "olmoe-1b-7b": ("allenai/OLMoE-1B-7B-0924", {
        "model_type": "olmoe", "architectures": ["OlmoeForCausalLM"], "hidden_size": 2048,
        "intermediate_size": 1024, "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
        "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False, "hidden_act": "silu",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "clip_qkv": None,
        "attention_bias": False, "initializer_range": 0.02, "tie_word_embeddings": False, "vocab_size": 50304}),
    "qwen3-30b-a3b": ("Qwen/Qwen3-30B-A3B", {
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 2048,
        "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, "hidden_act": "silu",
        "max_position_embeddings": 40960, "max_window_layers": 48, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "rope_scaling": None, "sliding_window": None, "use_sliding_window": False, "attention_bias": False,
        "initializer_range": 0.02, "tie_word_embeddings": False, "vocab_size": 151936}),
    "qwen1.5-moe-a2.7b": ("Qwen/Qwen1.5-MoE-A2.7B", {
        "model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"], "hidden_size": 2048,
        "intermediate_size": 5632, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
        "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 60,
        "num_experts_per_tok": 4, "decoder_sparse_step": 1, "norm_topk_prob": False, "hidden_act": "silu",
        "max_position_embeddings": 8192, "max_window_layers": 21, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "sliding_window": 32768, "use_sliding_window": False, "initializer_range": 0.02,
        "tie_word_embeddings": False, "vocab_size": 151936}),
    "mixtral-8x7b": ("mistralai/Mixtral-8x7B-v0.1", {
        "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "num_local_experts": 8, "num_experts_per_tok": 2, "hidden_act": "silu", "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None, "initializer_range": 0.02,
        "tie_word_embeddings": False, "vocab_size": 32000}),
    # rope_scaling (longrope, two lists of 64 factors) left out: it changes neither the shapes nor the
    # work per token at short contexts
    "phi-3.5-moe": ("microsoft/Phi-3.5-MoE-instruct", {
        "model_type": "phimoe", "architectures": ["PhiMoEForCausalLM"], "hidden_size": 4096,
        "intermediate_size": 6400, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "num_local_experts": 16, "num_experts_per_tok": 2, "hidden_act": "silu", "attention_bias": True,
        "lm_head_bias": True, "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 131072, "input_jitter_noise": 0.01,
        "router_jitter_noise": 0.01, "initializer_range": 0.02, "tie_word_embeddings": False, "vocab_size": 32064}),
    "deepseek-v2-lite": ("deepseek-ai/DeepSeek-V2-Lite", {
        "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "hidden_size": 2048,
        "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
        "num_attention_heads": 16, "num_key_value_heads": 16, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "n_group": 1, "topk_group": 1,
        "topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": False, "routed_scaling_factor": 1.0,
        "kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
        "rope_theta": 10000, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                                              "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                                              "type": "yarn"},
        "attention_bias": False, "initializer_range": 0.02, "tie_word_embeddings": False, "vocab_size": 102400}),
    # quantization_config (MXFP4 experts on the hub) left out: a store quantizes bf16 experts to expert_bits;
    # layer_types alternates sliding (128) and full attention, as on the hub
    "gpt-oss-20b": ("openai/gpt-oss-20b", {
        "model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "hidden_size": 2880,
        "intermediate_size": 2880, "num_hidden_layers": 24, "num_attention_heads": 64, "num_key_value_heads": 8,
        "head_dim": 64, "num_local_experts": 32, "num_experts_per_tok": 4, "experts_per_token": 4,
        "hidden_act": "silu", "attention_bias": True, "swiglu_limit": 7.0, "sliding_window": 128,
        "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
        "initial_context_length": 4096, "rms_norm_eps": 1e-05, "rope_theta": 150000,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                         "rope_type": "yarn", "truncate": False},
        "initializer_range": 0.02, "tie_word_embeddings": False, "vocab_size": 201088}),
    "tiny-olmoe": ("(none: a test shape)", {
        "model_type": "olmoe", "architectures": ["OlmoeForCausalLM"], "hidden_size": 128, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts": 8,
        "num_experts_per_tok": 2, "hidden_act": "silu", "max_position_embeddings": 256, "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0, "initializer_range": 0.02, "tie_word_embeddings": False, "vocab_size": 256,
        "pad_token_id": 1, "eos_token_id": 2}),
}


def hub_shape(name: str) -> tuple[str, dict]:
    """(hub repo, config dict) of a shape; ValueError naming the shapes there are."""
    if name not in HUB_SHAPES:
        raise ValueError(f"--shape {name!r} is not allowed: use one of {', '.join(HUB_SHAPES)}")
    repo, config = HUB_SHAPES[name]
    return repo, dict(config)
