"""Baby Mixtral checkpoints for the tests, written like real ones: transformers' `save_pretrained`
writes the hub's key layout (per-expert keys) and shards; layout="fused" writes the model's own
state dict (transformers 5's fused expert tensors) instead."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
TEXT = "To be, or not to be, that is the question. Whether 'tis nobler in the mind to suffer. " * 20


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_mixtral(path: Path, *, hidden=32, intermediate=48, layers=3, experts=4, top_k=2, heads=4,
                      kv_heads=2, shards=2, layout="original", seed=0, tie=False) -> Path:
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        num_local_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=256,
        tie_word_embeddings=tie, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = MixtralForCausalLM(config).float()
    with torch.no_grad():  # larger router weights than the init, so routing is far from uniform
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    if layout == "original":
        total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        model.save_pretrained(path, max_shard_size=total if shards == 1 else -(-total // shards))
        return path
    config.save_pretrained(path)
    state = {k: v for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}
    keys = sorted(state)
    if shards == 1:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i::shards]}
        save_file(part, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path
