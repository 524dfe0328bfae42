"""HQQ-quantized experts and attention equal transformers' model holding hqq's own dequantized weights."""

import json
import shutil

import pytest
import torch
from references import hqq_dequantized, hqq_linear_dequantized
from transformers import AutoModelForCausalLM

from moe_runtime import OffloadConfig, load
from moe_runtime.checkpoint import read_weight_map
from moe_runtime.quant import ExpertCodec
from moe_runtime.store import STORE_META, aligned_empty, read_meta, store_folder
from tiny_models import save_tiny_mixtral


@pytest.fixture(scope="module")
def mid_dir(tmp_path_factory):
    return save_tiny_mixtral(tmp_path_factory.mktemp("mid") / "model", hidden=128, intermediate=256, layers=2,
                             experts=4, heads=4, kv_heads=2, shards=2)


def _dequantized_reference(path, engine, quantize_meta: bool):
    """transformers' model of the folder, its experts (and quantized attention) replaced by hqq's dequantized
    weights; the engine's store, codec and cache are not involved."""
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    config = engine.config
    opt = config.hqq_optimize
    with torch.no_grad():
        for layer in reference.model.layers:
            experts = layer.mlp.experts  # gate_up_proj [E, 2I, H], down_proj [E, H, I]
            for e in range(engine.shape.num_experts):
                if quantize_meta:
                    gate_up = torch.cat([hqq_dequantized(w, config.expert_bits, config.expert_group, True, opt)
                                         for w in experts.gate_up_proj[e].chunk(2, dim=0)])
                    down = hqq_dequantized(experts.down_proj[e], config.expert_bits, config.expert_group, True, opt)
                else:
                    gate_up = torch.cat([hqq_linear_dequantized(w, config.expert_bits, config.expert_group)
                                         for w in experts.gate_up_proj[e].chunk(2, dim=0)])
                    down = hqq_linear_dequantized(experts.down_proj[e], config.expert_bits, config.expert_group)
                experts.gate_up_proj[e], experts.down_proj[e] = gate_up, down
            if config.attn_bits is not None:
                for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    weight = getattr(layer.self_attn, name).weight
                    weight.copy_(hqq_dequantized(weight, config.attn_bits, config.attn_group_size, quantize_meta, opt))
    return reference


# HQQ's optimizer is slow on a CPU: most rows quantize by round-to-nearest (the same format); without meta
# quantization the reference is hqq's HQQLinear, which always optimizes
@pytest.mark.parametrize("bits,attn_bits,quantize_meta,optimize", [
    (4, None, True, True), (2, None, True, False), (3, 4, True, False), (8, 8, True, False), (2, 4, False, True),
])
def test_quantized_engine_matches_hqq_dequantized_reference(mid_dir, tmp_path, bits, attn_bits, quantize_meta,
                                                            optimize):
    engine = load(mid_dir, OffloadConfig(device="cpu", offload="disk", cache_size=2, prefetch=1, expert_bits=bits,
                                         attn_bits=attn_bits, quantize_meta=quantize_meta, hqq_optimize=optimize,
                                         store_dir=str(tmp_path)))
    try:
        assert engine.experts[0].codec.form_name == "int4-cpu"  # the fused kernel's records, not hqq's pieces
        if attn_bits is not None:
            assert engine.model.model.layers[0].self_attn.q_proj.kind == "int4-cpu"
        reference = _dequantized_reference(mid_dir, engine, quantize_meta)
        ids = torch.randint(0, engine.model.config.vocab_size, (1, 9))
        with torch.no_grad():
            ours, theirs = engine.model(ids).logits, reference(ids).logits
        # the fused int4 CPU kernel computes in bf16: a bf16 tolerance
        torch.testing.assert_close(ours, theirs, rtol=1e-2, atol=1e-2 * theirs.abs().max().item())
    finally:
        engine.close()


def test_four_bit_store_is_under_three_tenths_of_fp16(mid_dir, tmp_path):
    engine = load(mid_dir, OffloadConfig(device="cpu", offload="disk", cache_size=1, expert_bits=4,
                                         store_dir=str(tmp_path)))
    try:
        shape = engine.shape
        fp16_bytes = shape.num_layers * shape.num_experts * 3 * shape.hidden_size * shape.intermediate_size * 2
        store_bytes = (engine.store_path / "experts.safetensors").stat().st_size
        assert store_bytes <= 0.3 * fp16_bytes, store_bytes / fp16_bytes
    finally:
        engine.close()


