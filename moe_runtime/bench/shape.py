"""A hub-shaped full model of random weights, measured as a user would run it (`--shape NAME`).

Decode speed does not depend on the weights' values, so no checkpoint is needed: the store is written
straight in the target's record form (the codec of `loading.expert_codec`, as `load` computes it for the
device) beside a dense part of random tensors in the compute dtype, the shape's config.json and a
word-level tokenizer over its vocabulary (token i is "<i>"), which make the folder a store model that
`moe_runtime.load(folder)` opens like any other (store/model.py).

Expert records: a pool of distinct experts, each random matrices (normal, std = the config's
initializer_range) quantized by `ExpertCodec.encode` with round-to-nearest (no HQQ optimizer) into the
target's form; record (layer, expert) is pool[(layer * E + expert) % P]. Every record is then a real
record of that form (codes, scales and zeros as the codec lays them out) at the cost of P encodes, not
L * E (Qwen3-30B-A3B: 6,144 experts, ~0.4 s each on this CPU). Dense part: norm weights 1, biases 0,
every other tensor normal with the initializer's std, in the compute dtype.

The run (`run_shape`) loads the folder with `moe_runtime.load` and decodes with the KV cache, each step
fed the next token of a fixed random sequence (teacher forcing, the same tokens for every variant).
Routing, which decides what a partial budget misses, is not a trained model's either way (`ROUTINGS`):
"model" keeps what the random routers choose, which barely changes from token to token (random attention
averages the context into a residual stream much the same for every token: a cache's best case);
"uniform" replaces each MoE layer's choice, before the experts run, by top_k experts drawn uniformly
at random for every token (no locality at all: the worst case; the speculator still guesses from the
random routers, so its prefetches miss).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from .hub_shapes import hub_shape
from .measure import Job, timed
from .model import _decoder

ROUTINGS = ("model", "uniform")
POOL_BYTES = 256 << 20  # distinct expert records made (at most 16)
GB = 1e9
RUNTIME_OVERHEAD_BYTES = 1 << 30  # Python, torch and transformers with a model built, before any weight
# the hub checkpoints' dtype and the int4 CPU kernel's; "auto" on a CPU is float32, which doubles the dense part
DTYPE = "bfloat16"


def hf_config(name: str):
    """The transformers config of a shape (from its dict; no file, no network)."""
    from transformers import AutoConfig

    _, config = hub_shape(name)
    return AutoConfig.for_model(config.pop("model_type"), **config)


def _codec(hf, bits: int | None, device: torch.device):
    from ..arch import adapter_for
    from ..config import OffloadConfig
    from ..loading import expert_codec, resolve_dtype

    shape = adapter_for(hf).shape(hf)
    config = OffloadConfig(device=str(device), expert_bits=bits, hqq_optimize=False, dtype=DTYPE)
    dtype = resolve_dtype(DTYPE, device)
    return shape, config, expert_codec(shape, config, device, dtype)


def dense_tensors(model, adapter, shape) -> dict[str, tuple[tuple[int, ...], str]]:
    """Parameter name -> (shape, init: "ones", "zeros" or "normal") of every dense parameter of a model
    built on the meta device: all but the MoE layers' experts (tied weights once)."""
    layers = adapter.layers(model)
    experts = {id(adapter.moe_block(layers[i]).experts) for i in shape.moe_layers}
    skip = tuple(f"{name}." for name, module in model.named_modules() if id(module) in experts)
    found = {}
    seen = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if name.startswith(skip) or id(param) in seen:
                continue
            seen.add(id(param))
            norm = "norm" in type(module).__name__.lower()
            init = "zeros" if param_name.endswith("bias") else "ones" if norm else "normal"
            found[name] = (tuple(param.shape), init)
    return found


def _random(shape: tuple[int, ...], init: str, dtype: torch.dtype, std: float, gen: torch.Generator) -> torch.Tensor:
    if init == "ones":
        return torch.ones(shape, dtype=dtype)
    if init == "zeros":
        return torch.zeros(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=gen)


