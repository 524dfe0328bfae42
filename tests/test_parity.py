"""The offloaded engine is the same model as transformers' own from_pretrained of the folder."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_runtime import OffloadConfig, load
from tiny_models import save_tiny_mixtral

CONFIGS = {
    "gqa-4x2": dict(hidden=32, intermediate=48, layers=3, experts=4, top_k=2, heads=4, kv_heads=2, shards=2),
    "odd-8x2": dict(hidden=48, intermediate=40, layers=2, experts=8, top_k=2, heads=6, kv_heads=3, shards=3),
    "top1-2x1": dict(hidden=32, intermediate=32, layers=2, experts=2, top_k=1, heads=2, kv_heads=1, shards=1),
    "fused-3x2": dict(hidden=32, intermediate=24, layers=2, experts=3, top_k=2, heads=4, kv_heads=4, shards=2,
                      layout="fused"),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model_case(request, tmp_path_factory):
    spec = CONFIGS[request.param]
    path = save_tiny_mixtral(tmp_path_factory.mktemp(request.param) / "model", **spec)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, reference, spec


def _cache_sizes(spec):
    return sorted({1, spec["experts"] - 1 or 1})


@pytest.mark.parametrize("offload", ["ram", "disk"])
@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("which_cache", [0, 1])
def test_logits_and_greedy_tokens_match_transformers(model_case, offload, prefetch, which_cache, tmp_path):
    path, reference, spec = model_case
    sizes = _cache_sizes(spec)
    cache_size = sizes[min(which_cache, len(sizes) - 1)]
    config = OffloadConfig(device="cpu", offload=offload, cache_size=cache_size,
                           prefetch=min(prefetch, spec["experts"]), store_dir=str(tmp_path / "store"))
    engine = load(path, config)
    try:
        ids = torch.randint(0, engine.model.config.vocab_size, (2, 11))
        with torch.no_grad():
            torch.testing.assert_close(engine.model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
        prompt = ids[:1]
        ours = engine.model.generate(prompt, max_new_tokens=10, do_sample=False)
        theirs = reference.generate(prompt, max_new_tokens=10, do_sample=False)
        assert torch.equal(ours, theirs)
        stats = engine.stats()
        assert all(h + m == s for h, m, s in zip(stats.hits, stats.misses, stats.selections))
    finally:
        engine.close()


@pytest.mark.parametrize("host_budget", ["none", "half", "all"])
def test_the_gpus_exclusive_levels_on_cpu_tensors_match_transformers(model_case, host_budget, tmp_path):
    """The device level with its own slots and an exclusive host arena (CUDA's stacking, run here on CPU
    tensors; a CPU engine shares the arena instead): the same model as transformers' at every budget."""
    path, reference, spec = model_case
    probe = load(path, OffloadConfig(device="cpu", offload="disk", host_cache_gb=0, store_dir=str(tmp_path)))
    stride, records = probe.host_cache.stride, spec["layers"] * spec["experts"]
    probe.close()
    slots = {"none": 0, "half": records // 2, "all": records}[host_budget]
    engine = load(path, OffloadConfig(device="cpu", offload="disk", cache_size=1, prefetch=min(2, spec["experts"]),
                                      host_cache_gb=slots * stride / 1e9, store_dir=str(tmp_path)),
                  levels="exclusive")
    try:
        ids = torch.randint(0, engine.model.config.vocab_size, (2, 11))
        for _ in range(2):
            with torch.no_grad():
                torch.testing.assert_close(engine.model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
        c = engine.counters()
        assert sum(c.converted_bytes) == 0 and sum(c.level_copy_bytes) > 0
    finally:
        engine.close()


def _two_turns(model, first, second):
    out = model.generate(first, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    follow = torch.cat([out.sequences, second], dim=1)
    again = model.generate(follow, past_key_values=out.past_key_values, max_new_tokens=6, do_sample=False)
    return again


def test_two_turn_chat_reusing_kv_cache_matches(tiny_dir, tmp_path):
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    engine = load(tiny_dir, OffloadConfig(device="cpu", offload="disk", cache_size=1, prefetch=1,
                                          store_dir=str(tmp_path)))
    try:
        first = engine.chat_prompt([{"role": "user", "content": "To be or not"}])
        second = engine.tokenizer(" USER: nobler?\nASSISTANT:", return_tensors="pt")["input_ids"]
        assert torch.equal(_two_turns(engine.model, first, second), _two_turns(reference, first, second))
    finally:
        engine.close()


def test_streaming_chat_reports_tokens_and_hit_rate(tiny_dir, tmp_path):
    from moe_runtime import GenerationSettings

    engine = load(tiny_dir, OffloadConfig(device="cpu", cache_size=2, prefetch=2, store_dir=str(tmp_path)))
    try:
        updates = list(engine.chat([{"role": "user", "content": "Speak"}],
                                   GenerationSettings(max_new_tokens=8, temperature=0)))
        last = updates[-1]
        assert last.finished and last.finish_reason in ("length", "stop")
        assert 1 <= last.new_tokens <= 8
        assert 0.0 <= last.hit_rate <= 1.0
        stats = engine.stats()
        assert stats.tokens_generated == last.new_tokens - 1  # decode tokens after the first
        assert len(stats.token_times) == last.new_tokens
        assert stats.trace is not None and stats.trace.num_tokens == sum(stats.expert_counts[0]) // 2
        # greedy streaming equals greedy generate
        ids = engine.chat_prompt([{"role": "user", "content": "Speak"}])
        tokens = engine.model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
        assert last.text == engine.tokenizer.decode(tokens, skip_special_tokens=True)
    finally:
        engine.close()


def test_stream_reports_why_it_ended(tiny_dir, tmp_path):
    import threading

    from moe_runtime import GenerationSettings

    engine = load(tiny_dir, OffloadConfig(device="cpu", cache_size=2, store_dir=str(tmp_path)))
    try:
        messages = [{"role": "user", "content": "Speak"}]
        for _ in range(3):  # the end of generate races the end of the stream: never "cancelled"
            last = list(engine.chat(messages, GenerationSettings(max_new_tokens=3, temperature=0)))[-1]
            assert last.finish_reason in ("length", "stop")
        stop = threading.Event()
        stream = engine.chat(messages, GenerationSettings(max_new_tokens=50, temperature=0), stop)
        next(stream)
        stop.set()
        assert list(stream)[-1].finish_reason == "cancelled"
        stream = engine.chat(messages, GenerationSettings(max_new_tokens=50, temperature=0))
        next(stream)
        stream.close()  # an abandoned stream ends generation and frees the engine
        assert list(engine.chat(messages, GenerationSettings(max_new_tokens=2, temperature=0)))[-1].finished
    finally:
        engine.close()


def test_reset_waits_for_the_reply_in_progress(tiny_dir, tmp_path):
    import threading

    from moe_runtime import GenerationSettings

    engine = load(tiny_dir, OffloadConfig(device="cpu", cache_size=2, store_dir=str(tmp_path)))
    try:
        stream = engine.chat([{"role": "user", "content": "Speak"}], GenerationSettings(max_new_tokens=20))
        next(stream)
        resetter = threading.Thread(target=engine.reset_stats)
        resetter.start()
        resetter.join(0.2)
        assert resetter.is_alive()  # a reset mid-reply would split a token's layers in the trace
        list(stream)
        resetter.join(5)
        assert not resetter.is_alive() and engine.stats().trace_tokens == 0
    finally:
        engine.close()


@pytest.mark.parametrize("cache_size", [1, 3])
@pytest.mark.parametrize("offload", ["ram", "disk"])
def test_offloaded_experts_layer_equals_plain_reference_moe(tiny_dir, tmp_path, cache_size, offload):
    """One MoE layer through the cache, loads and prefetch == the plain computation over transformers'
    own weights of that layer, for random hidden states and random routing."""
    import torch.nn.functional as F

    from moe_runtime.experts import reference_moe
    from moe_runtime.types import ExpertWeights, swiglu

    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    engine = load(tiny_dir, OffloadConfig(device="cpu", offload=offload, cache_size=cache_size, prefetch=2,
                                          store_dir=str(tmp_path)))
    try:
        hidden_size, num_experts, top_k = engine.shape.hidden_size, engine.shape.num_experts, engine.shape.top_k
        for layer, module in enumerate(engine.experts):
            theirs = reference.model.layers[layer].mlp.experts  # gate_up_proj [E, 2I, H], down_proj [E, H, I]
            weights = [ExpertWeights(*theirs.gate_up_proj[e].chunk(2, dim=0), theirs.down_proj[e])
                       for e in range(num_experts)]
            hidden = torch.randn(7, hidden_size)  # [T, H]
            top_k_index = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(7)])  # [T, K]
            top_k_weights = torch.softmax(torch.randn(7, top_k), dim=-1)  # [T, K]
            with torch.no_grad():
                ours = module(hidden, top_k_index, top_k_weights)
                expected = reference_moe(hidden, top_k_index, top_k_weights, weights, swiglu(F.silu))
            torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    finally:
        engine.close()