def test_store_is_reused_on_next_start(mid_dir, tmp_path):
    config = OffloadConfig(device="cpu", offload="disk", cache_size=1, expert_bits=2, store_dir=str(tmp_path))
    first = load(mid_dir, config)
    first.close()
    store = first.store_path / "experts.safetensors"
    stamp = store.stat().st_mtime_ns
    second = load(mid_dir, config)
    second.close()
    assert second.store_path == first.store_path and store.stat().st_mtime_ns == stamp
    other = load(mid_dir, OffloadConfig(device="cpu", offload="disk", cache_size=1, expert_bits=3,
                                        store_dir=str(tmp_path)))
    other.close()
    assert other.store_path != first.store_path  # keyed by quant settings


def test_codec_round_trip_and_error_shrinks_with_bits():
    torch.manual_seed(0)
    weights = (torch.randn(64, 32), torch.randn(64, 32), torch.randn(32, 64))
    errors = []
    for bits in (2, 3, 4, 8):
        codec = ExpertCodec(32, 64, bits, 16, True, torch.float32)
        decoded = codec.decode(codec.encode(*weights))
        errors.append(max(((d - w).abs().mean() / w.abs().mean()).item() for d, w in zip(decoded, weights)))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.02
    plain = ExpertCodec(32, 64, None, 16, True, torch.float32)
    for d, w in zip(plain.decode(plain.encode(*weights)), weights):
        assert torch.equal(d, w)


@pytest.mark.parametrize("offload", ["ram", "disk"])
def test_records_are_the_compute_form_and_computed_where_they_lie(mid_dir, tmp_path, offload):
    """On a CPU the store holds the int4 kernel's records; a slot is a view of the record in the host
    arena (or the RAM tier): nothing is converted and nothing copied between RAM levels."""
    engine = load(mid_dir, OffloadConfig(device="cpu", offload=offload, cache_size=2, prefetch=2, expert_bits=2,
                                         store_dir=str(tmp_path)))
    try:
        with torch.no_grad():
            engine.model(torch.randint(0, 300, (1, 9)))
        stats, info = engine.stats(), engine.describe()
        loads = sum(stats.misses) + sum(stats.prefetch_issued)
        assert loads and sum(stats.bytes_moved) == loads * info["expert_bytes"]
        assert info["expert_form"] == "int4-cpu"
        assert sum(stats.converted_bytes) == 0 and sum(stats.level_copy_bytes) == 0
        tier = engine.tier
        for module in engine.experts:
            assert module.cache.slots is None  # no device slot pool: the layer computes from the tier's records
            for expert in module.cache.resident():
                view = module.cache._slot_bytes(module.cache.slot_of[expert])
                held = tier.arena if offload == "disk" else tier.records[module.layer]
                assert held.data_ptr() <= view.data_ptr() < held.data_ptr() + held.numel()
    finally:
        engine.close()


def test_a_store_of_the_previous_version_is_detected_removed_and_rebuilt(mid_dir, tmp_path):
    """Store version 2 (hqq records converted at run time, its folder keyed without the form): the next
    load warns, naming it, removes it and builds the version 3 store in the device's form."""
    config = OffloadConfig(device="cpu", offload="disk", cache_size=1, expert_bits=2, store_dir=str(tmp_path))
    engine = load(mid_dir, config)
    engine.close()
    new = engine.store_path
    # what the previous version left: its store under the name it computed (the identity without the form)
    meta = read_meta(new)
    identity = {k: v for k, v in meta["identity"].items() if k != "form"}
    identity["weights"] = read_weight_map(mid_dir).identity  # version 2 named weights by file sizes / the index
    old = store_folder(tmp_path, str(mid_dir), identity)
    assert old != new
    old.mkdir()
    for item in new.iterdir():
        (old / item.name).write_bytes(item.read_bytes())
    legacy_meta = {k: v for k, v in meta.items() if k != "form"}
    legacy_meta["version"] = 2
    legacy_meta["identity"] = identity
    (old / STORE_META).write_text(json.dumps(legacy_meta))
    shutil.rmtree(new)
    with pytest.warns(UserWarning, match=r"built by an earlier version of moe-offload \(store version 2\)"):
        again = load(mid_dir, config)
    try:
        assert again.store_path == new and read_meta(new)["version"] == 3 and read_meta(new)["form"] == "int4-cpu"
        assert not old.exists()  # removed: this version cannot read it, and the disk may not hold both
        with torch.no_grad():
            again.model(torch.randint(0, 300, (1, 5)))
    finally:
        again.close()


