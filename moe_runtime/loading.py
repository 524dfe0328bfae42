"""`load()`: from a checkpoint folder or hub id to a transformers model with offloaded experts.

Steps, each failing with a ValueError before any heavy work where it can:
  1. resolve the folder, read config.json, pick the architecture adapter, validate the settings;
  2. open the safetensors checkpoint (refusing pickles) and check every expert tensor is present;
  3. build the slow tier: the expert store on disk (built once, reused) and/or records in RAM;
  4. build the transformers model on the meta device, swap in the offloaded experts, then
     materialize only the dense part and fill it from the checkpoint;
  5. optionally HQQ-quantize attention; attach the tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from .arch import adapter_for
from .cache import ExpertCache, Transfer
from .checkpoint import Checkpoint, resolve_model_dir
from .config import OffloadConfig
from .engine import Engine
from .experts import OffloadedExperts, Speculator
from .policies import make_policy
from .quant import ExpertCodec, HQQLinear
from .stats import StatsCollector
from .store import DiskTier, RamTier, aligned_empty, open_store, round_up, store_folder, write_store

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} is not available: no CUDA GPU found; use 'cpu' or 'auto'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={name!r} is not available: {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def _read_config(model_dir: Path):
    if not (model_dir / "config.json").exists():
        raise ValueError(f"{model_dir} has no config.json: is it a model folder?")
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as err:
        raise ValueError(f"cannot read {model_dir / 'config.json'}: {err}") from None


class ExpertReader:
    """(gate, up, down) of one expert from either Mixtral checkpoint layout."""

    def __init__(self, checkpoint: Checkpoint, adapter, num_layers: int, num_experts: int) -> None:
        self.checkpoint, self.adapter = checkpoint, adapter
        missing = []
        self.fused = [False] * num_layers
        for layer in range(num_layers):
            fused_keys = adapter.fused_expert_keys(layer)
            if all(k in checkpoint for k in fused_keys):
                self.fused[layer] = True
                continue
            for expert in range(num_experts):
                missing += [k for k in adapter.original_expert_keys(layer, expert) if k not in checkpoint]
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise ValueError(f"checkpoint {checkpoint.model_dir} lacks expert tensors: {shown}")

    def __call__(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.fused[layer]:
            gate_up_key, down_key = self.adapter.fused_expert_keys(layer)
            gate_up = self.checkpoint.get_slice(gate_up_key, expert)  # [2I, H]
            gate, up = gate_up.chunk(2, dim=0)
            return gate, up, self.checkpoint.get_slice(down_key, expert)
        return tuple(self.checkpoint.get(k) for k in self.adapter.original_expert_keys(layer, expert))


def _build_tier(config: OffloadConfig, codec: ExpertCodec, shape, reader, model_dir: Path, model_name: str,
                checkpoint: Checkpoint, device: torch.device):
    pin = device.type == "cuda"
    if config.offload == "ram" and config.expert_bits is None:
        return RamTier.from_encoder(codec, shape.num_layers, shape.num_experts, reader, pin), None
    identity = {
        "config": json.loads((model_dir / "config.json").read_text()),
        "weights": checkpoint.fingerprint(),
        "expert_bits": config.expert_bits, "group_size": config.expert_group,
        "quantize_meta": config.quantize_meta, "hqq_optimize": config.hqq_optimize, "dtype": str(codec.dtype),
    }
    folder = store_folder(config.store_dir, model_name, identity)
    meta = open_store(folder, shape.num_layers, shape.num_experts, codec)
    if meta is None:
        write_store(folder, codec, shape.num_layers, shape.num_experts, reader, identity)
    stride = round_up(codec.nbytes)
    if config.offload == "ram":
        return RamTier.from_file(folder, shape.num_layers, shape.num_experts, stride, codec.nbytes, pin), folder
    return DiskTier(folder, shape.num_experts, stride, codec.nbytes, device), folder


def _build_model(hf_config, dtype: torch.dtype):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa")


def _load_dense(model, checkpoint: Checkpoint, adapter, device, dtype) -> None:
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    loaded = set()
    for key in checkpoint.keys():
        if adapter.is_expert_key(key):
            continue
        name = adapter.dense_key(key)
        target = params.get(name)
        if target is None:
            continue
        tensor = checkpoint.get(key)
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(f"checkpoint tensor {key} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(target.shape)}: config.json and weights do not match")
        with torch.no_grad():
            target.copy_(tensor.to(device=device, dtype=target.dtype))
        loaded.add(name)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
        loaded.add("lm_head.weight")
    missing = [n for n, _ in model.named_parameters() if n not in loaded]
    if missing:
        raise ValueError(f"checkpoint {checkpoint.model_dir} lacks tensors for: {', '.join(missing[:6])}")
    for module in model.modules():  # non-persistent buffers (rotary frequencies) are not in checkpoints
        if "RotaryEmbedding" in type(module).__name__:
            model._init_weights(module)


def _quantize_attention(model, adapter, config: OffloadConfig) -> None:
    layers = adapter.layers(model)
    for layer in tqdm(layers, desc=f"quantizing attention to {config.attn_bits} bits", unit="layer"):
        for name, linear in adapter.attention_linears(layer).items():
            setattr(layer.self_attn, name, HQQLinear(linear, config.attn_bits, config.attn_group_size,
                                                     config.quantize_meta, config.hqq_optimize))


def load(model: str | Path, config: OffloadConfig | None = None) -> Engine:
    """Load a Mixture-of-Experts checkpoint with its experts offloaded as `config` says."""
    config = config or OffloadConfig()
    config.validate()
    model_name = str(model)
    model_dir = resolve_model_dir(model_name)
    hf_config = _read_config(model_dir)
    adapter = adapter_for(hf_config)
    shape = adapter.shape(hf_config)
    config.validate_for_model(shape.num_experts, shape.top_k)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    checkpoint = Checkpoint(model_dir)
    reader = ExpertReader(checkpoint, adapter, shape.num_layers, shape.num_experts)
    codec = ExpertCodec(shape.hidden_size, shape.intermediate_size, config.expert_bits, config.expert_group,
                        config.quantize_meta, dtype, optimize=config.hqq_optimize, quant_device=str(device))
    if config.attn_bits is not None and (hf_config.hidden_size * shape.hidden_size) % config.attn_group_size:
        raise ValueError(f"attn_group_size={config.attn_group_size} does not divide the attention projections "
                         f"(hidden_size={hf_config.hidden_size}): use a smaller power of two")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as err:
        raise ValueError(f"cannot load the tokenizer of {model_dir}: {err}") from None

    tier, store_path = _build_tier(config, codec, shape, reader, model_dir, model_name, checkpoint, device)
    stats = StatsCollector(shape.num_layers, shape.num_experts, shape.top_k, config.cache_size,
                           config.prefetch, config.record_trace, model_name)
    transfer = Transfer(tier, device)

    hf_model = _build_model(hf_config, dtype)
    layers = adapter.layers(hf_model)
    stride = round_up(codec.nbytes)
    modules = []
    for index, layer in enumerate(layers):
        slots = aligned_empty(config.cache_size * stride, device).view(config.cache_size, stride)
        cache = ExpertCache(index, slots, codec.nbytes, make_policy(config.policy), transfer, stats)
        block = adapter.moe_block(layer)
        experts = OffloadedExperts(index, cache, codec, block.experts.act_fn, stats, shape.num_experts,
                                   shape.top_k, config.prefetch)
        block.experts = experts
        modules.append(experts)
    hf_model.to_empty(device=device)
    _load_dense(hf_model, checkpoint, adapter, device, dtype)
    for index in range(len(modules) - 1):
        speculator = Speculator(adapter.router_weight(layers[index + 1]).detach(),
                                adapter.moe_norm_weight(layers[index]).detach(),
                                adapter.moe_norm_weight(layers[index + 1]).detach(),
                                modules[index + 1].cache, config.prefetch)
        modules[index].speculator = speculator
        modules[index + 1].incoming = speculator
    if config.attn_bits is not None:
        _quantize_attention(hf_model, adapter, config)
    if (model_dir / "generation_config.json").exists():
        hf_model.generation_config = GenerationConfig.from_pretrained(model_dir)
    hf_model.eval()
    return Engine(hf_model, tokenizer, config, shape, device, model_name, modules, transfer, tier, stats,
                  store_path)