def expert_pool(codec, shape, std: float, seed: int) -> list[torch.Tensor]:
    """P distinct records (uint8 [stride]): random matrices encoded by the codec, round-to-nearest."""
    from ..store import round_up

    stride = round_up(codec.nbytes)
    count = max(1, min(16, POOL_BYTES // stride, shape.num_layers * shape.num_experts))
    gen = torch.Generator().manual_seed(seed)
    inter, hidden = shape.intermediate_size, shape.hidden_size
    pool = []
    for _ in range(count):
        weights = [torch.randn(s, generator=gen).mul_(std) for s in ((inter, hidden), (inter, hidden), (hidden, inter))]
        if shape.expert_bias:
            weights += [torch.zeros(inter), torch.zeros(inter), torch.zeros(hidden)]
        record = torch.zeros(stride, dtype=torch.uint8)
        codec.encode(*weights, out=record)
        pool.append(record)
    return pool


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer over the model's vocabulary: token i is "<i>", words split on whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<0>").save_pretrained(folder)


def build_shape_store(name: str, bits: int | None, store_dir: str | Path, device: str = "cpu",
                      seed: int = 0) -> tuple[Path, dict]:
    """(folder, facts) of the random-weight store model of shape `name` with `bits`-bit experts (None:
    16-bit), built once and reused while complete (store.open_store checks it)."""
    from ..arch import adapter_for
    from ..loading import _build_model
    from ..store import StoreWriter, open_store, round_up, store_folder
    from ..store.model import is_store_model, package, settings_of

    repo, config_dict = hub_shape(name)
    hf = hf_config(name)
    target = torch.device(device)
    shape, config, codec = _codec(hf, bits, target)
    identity = {"shape": name, "config": config_dict, "bits": bits, "group_size": config.expert_group,
                "quantize_meta": config.quantize_meta, "optimize": False, "form": codec.form_name,
                "dtype": str(codec.dtype), "seed": seed, "pool_bytes": POOL_BYTES}
    folder = store_folder(store_dir, f"{name}-random", identity)
    facts = {"shape": name, "hub_repo": repo, "layers": shape.num_layers, "experts": shape.num_experts,
             "top_k": shape.top_k, "hidden": shape.hidden_size, "intermediate": shape.intermediate_size,
             "bits": bits, "group_size": config.expert_group if bits else None, "form": codec.form_name,
             "expert_bytes": codec.nbytes, "stride": round_up(codec.nbytes), "store_folder": str(folder)}
    started = time.perf_counter()
    if not (is_store_model(folder) and open_store(folder, shape.num_layers, shape.num_experts, codec, dense=True)):
        adapter = adapter_for(hf)
        model = _build_model(hf, codec.dtype, adapter.attn_implementation)  # meta: names and shapes only
        dense = dense_tensors(model, adapter, shape)
        std = getattr(hf, "initializer_range", 0.02)
        writer = StoreWriter(folder, codec, shape.num_layers, shape.num_experts, identity, list(dense))
        try:
            gen = torch.Generator().manual_seed(seed + 1)
            for tensor_name, (tensor_shape, init) in dense.items():
                writer.put_dense(tensor_name, _random(tensor_shape, init, codec.dtype, std, gen))
            pool = expert_pool(codec, shape, std, seed)
            for layer in range(shape.num_layers):
                for expert in range(shape.num_experts):
                    writer.put_record(layer, expert, pool[(layer * shape.num_experts + expert) % len(pool)])
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        with tempfile.TemporaryDirectory() as tmp:  # the model's small files, copied in by package()
            (Path(tmp) / "config.json").write_text(json.dumps({**config_dict, "torch_dtype": DTYPE}, indent=1))
            write_tokenizer(Path(tmp), hf.vocab_size)
            source = {"path": f"random weights in the shape of {repo}",
                      "identity": {"derived_from": f"random weights (seed {seed}) in the shape of {repo}"}}
            package(folder, Path(tmp), source, settings_of(config, codec.dtype))
        facts["build_seconds"] = round(time.perf_counter() - started, 1)
    facts["store_bytes"] = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    facts["dense_bytes"] = (folder / "dense.safetensors").stat().st_size
    return folder, facts


def variant_settings(variant: str, experts: int, top_k: int, layers: int, stride: int, cache_size: int,
                     prefetch: int) -> dict:
    """OffloadConfig fields of a shape variant: every expert in RAM, or the disk store under a host budget
    of a share of the experts (cache_size at least top_k: one token's experts pinned per layer)."""
    if variant == "resident":
        return {"offload": "ram", "cache_size": experts, "prefetch": 0}
    shares = {"lru+host": 1.0, "lru+host-half": 0.5, "lru+host-quarter": 0.25}
    if variant not in shares:
        raise ValueError(f"the shape part has no variant {variant!r}: use resident, {', '.join(shares)}")
    records = int(layers * experts * shares[variant])
    # half a record over the budget's bytes: GB -> bytes rounding keeps exactly `records` slots
    return {"offload": "disk", "host_cache_gb": (records * stride + stride // 2) / GB,
            "cache_size": max(cache_size, top_k), "prefetch": prefetch}


def predicted_bytes(settings: dict, facts: dict) -> int:
    """RAM the variant needs at most: the dense part, the expert records it may hold, the runtime."""
    records = facts["layers"] * facts["experts"]
    if settings["offload"] == "disk":
        held = int(settings["host_cache_gb"] * GB) // facts["stride"] + facts["layers"] * settings["cache_size"]
        records = min(records, held)
    return facts["dense_bytes"] + records * facts["stride"] + RUNTIME_OVERHEAD_BYTES


def draw_uniform_routing(modules, num_experts: int, seed: int = 0) -> None:
    """Make every offloaded experts module compute top_k experts drawn uniformly for each token (distinct,
    weights 1/top_k), in place of the router's choice: a pre-hook on its (hidden_states, top_k_index,
    top_k_weights) call. One generator, so every variant draws the same experts for the same steps."""
    gen = torch.Generator().manual_seed(seed)

    def hook(module, args, kwargs):
        hidden_states, index, weights = (*args, *kwargs.values())  # as the MoE block passes them
        tokens, top_k = index.shape
        drawn = torch.rand(tokens, num_experts, generator=gen).argsort(dim=-1)[:, :top_k]  # [T, K]
        return (hidden_states, drawn.to(index), torch.full_like(weights, 1.0 / top_k)), {}

    for module in modules:
        module.register_forward_pre_hook(hook, with_kwargs=True)


def run_shape(job: Job):
    """Build (or reuse) the shape's store, load it with the variant's settings, decode: (measured, facts)."""
    from .. import OffloadConfig, load

    folder, facts = build_shape_store(job.shape, job.expert_bits, job.store_dir, job.device)
    settings = variant_settings(job.variant, facts["experts"], facts["top_k"], facts["layers"], facts["stride"],
                                job.cache_size, job.prefetch)
    need = predicted_bytes(settings, facts)
    facts.update(settings=settings, predicted_rss_bytes=need)
    if job.max_rss_gb is not None and need > job.max_rss_gb * GB:
        raise ValueError(f"{job.shape} {job.variant} does not fit --max-rss-gb {job.max_rss_gb:g}: it needs "
                         f"~{need / GB:.1f} GB (dense part {facts['dense_bytes'] / GB:.2f} GB + expert records "
                         f"{(need - facts['dense_bytes'] - RUNTIME_OVERHEAD_BYTES) / GB:.2f} GB + "
                         f"{RUNTIME_OVERHEAD_BYTES / GB:.1f} GB runtime)")
    config = OffloadConfig(device=job.device, expert_bits=job.expert_bits, hqq_optimize=False, dtype=DTYPE,
                           attn_bits=job.attn_bits, store_dir=job.store_dir, record_trace=False, **settings)
    started = time.perf_counter()
    engine = load(folder, config)
    facts.update(load_seconds=round(time.perf_counter() - started, 1), engine=engine.describe())
    try:
        if job.variant == "resident":
            for module in engine.experts:
                for expert in range(facts["experts"]):
                    module.cache.acquire(expert)
                    module.cache.release(expert)
        if job.routing == "uniform":
            draw_uniform_routing(engine.experts, facts["experts"])
        facts.update(routing=job.routing, attn_bits=job.attn_bits)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, engine.model.config.vocab_size, (1, job.prompt_tokens + job.warmup + job.tokens + 1),
                            generator=gen).to(job.device)
        return timed(job, _decoder(engine.model, ids, job.prompt_tokens), engine.counters), facts
    finally:
        engine.close()