def test_a_store_of_another_form_in_the_folder_is_never_misread(mid_dir, tmp_path):
    """A store.json that says another form (or version) than the device computes from is no store:
    warned about and rebuilt, never read."""
    config = OffloadConfig(device="cpu", offload="disk", cache_size=1, expert_bits=4, store_dir=str(tmp_path))
    first = load(mid_dir, config)
    first.close()
    meta = read_meta(first.store_path)
    meta["form"] = "triton"
    (first.store_path / STORE_META).write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=r"records are in the form 'triton', this device computes from 'int4-cpu'"):
        second = load(mid_dir, config)
    second.close()
    assert read_meta(second.store_path)["form"] == "int4-cpu"


@pytest.mark.parametrize("budget", ["none", "half", "all"])
@pytest.mark.parametrize("levels", ["shared", "exclusive"])
def test_quantized_levels_convert_nothing_at_every_budget(mid_dir, tmp_path, budget, levels):
    """2-bit int4 records through either stacking of the levels: the CPU's own (shared: the layers compute
    from the host arena, nothing copied) and the GPU's run on CPU tensors (exclusive: separate device slots,
    write-backs; a load is one copy of the record and the slot then holds the disk's bytes). Nothing
    converts, and the logits equal transformers' model holding hqq's dequantized experts."""
    common = dict(device="cpu", offload="disk", cache_size=1, prefetch=1, expert_bits=2, hqq_optimize=False,
                  store_dir=str(tmp_path))
    probe = load(mid_dir, OffloadConfig(host_cache_gb=0, **common))
    stride, records = probe.host_cache.stride, probe.shape.num_layers * probe.shape.num_experts
    probe.close()
    slots = {"none": 0, "half": records // 2, "all": records}[budget]
    engine = load(mid_dir, OffloadConfig(host_cache_gb=slots * stride / 1e9, **common), levels=levels)
    exclusive = levels == "exclusive"
    try:
        assert engine.host_cache.exclusive == (exclusive and bool(slots))
        assert (engine.experts[0].cache.slots is not None) == exclusive
        reference = _dequantized_reference(mid_dir, engine, quantize_meta=True)
        ids = torch.randint(0, engine.model.config.vocab_size, (1, 9))
        for _ in range(2):
            with torch.no_grad():
                ours, theirs = engine.model(ids).logits, reference(ids).logits
            torch.testing.assert_close(ours, theirs, rtol=1e-2, atol=1e-2 * theirs.abs().max().item())
        c = engine.counters()
        loads = sum(c.misses) + sum(c.prefetch_issued)
        assert loads and sum(c.converted_bytes) == 0
        assert sum(c.level_copy_bytes) == (loads * engine.tier.nbytes if exclusive else 0)
        if exclusive and slots:
            assert sum(c.write_back_bytes) > 0
        disk, arena = engine.host_cache.inner, engine.host_cache.arena
        for module in engine.experts:  # every level holds the same bytes: a slot is the record on disk
            for expert in module.cache.resident():
                on_disk = aligned_empty(disk.stride, torch.device("cpu"))  # O_DIRECT reads need aligned memory
                disk.read(module.layer, expert, on_disk)
                slot = module.cache._slot_bytes(module.cache.slot_of[expert])
                assert torch.equal(slot[: disk.nbytes], on_disk[: disk.nbytes])
                if not exclusive:  # shared: the slot is a view of the arena
                    assert arena.data_ptr() <= slot.data_ptr() < arena.data_ptr() + arena.numel()
    finally:
        engine.close()
