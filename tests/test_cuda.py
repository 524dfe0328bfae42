"""CUDA paths: pinned host records, a side copy stream with events, slots reused in place.

Skipped without a GPU; run them wherever one is present (`python -m pytest -m cuda`).
"""

import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_runtime import OffloadConfig, load

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("offload", ["ram", "disk"])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_cuda_engine_matches_transformers(tiny_dir, tmp_path, offload, prefetch):
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).cuda().eval()
    engine = load(tiny_dir, OffloadConfig(device="cuda", dtype="float32", offload=offload, cache_size=1,
                                          prefetch=prefetch, store_dir=str(tmp_path)))
    try:
        ids = torch.randint(0, engine.model.config.vocab_size, (1, 9), device="cuda")
        with torch.no_grad():
            torch.testing.assert_close(engine.model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
        ours = engine.model.generate(ids, max_new_tokens=8, do_sample=False)
        assert torch.equal(ours, reference.generate(ids, max_new_tokens=8, do_sample=False))
    finally:
        engine.close()


def test_pinned_records_side_stream_and_slot_reuse(tiny_dir, tmp_path):
    engine = load(tiny_dir, OffloadConfig(device="cuda", offload="ram", cache_size=2, prefetch=2,
                                          store_dir=str(tmp_path)))
    try:
        assert all(r.is_pinned() for r in engine.tier.records)
        assert engine.transfer.stream is not None and engine.transfer.stream != torch.cuda.current_stream()
        pointers = [m.cache.slots.data_ptr() for m in engine.experts]
        assert all(m.cache.slots.device.type == "cuda" for m in engine.experts)
        ids = torch.randint(0, engine.model.config.vocab_size, (1, 5), device="cuda")
        engine.model.generate(ids, max_new_tokens=12, do_sample=False)
        assert [m.cache.slots.data_ptr() for m in engine.experts] == pointers  # no reallocation per token
        stats = engine.stats()
        assert sum(stats.misses) > 0 and sum(stats.hits) > 0
        assert all(len(m.cache.resident()) <= 2 for m in engine.experts)
    finally:
        engine.close()


def test_quantized_experts_on_cuda_in_half_precision(tiny_dir, tmp_path):
    engine = load(tiny_dir, OffloadConfig(device="cuda", offload="disk", cache_size=2, prefetch=1, expert_bits=4,
                                          expert_group_size=16, attn_bits=4, attn_group_size=16,
                                          store_dir=str(tmp_path)))
    try:
        ids = torch.randint(0, engine.model.config.vocab_size, (1, 6), device="cuda")
        logits = engine.model(ids).logits
        assert logits.dtype == torch.float16 and torch.isfinite(logits).all()
    finally:
        engine.close()


def _skip_bf16_below_sm80(dtype):
    """By compute capability (kernels.capability's rule), not torch.cuda.is_bf16_supported(), which is
    True on a T4 (bf16 emulated) though its tensor cores have no bf16."""
    from moe_runtime.kernels.capability import BF16_MIN_CAPABILITY

    if dtype == torch.bfloat16 and torch.cuda.get_device_capability() < BF16_MIN_CAPABILITY:
        pytest.skip(f"bf16 needs compute capability 8.0+, this GPU has {torch.cuda.get_device_capability()}")


def test_bf16_is_refused_below_sm80_and_taken_from_sm80():
    from moe_runtime.kernels.capability import BF16_MIN_CAPABILITY, choose_compute
    from moe_runtime.loading import resolve_dtype

    device = torch.device("cuda")
    if torch.cuda.get_device_capability() < BF16_MIN_CAPABILITY:
        with pytest.raises(ValueError, match=re.escape(torch.cuda.get_device_name())):
            resolve_dtype("bfloat16", device)
        assert choose_compute(device, "half").dtype == torch.float16
    else:
        assert resolve_dtype("bfloat16", device) == torch.bfloat16 == choose_compute(device, "half").dtype
    assert resolve_dtype("auto", device) == torch.float16


def _triton_record(bits, n, k, group, meta):
    from moe_runtime.kernels.triton_hqq import TRITON_HQQ
    from moe_runtime.quant import quantize_matrix

    tensors, info = quantize_matrix(torch.randn(n, k) * 0.02, bits, group, meta, optimize=False, device="cuda")
    tensors = {name: t.cuda() for name, t in tensors.items()}
    pieces = {name: t.cuda() for name, t in TRITON_HQQ.pack(tensors, info).items()}
    return tensors, info, pieces, TRITON_HQQ.weight(pieces, info)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("tokens", [1, 8, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("meta", [True, False])
def test_triton_record_form_matches_hqq_dequantize_on_cuda(bits, tokens, dtype, meta):
    """TRITON_HQQ's record on the GPU (the launch table's real configs, split-K where it applies)."""
    from moe_runtime.kernels import linear, reference_linear
    from moe_runtime.kernels.triton_hqq import TRITON_HQQ
    from moe_runtime.quant import dequantize_matrix

    _skip_bf16_below_sm80(dtype)
    hidden, inter = 512, 1792  # Mixtral's I = 3.5 H
    for n, k in ((inter, hidden), (hidden, inter)):
        tensors, info, pieces, weight = _triton_record(bits, n, k, 32, meta)
        assert torch.equal(TRITON_HQQ.reference(pieces, info, dtype), dequantize_matrix(tensors, info, dtype).reshape(n, k))
        x = torch.randn(tokens, k, device="cuda", dtype=dtype)
        reference = reference_linear(x.float(), tensors, info)
        torch.testing.assert_close(linear(x, weight).float(), reference, rtol=2e-2, atol=2e-2 * reference.abs().max().item())


@pytest.mark.parametrize("tokens", [1, 4])
def test_triton_split_k_on_cuda_equals_one_program_per_tile(tokens):
    """Mixtral's down_proj [4096, 14336] at decode: the table splits K over this GPU's SMs; the sum of
    the splits equals the unsplit kernel and hqq's dequantize + matmul."""
    from dataclasses import replace

    from moe_runtime.kernels import reference_linear
    from moe_runtime.kernels.capability import device_info
    from moe_runtime.kernels.triton_hqq import launch_config

    tensors, info, _, weight = _triton_record(2, 4096, 14336, 32, True)
    config = launch_config(tokens, 4096, 14336, device_info("cuda").sm_count)
    assert config.split_k > 1
    x = torch.randn(tokens, 14336, device="cuda", dtype=torch.float16)
    split, unsplit = weight.linear(x, config).float(), weight.linear(x, replace(config, split_k=1)).float()
    torch.testing.assert_close(split, unsplit, rtol=1e-2, atol=1e-2 * unsplit.abs().max().item())
    reference = reference_linear(x.float(), tensors, info)
    torch.testing.assert_close(split, reference, rtol=2e-2, atol=2e-2 * reference.abs().max().item())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("tokens", [1, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_hqq_kernel_matches_hqq_dequantize_on_cuda(bits, tokens, dtype):
    from moe_runtime.kernels import CUDA_FORMAT, choose_format, linear, reference_linear
    from moe_runtime.quant import ExpertCodec, quantize_matrix

    _skip_bf16_below_sm80(dtype)
    hidden, inter = 512, 1792  # Mixtral's I = 3.5 H
    group = 32 if bits <= 3 else 64
    weights = [torch.randn(inter, hidden) * 0.02, torch.randn(inter, hidden) * 0.02, torch.randn(hidden, inter) * 0.02]
    fmt = choose_format(bits, group, [(inter, hidden), (hidden, inter)], torch.device("cuda"))
    assert fmt is CUDA_FORMAT
    codec = ExpertCodec(hidden, inter, bits, group, True, dtype, optimize=False, fmt=fmt)
    record = codec.encode(*weights).cuda()  # the record as the store holds it: computed from as is
    x = {"gate": torch.randn(tokens, hidden, device="cuda", dtype=dtype),
         "down": torch.randn(tokens, inter, device="cuda", dtype=dtype)}
    packed = dict(zip(("gate", "up", "down"), codec.weights(record)))
    for name, w in (("gate", weights[0]), ("down", weights[2])):
        tensors, info = quantize_matrix(w, bits, group, True, optimize=False)  # hqq's own, apart from the codec
        reference = reference_linear(x[name].float().cpu(), tensors, info).cuda()
        torch.testing.assert_close(linear(x[name], packed[name]).float(), reference, rtol=2e-2,
                                   atol=2e-2 * reference.abs().max().item())


# --- the memory hierarchy on CUDA: device slots <- pinned host arena <- disk --------------------
def _single_tokens(engine, tokens: int, check):
    gen = torch.Generator().manual_seed(1)
    for _ in range(tokens):
        ids = torch.randint(0, engine.model.config.vocab_size, (1, 1), generator=gen).cuda()
        with torch.no_grad():
            engine.model(ids)
        torch.cuda.synchronize()
        check()
    return engine.stats().trace


@pytest.mark.parametrize("budget", ["some", "all"])
def test_hierarchy_on_cuda_is_exclusive_writes_back_and_matches_the_simulator(tiny_dir, tmp_path, budget):
    from moe_runtime.sim.hierarchy import simulate_hierarchy
    from moe_runtime.store import STAGING_BUFFERS

    probe = load(tiny_dir, OffloadConfig(device="cuda", dtype="float32", offload="disk", host_cache_gb=0,
                                         store_dir=str(tmp_path)))
    stride, layers, experts = probe.host_cache.stride, probe.shape.num_layers, probe.shape.num_experts
    probe.close()
    asked = layers + 1 if budget == "some" else layers * experts
    # the budget pins the arena and the disk tier's staging buffers (+ 1 byte against float rounding)
    gb = ((asked + STAGING_BUFFERS) * stride + 1) / 1e9
    engine = load(tiny_dir, OffloadConfig(device="cuda", dtype="float32", offload="disk", cache_size=1, prefetch=0,
                                          host_cache_gb=gb, disk_prefetch_layers=0, store_dir=str(tmp_path)))
    host, dev = engine.host_cache, engine.dev
    # exclusive levels never need more than every record off the device (L·(E − cache)) plus one
    # staging slot: a budget for all L·E records gets that many (host_cache.plan_host_memory)
    slots = min(asked, layers * (experts - 1) + 1)
    try:
        assert host.exclusive and host.arena.is_pinned() and host.slots == slots
        # cudaHostRegister'd at exactly the plan (the arena and the staging buffers), within the budget
        assert dev.pinned_bytes() == engine.host_plan.pinned_bytes <= engine.host_plan.budget_bytes
        levels = engine.describe()["levels"]
        assert levels["host"]["pinned"] and levels["host"]["exclusive"]

        def never_in_both():
            on_device = {(m.layer, e) for m in engine.experts for e in m.cache.resident()}
            assert not on_device & host.held()

        trace = _single_tokens(engine, 24, never_in_both)
        c = engine.counters()
        sim = simulate_hierarchy(trace, 1, slots, stride, exclusive=True)
        assert (c.hits, c.misses, c.host_hits, c.disk_reads) == (sim.hits, sim.misses, sim.host_hits, sim.disk_reads)
        assert c.write_back_bytes == [w * stride for w in sim.write_backs] and sum(c.write_back_bytes) > 0
        if budget == "all":
            assert sum(c.disk_reads) == sim.distinct_experts  # each expert read from disk once
    finally:
        engine.close()
    assert dev.pinned_bytes() == 0  # closing the engine unregistered it all


@pytest.mark.parametrize("prefetch", [0, 2])
def test_hierarchy_on_cuda_matches_transformers(tiny_dir, tmp_path, prefetch):
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).cuda().eval()
    engine = load(tiny_dir, OffloadConfig(device="cuda", dtype="float32", offload="disk", cache_size=1,
                                          prefetch=prefetch, host_cache_gb="auto", disk_prefetch_layers=2,
                                          store_dir=str(tmp_path)))
    try:
        assert engine.host_cache.exclusive
        ids = torch.randint(0, engine.model.config.vocab_size, (1, 9), device="cuda")
        for _ in range(2):  # cold, then through the warm host arena with write-backs
            with torch.no_grad():
                torch.testing.assert_close(engine.model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
        ours = engine.model.generate(ids, max_new_tokens=8, do_sample=False)
        assert torch.equal(ours, reference.generate(ids, max_new_tokens=8, do_sample=False))
        assert sum(engine.counters().write_back_bytes) > 0
    finally:
        engine.close()


@pytest.mark.parametrize("budget", ["none", "half", "all"])
def test_quantized_experts_on_cuda_convert_nothing_per_load_or_use(tmp_path, budget):
    """4-bit experts on CUDA through exclusive levels: the store holds the Triton kernel's records, a load
    is one copy (counted), nothing converts (0 bytes per load and use), and the logits equal transformers'
    model holding hqq's dequantization of the same experts."""
    from references import hqq_dequantized

    from tiny_models import save_tiny_mixtral

    tiny_dir = save_tiny_mixtral(tmp_path / "model", hidden=128, intermediate=256)  # Triton needs K % 64 == 0
    common = dict(device="cuda", offload="disk", cache_size=1, prefetch=1, expert_bits=4, expert_group_size=64,
                  hqq_optimize=False, store_dir=str(tmp_path))
    probe = load(tiny_dir, OffloadConfig(host_cache_gb=0, **common))
    stride, layers, experts = probe.host_cache.stride, probe.shape.num_layers, probe.shape.num_experts
    probe.close()
    if probe.experts[0].codec.form_name == "hqq":
        pytest.skip("no fused CUDA format here (the triton package is missing)")
    slots = {"none": 0, "half": layers * experts // 2, "all": layers * experts}[budget]
    engine = load(tiny_dir, OffloadConfig(host_cache_gb=slots * stride / 1e9, **common))
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float16).cuda().eval()
    with torch.no_grad():
        for layer in reference.model.layers:
            e = layer.mlp.experts
            for i in range(experts):
                e.gate_up_proj[i] = torch.cat([hqq_dequantized(w.float().cpu(), 4, 64, True, False).to(w)
                                               for w in e.gate_up_proj[i].chunk(2, dim=0)])
                e.down_proj[i] = hqq_dequantized(e.down_proj[i].float().cpu(), 4, 64, True, False).to(e.down_proj)
    try:
        ids = torch.randint(0, engine.model.config.vocab_size, (1, 7), device="cuda")
        for _ in range(2):
            with torch.no_grad():
                expected = reference(ids).logits
                torch.testing.assert_close(engine.model(ids).logits, expected, rtol=2e-2,
                                           atol=2e-2 * expected.abs().max().item())
        c = engine.counters()
        loads = sum(c.misses) + sum(c.prefetch_issued)
        assert sum(c.converted_bytes) == 0 and loads > 0
        assert sum(c.level_copy_bytes) == loads * engine.tier.nbytes  # one copy of the record per load
        if budget != "none":
            assert engine.host_cache.exclusive and sum(c.write_back_bytes) > 0
    finally:
        engine.close()


# --- moe_runtime/device.py on a real GPU: what the emulator (tests/test_device.py) stands in for ----
def test_cuda_device_pins_exactly_the_plan_and_releases_it():
    from moe_runtime.device import PAGE, CudaDevice, arena_pin_bytes

    dev = CudaDevice(torch.cuda.current_device())
    plan = arena_pin_bytes(3, 5 * PAGE + 4096)
    arena = dev.pin(plan)
    assert arena.numel() == plan and arena.is_pinned() and dev.pinned_bytes() == plan
    arena.copy_(torch.randint(0, 255, (plan,), dtype=torch.uint8))
    slot = dev.empty(plan)
    side = dev.new_stream()
    with dev.stream(side):
        dev.copy(slot, arena, non_blocking=True)
        event = dev.new_event()
        event.record()
    dev.current_stream().wait_event(event)
    back = dev.pin(plan)
    dev.copy(back, slot, non_blocking=True)
    dev.synchronize()
    assert torch.equal(back, arena)
    dev.unpin(arena)
    dev.unpin(back)
    assert dev.pinned_bytes() == 0


def test_cuda_engine_on_the_last_gpu_runs_there_from_any_thread(tiny_dir, tmp_path):
    """cuda:N (N > 0 where the machine has several GPUs): the prefetch worker, the host cache's I/O thread,
    the generate thread and the calling thread's forward all run on it; the caller's device is kept."""
    index = torch.cuda.device_count() - 1
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).to(f"cuda:{index}").eval()
    engine = load(tiny_dir, OffloadConfig(device=f"cuda:{index}", dtype="float32", offload="disk", cache_size=1,
                                          prefetch=2, store_dir=str(tmp_path)))
    try:
        before = torch.cuda.current_device()
        ids = torch.randint(0, engine.model.config.vocab_size, (1, 7), device=f"cuda:{index}")
        with torch.no_grad():
            torch.testing.assert_close(engine.model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
        assert torch.cuda.current_device() == before
        from moe_runtime.engine import GenerationSettings

        *_, last = engine.stream(ids, GenerationSettings(max_new_tokens=6, temperature=0))
        assert last.new_tokens == 6 and sum(engine.counters().prefetch_used) > 0
    finally:
        engine.close()


def test_cuda_device_threads_bind_to_the_engines_device():
    from moe_runtime.device import CudaDevice, device_executor, device_guard

    index = torch.cuda.device_count() - 1  # cuda:N with N > 0 where the machine has several GPUs
    dev = CudaDevice(index)
    with device_executor(dev, 1, "check") as pool:
        assert pool.submit(torch.cuda.current_device).result() == index
    before = torch.cuda.current_device()
    with device_guard(dev):
        assert torch.cuda.current_device() == index
    assert torch.cuda.current_device() == before
