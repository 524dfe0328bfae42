"""The bench's shape part: hub shapes as config dicts, random-weight stores in the target's form, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moe_runtime import OffloadConfig, load
from moe_runtime.arch import adapter_for
from moe_runtime.bench import cli
from moe_runtime.bench import shape as bench_shape
from moe_runtime.bench.hub_shapes import HUB_SHAPES
from moe_runtime.quant import ExpertCodec
from moe_runtime.sim.throughput import MODELS
from moe_runtime.store import STORE_FILE, read_meta


@pytest.mark.parametrize("name", sorted(set(HUB_SHAPES) & set(MODELS)))
def test_hub_shapes_agree_with_the_throughput_models(name):
    """Two transcriptions of one config.json (sim/throughput.py's and the bench's) give one MoE shape."""
    hf = bench_shape.hf_config(name)
    shape, model = adapter_for(hf).shape(hf), MODELS[name]
    assert (shape.num_layers, shape.num_experts, shape.top_k, shape.hidden_size, shape.intermediate_size) == \
        (model.num_layers, model.num_experts, model.top_k, model.hidden_size, model.intermediate_size)
    assert hf.vocab_size == model.vocab_size


def test_an_unknown_shape_is_refused_with_the_names():
    with pytest.raises(ValueError, match="qwen3-30b-a3b"):
        bench_shape.hf_config("qwen3-31b")
    assert cli.main(["--shape", "qwen3-31b"]) == 2


def _records(folder, codec: ExpertCodec, layers: int, experts: int) -> list[list[torch.Tensor]]:
    meta = read_meta(folder)
    raw = (folder / STORE_FILE).read_bytes()
    data = torch.frombuffer(bytearray(raw[meta["data_start"]:]), dtype=torch.uint8).view(layers * experts, -1)
    return [[data[layer * experts + e, : codec.nbytes] for e in range(experts)] for layer in range(layers)]


@pytest.mark.parametrize("bits", [2, 4])
def test_shape_store_is_a_model_that_computes_its_records(tmp_path, bits):
    """The store folder loads with `load` (config, tokenizer and dense part included), and the engine's
    logits equal transformers' model filled with the records' plain dequantization (kernels' reference)."""
    folder, facts = bench_shape.build_shape_store("tiny-olmoe", bits, tmp_path)
    assert facts["form"] == "int4-cpu" and read_meta(folder)["form"] == "int4-cpu"
    engine = load(folder, OffloadConfig(device="cpu", offload="ram", cache_size=8, prefetch=0))
    try:
        assert engine.tokenizer("<5> <7>")["input_ids"][-2:] == [5, 7]
        ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            got = engine.model(ids).logits.float()
        hf = bench_shape.hf_config("tiny-olmoe")
        codec = engine.experts[0].codec
        reference = AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16).eval()
        reference.load_state_dict(load_file(folder / "dense.safetensors"), strict=False)
        records = _records(folder, codec, facts["layers"], facts["experts"])
        with torch.no_grad():
            for layer, block in enumerate(reference.model.layers):
                weights = [codec.decode(record) for record in records[layer]]
                block.mlp.experts.gate_up_proj.copy_(torch.stack([torch.cat([w.gate, w.up]) for w in weights]))
                block.mlp.experts.down_proj.copy_(torch.stack([w.down for w in weights]))
            want = reference(ids).logits.float()
    finally:
        engine.close()
    assert len({r.numpy().tobytes() for layer in records for r in layer}) > 1  # not one record copied everywhere
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * want.abs().max().item())


def test_shape_part_runs_from_the_command_line(tmp_path):
    out = tmp_path / "out"
    code = cli.main(["--quick", "--shape", "tiny-olmoe", "--expert-bits", "4", "--out", str(out), "--store-dir",
                     str(tmp_path / "store"), "--variants", "resident,lru+host-half,lru+host-quarter", "--attn-bits", "4"])
    assert code == 0
    report = json.loads((out / "bench.json").read_text())
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"resident", "lru+host-half", "lru+host-quarter"}
    assert all(r["part"] == "shape" and r["tokens"] == 4 for r in rows.values())
    assert rows["resident"]["hit_rate"] == 1.0 and rows["resident"]["window"]["disk_bytes"] == 0
    every = 2 * 8  # tiny-olmoe: 2 layers x 8 experts
    assert rows["lru+host-half"]["engine"]["levels"]["host"]["slots"] == every // 2
    assert rows["lru+host-quarter"]["engine"]["levels"]["host"]["slots"] == every // 4
    assert all(r["attn_bits"] == 4 and r["routing"] == "model" for r in rows.values())
    assert "tiny-olmoe" in (out / "bench.md").read_text()


def test_a_variant_over_the_memory_limit_is_reported_with_the_numbers(tmp_path):
    out = tmp_path / "out"
    code = cli.main(["--quick", "--shape", "tiny-olmoe", "--expert-bits", "4", "--out", str(out), "--store-dir",
                     str(tmp_path / "store"), "--variants", "resident", "--max-rss-gb", "0.5"])
    assert code == 1
    (row,) = json.loads((out / "bench.json").read_text())["results"]
    assert "does not fit --max-rss-gb 0.5" in row["error"] and "dense part" in row["error"]


def test_uniform_routing_draws_distinct_experts_for_every_token(tmp_path):
    folder, facts = bench_shape.build_shape_store("tiny-olmoe", 4, tmp_path)
    engine = load(folder, OffloadConfig(device="cpu", offload="ram", cache_size=8, prefetch=0, record_trace=True))
    try:
        bench_shape.draw_uniform_routing(engine.experts, facts["experts"])
        ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            engine.model(ids)
        trace = engine.stats().trace
    finally:
        engine.close()
    chosen = [sorted(token) for layer in trace.selected for token in layer]
    assert len(chosen) == facts["layers"] * 24 and all(len(set(c)) == facts["top_k"] for c in chosen)
    assert {e for c in chosen for e in c} == set(range(facts["experts"]))
    assert len({tuple(c) for c in chosen}) > 10  # drawn anew for each token, not one choice repeated
