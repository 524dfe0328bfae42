"""The model part of the benchmark: a real checkpoint decoded by every variant, and trace recording.

Every variant decodes the same tokens: a prefill of the first `prompt_tokens` tokens of a fixed text,
then one forward per token with the KV cache, each step fed the text's next token (teacher forcing),
so the routing is the same for all of them. accelerate's variant is transformers' own
`from_pretrained(device_map=..., offload_folder=...)` with every layer's experts on "disk" and the
rest on the CPU (the engine's split), its page cache dropped before every token.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

from .accelerate import TimedWeightsLoader, drop_page_cache
from .measure import Job, engine_knobs, loader_counters, no_counters, timed

# Hamlet III.1 (public domain): the fixed text every model variant decodes
TEXT = (
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n"
    "And by opposing end them. To die, to sleep;\nNo more; and by a sleep to say we end\n"
    "The heart-ache and the thousand natural shocks\nThat flesh is heir to: 'tis a consummation\n"
    "Devoutly to be wish'd. To die, to sleep;\nTo sleep, perchance to dream: ay, there's the rub;\n"
)
PROMPTS = ("ROMEO:\n", "First Citizen:\nBefore we proceed any further, hear me speak.\n", "KING HENRY:\n",
           "JULIET:\nO Romeo, Romeo!")


def bench_ids(tokenizer, count: int):
    """[1, count] token ids of the fixed text, repeated as needed: the tokenizer's special tokens
    (a BOS) only at the start, not again before every repeat."""
    import torch

    first = tokenizer(TEXT, return_tensors="pt")["input_ids"][0]
    again = tokenizer(TEXT, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    reps = -(-max(0, count - len(first)) // max(1, len(again)))
    return torch.cat([first] + [again] * reps)[:count][None]


def _decoder(model, ids, prompt_tokens: int):
    """step(i): one decode step feeding token prompt_tokens + i, after a prefill of the prompt."""
    state = {"past": model(ids[:, :prompt_tokens], use_cache=True).past_key_values}

    def step(i: int) -> None:
        pos = prompt_tokens + i
        state["past"] = model(ids[:, pos : pos + 1], past_key_values=state["past"], use_cache=True).past_key_values

    return step


def _experts_device_map(config, device) -> dict:
    """Everything on the compute device except every MoE layer's experts, which go to disk. Module
    names come from the model built on the meta device and its adapter (no hard-coded names)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..arch import adapter_for

    here = (device.index or 0) if device.type == "cuda" else "cpu"
    adapter = adapter_for(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    name_of = {id(module): name for name, module in model.named_modules()}
    offloaded = {name_of[id(adapter.moe_block(layer).experts)] for layer in adapter.layers(model)}
    device_map = {}
    for name, _ in [*model.named_parameters(), *model.named_buffers()]:
        owner = name.rsplit(".", 1)[0]
        experts = next((e for e in offloaded if owner == e or owner.startswith(e + ".")), None)
        device_map[experts or owner] = "disk" if experts else here
    return device_map


def _time_accelerate_loads(model):
    """Swap the loader behind every accelerate hook for one that counts seconds and bytes."""
    loader = None
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        weights_map = getattr(hook, "weights_map", None)
        if weights_map is None or not hasattr(weights_map, "dataset"):
            continue
        if loader is None:
            loader = TimedWeightsLoader(weights_map.dataset.save_folder, index=weights_map.dataset.index)
        weights_map.dataset = loader
    if loader is None:
        raise RuntimeError("accelerate placed no weights on disk: nothing would be offloaded")
    return loader


def run_model(job: Job):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .. import OffloadConfig, load
    from ..loading import resolve_dtype

    device = torch.device(job.device)
    tokenizer = AutoTokenizer.from_pretrained(job.model)
    ids = bench_ids(tokenizer, job.prompt_tokens + job.warmup + job.tokens + 1).to(device)
    facts = {"model": str(job.model), "expert_bits": job.expert_bits}
    if job.variant in ("transformers", "accelerate"):
        dtype = resolve_dtype("auto", device)
        if job.variant == "transformers":
            model = AutoModelForCausalLM.from_pretrained(job.model, dtype=dtype).to(device).eval()
            return timed(job, _decoder(model, ids, job.prompt_tokens), no_counters), facts
        Path(job.store_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=job.store_dir, prefix="accelerate-offload-") as folder:
            config = AutoConfig.from_pretrained(job.model)
            model = AutoModelForCausalLM.from_pretrained(job.model, dtype=dtype, offload_folder=folder,
                                                         device_map=_experts_device_map(config, device)).eval()
            loader = _time_accelerate_loads(model)
            step = _decoder(model, ids, job.prompt_tokens)
            return timed(job, step, lambda: loader_counters(loader), lambda: drop_page_cache(Path(folder))), facts
    probe = AutoConfig.from_pretrained(job.model)
    cache_size, prefetch = engine_knobs(job, probe.num_local_experts)
    # the disk-tier variants read every miss from disk (no host cache); lru+host puts every record
    # in the host-RAM cache after its first read
    config = OffloadConfig(device=job.device, offload="disk", cache_size=cache_size, prefetch=prefetch,
                           expert_bits=job.expert_bits, store_dir=job.store_dir, record_trace=False,
                           hqq_optimize=False, host_cache_gb="auto" if job.variant == "lru+host" else 0,
                           disk_prefetch_layers=0)
    engine = load(job.model, config)
    facts.update(cache_size=cache_size, prefetch=prefetch, direct_io=engine.tier.direct_io,
                 engine=engine.describe())
    try:
        if job.variant == "resident":
            for module in engine.experts:
                for expert in range(cache_size):
                    module.cache.acquire(expert)
                    module.cache.release(expert)
        before = None
        if job.variant == "no-cache":
            def before():
                for module in engine.experts:
                    module.cache.drain()
                    module.cache.clear()

        step = _decoder(engine.model, ids, job.prompt_tokens)
        return timed(job, step, engine.counters, before), facts
    finally:
        engine.close()


# --- recording a routing trace ------------------------------------------------------------------
def record_trace(model: str | Path, out: str | Path, decode_tokens: int = 400, max_new_tokens: int = 128,
                 seed: int = 0, temperature: float = 0.8, store_dir: str = "expert-store/bench") -> Path:
    """Sample replies to PROMPTS (cycling, a new seed each time) until `decode_tokens` were generated,
    and save the routing with the prefetcher's guesses. Replies that end early (end of a speech)
    just make room for the next prompt; the engine's cache persists across replies, as in a chat."""
    import torch

    from .. import GenerationSettings, OffloadConfig, load

    probe = json.loads((Path(model) / "config.json").read_text())
    engine = load(str(model), OffloadConfig(device="cpu", offload="ram", cache_size=probe["num_local_experts"],
                                            prefetch=2, store_dir=store_dir, record_trace=True))
    generated = 0
    try:
        with tqdm(total=decode_tokens, desc="recording routing", unit="tok") as bar:
            for i in range(4 * decode_tokens):  # a bound, should every reply be empty
                if generated >= decode_tokens:
                    break
                ids = engine.tokenizer(PROMPTS[i % len(PROMPTS)], return_tensors="pt")["input_ids"]
                settings = GenerationSettings(max_new_tokens=min(max_new_tokens, decode_tokens - generated),
                                              temperature=temperature, seed=seed + i)
                with torch.inference_mode():
                    *_, last = engine.stream(ids, settings)
                generated += last.new_tokens
                bar.update(last.new_tokens)
        trace = engine.stats().trace
    finally:
        engine.close()
    trace.model = Path(model).name
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return trace.save(out)
