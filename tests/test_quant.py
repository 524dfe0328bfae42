"""HQQ-quantized experts and attention equal a plain transformers model holding the dequantized weights."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_runtime import OffloadConfig, load
from moe_runtime.quant import ExpertCodec
from tiny_models import save_tiny_mixtral


@pytest.fixture(scope="module")
def mid_dir(tmp_path_factory):
    return save_tiny_mixtral(tmp_path_factory.mktemp("mid") / "model", hidden=128, intermediate=256, layers=2,
                             experts=4, heads=4, kv_heads=2, shards=2)


def _dequantized_reference(path, engine):
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    codec = engine.experts[0].codec
    with torch.no_grad():
        for index, layer in enumerate(reference.model.layers):
            for expert in range(engine.shape.num_experts):
                gate, up, down, *_ = codec.decode(engine.tier.record(index, expert))
                layer.mlp.experts.gate_up_proj[expert] = torch.cat([gate, up], dim=0)
                layer.mlp.experts.down_proj[expert] = down
            for name, module in engine.model.model.layers[index].self_attn.named_children():
                if hasattr(module, "dequantize"):
                    getattr(layer.self_attn, name).weight.copy_(module.dequantize())
    return reference


@pytest.mark.parametrize("bits,attn_bits", [(4, None), (2, None), (3, 4), (8, 8)])
def test_quantized_engine_matches_dequantized_reference(mid_dir, tmp_path, bits, attn_bits):
    engine = load(mid_dir, OffloadConfig(device="cpu", offload="disk", cache_size=2, prefetch=1, expert_bits=bits,
                                         attn_bits=attn_bits, store_dir=str(tmp_path)))
    try:
        reference = _dequantized_reference(mid_dir, engine)
        ids = torch.randint(0, engine.model.config.vocab_size, (1, 9))
        with torch.no_grad():
            ours, theirs = engine.model(ids).logits, reference(ids).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3 * theirs.abs().max().item())
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
def test_decoded_cache_gives_the_same_outputs_and_moves_the_quantized_bytes(mid_dir, tmp_path, offload):
    ids = torch.randint(0, 300, (1, 9))
    outputs, moved = [], []
    for decoded in (False, True):
        engine = load(mid_dir, OffloadConfig(device="cpu", offload=offload, cache_size=2, prefetch=2, expert_bits=2,
                                             decoded_cache=decoded, store_dir=str(tmp_path)))
        try:
            with torch.no_grad():
                outputs.append(engine.model(ids).logits)
            stats = engine.stats()
            moved.append(sum(stats.bytes_moved) / (sum(stats.misses) + sum(stats.prefetch_issued)))
            info = engine.describe()
            slot = engine.experts[0].cache.slots.shape[1]
            if decoded:  # slots hold fp32 (gate, up, down); what moves is still the 2-bit record
                assert slot >= 3 * 128 * 256 * 4 and info["expert_bytes"] < slot / 5
        finally:
            engine.close()
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    assert moved[0] == moved[1]
