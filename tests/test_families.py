"""Every registered MoE family loads through `moe_runtime.load` and matches transformers' own model.

Each family's baby checkpoint is written by transformers (hub key layout, several shards) and
loaded on the disk tier with a cache smaller than a layer's experts and prefetch on: logits to
1e-4 in fp32 and the same greedy tokens as transformers' from_pretrained of the same folder;
4-bit experts match transformers' model holding the same dequantized expert weights.
"""

import json

import pytest
import torch
from baby_families import family_configs, save_baby
from references import hqq_dequantized
from transformers import AutoModelForCausalLM, LlamaConfig, Mxfp4Config

from moe_runtime import OffloadConfig, load
from moe_runtime.arch import ADAPTERS, adapter_for
from moe_runtime.types import ExpertWeights

FAMILIES = sorted(family_configs())
CASES = FAMILIES + ["gpt_oss:mxfp4"]  # gpt-oss also in the hub's MXFP4 expert layout


@pytest.fixture(scope="module", params=CASES)
def family(request, tmp_path_factory):
    name = request.param
    path = save_baby(name, tmp_path_factory.mktemp(name.replace(":", "-")) / "model")
    # transformers' own reading of MXFP4 checkpoints on a CPU: dequantized
    quantization = {"quantization_config": Mxfp4Config(dequantize=True)} if name.endswith(":mxfp4") else {}
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **quantization).eval()
    return name, path, reference


def test_every_registered_family_has_a_parity_case():
    assert set(ADAPTERS) == set(FAMILIES), "a family registered in ADAPTERS needs a baby model in baby_families.py"


def test_baby_checkpoints_are_sharded_in_the_hub_layout(family):
    name, path, _ = family
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 2
    config = family_configs()[name.partition(":")[0]]
    adapter = adapter_for(config)
    experts = [k for k in weight_map if adapter.is_expert_key(k, config)]
    shape = adapter.shape(config)
    assert experts and all(int(k.split(".")[2]) in shape.moe_layers for k in experts)


def test_logits_and_greedy_tokens_match_transformers(family, tmp_path):
    name, path, reference = family
    num_experts = adapter_for(reference.config).shape(reference.config).num_experts
    engine = load(path, OffloadConfig(device="cpu", offload="disk", cache_size=num_experts // 2, prefetch=2,
                                      store_dir=str(tmp_path / "store")))
    try:
        ids = torch.randint(0, reference.config.vocab_size, (2, 9))
        with torch.no_grad():
            torch.testing.assert_close(engine.model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
        prompt = ids[:1]
        ours = engine.model.generate(prompt, max_new_tokens=8, do_sample=False)
        theirs = reference.generate(prompt, max_new_tokens=8, do_sample=False)
        assert torch.equal(ours, theirs)
        stats = engine.stats()
        assert sum(stats.misses) > 0 and stats.prefetch_recall is not None  # offloaded, prefetching
    finally:
        engine.close()


def _set_expert(experts, expert: int, w, interleaved: bool) -> None:
    """Write one expert's weights into transformers' fused experts module."""
    if interleaved:  # gpt-oss: gate_up [E, H, 2I] with gate/up in alternate columns, down [E, I, H]
        experts.gate_up_proj[expert] = torch.stack([w.gate, w.up], dim=1).reshape(-1, w.gate.shape[1]).T
        experts.down_proj[expert] = w.down.T
        experts.gate_up_proj_bias[expert] = torch.stack([w.gate_bias, w.up_bias], dim=1).reshape(-1)
        experts.down_proj_bias[expert] = w.down_bias
    else:  # gate_up [E, 2I, H] (gate rows, then up), down [E, H, I]
        experts.gate_up_proj[expert] = torch.cat([w.gate, w.up], dim=0)
        experts.down_proj[expert] = w.down


def _get_expert(experts, expert: int, interleaved: bool) -> ExpertWeights:
    """One expert's weights from transformers' fused experts module (the inverse of `_set_expert`)."""
    if interleaved:  # gpt-oss: gate_up [E, H, 2I] with gate/up in alternate columns, down [E, I, H]
        gate_up, bias = experts.gate_up_proj[expert].T, experts.gate_up_proj_bias[expert]  # [2I, H], [2I]
        return ExpertWeights(gate_up[0::2], gate_up[1::2], experts.down_proj[expert].T,
                             bias[0::2], bias[1::2], experts.down_proj_bias[expert])
    gate, up = experts.gate_up_proj[expert].chunk(2, dim=0)
    return ExpertWeights(gate, up, experts.down_proj[expert])


def test_4bit_experts_match_transformers_with_the_dequantized_experts(family, tmp_path):
    """The reference: transformers' model whose expert matrices went through hqq's own quantizer and
    dequantizer (round-to-nearest, groups of the config's size, 8-bit meta); biases stay as they are."""
    name, path, reference = family
    adapter = adapter_for(reference.config)
    shape = adapter.shape(reference.config)
    config = OffloadConfig(device="cpu", offload="disk", cache_size=shape.num_experts // 2, prefetch=1,
                           expert_bits=4, hqq_optimize=False,
                           store_dir=str(tmp_path / "store"))
    engine = load(path, config)
    dequantized = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    interleaved = name.startswith("gpt_oss")
    try:
        layers = adapter.layers(dequantized)
        with torch.no_grad():
            for layer in shape.moe_layers:
                experts = adapter.moe_block(layers[layer]).experts
                for expert in range(shape.num_experts):
                    w = _get_expert(experts, expert, interleaved)
                    matrices = [hqq_dequantized(m, 4, config.expert_group, True, optimize=False) for m in w[:3]]
                    _set_expert(experts, expert, ExpertWeights(*matrices, *w[3:]), interleaved)
            ids = torch.randint(0, reference.config.vocab_size, (2, 9))
            ours, expected = engine.model(ids).logits, dequantized(ids).logits
            # packed slots compute through the bf16 int4 kernel; where no kernel fits, hqq's path in fp32
            packed = engine.experts[0].codec.form_name == "int4-cpu"
            tol = dict(rtol=1e-2, atol=1e-2 * expected.abs().max().item()) if packed else dict(atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(ours, expected, **tol)
            assert not torch.allclose(ours, reference(ids).logits, atol=1e-4)  # 4-bit experts really are in use
    finally:
        engine.close()


def test_unsupported_model_type_names_the_supported_ones(tmp_path):
    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=16,
                vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported architecture 'llama'.*" + ".*".join(sorted(ADAPTERS))):
        load(tmp_path, OffloadConfig(device="cpu", store_dir=str(tmp_path / "store")))


class _RecordRouting(torch.nn.Module):
    """Stands in for a block's experts: records the router's choice, contributes nothing."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        self.chosen = top_k_index
        return torch.zeros_like(hidden_states)


def test_speculator_scores_rank_experts_as_the_router_chooses(family):
    """The adapter's guess function on the router's own input picks the router's top-k (group limits,
    score-correction biases, router biases and sparsemixer included)."""
    name, _, reference = family
    config = reference.config
    adapter = adapter_for(config)
    shape = adapter.shape(config)
    layers = adapter.layers(reference)
    for index in shape.moe_layers:
        block = adapter.moe_block(layers[index])
        experts, block.experts = block.experts, _RecordRouting()
        try:
            x = torch.randn(1, 24, shape.hidden_size)
            with torch.no_grad():
                block(x)
                view = adapter.router_view(layers[index])
                logits = torch.nn.functional.linear(x[0].to(view.weight.dtype), view.weight, view.bias)
                scores = adapter.guess_scores(config, layers[index])(logits)
            guessed = scores.topk(shape.top_k, dim=-1).indices.sort(dim=-1).values
            assert torch.equal(guessed, block.experts.chosen.sort(dim=-1).values), f"layer {index}"
        finally:
            block.experts = experts


def test_pre_quantized_checkpoints_other_than_mxfp4_gpt_oss_are_refused(tmp_path):
    path = save_baby("deepseek_v3", tmp_path / "model")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="pre-quantized with 'fp8', which is not supported"):
        load(path, OffloadConfig(device="cpu", store_dir=str(tmp_path / "store")))


@pytest.mark.parametrize("name", ["deepseek_v2", "deepseek_v3", "gpt_oss", "qwen2_moe"])
def test_quantized_attention_matches_transformers_with_the_dequantized_projections(name, tmp_path):
    """MLA's projections (DeepSeek) and projections with biases (gpt-oss, Qwen2) are HQQ-quantized."""
    from moe_runtime.kernels.hqq_linear import HQQLinear

    path = save_baby(name, tmp_path / "model")
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    adapter = adapter_for(reference.config)
    engine = load(path, OffloadConfig(device="cpu", offload="ram", cache_size=2, prefetch=0, attn_bits=8,
                                      hqq_optimize=False, store_dir=str(tmp_path / "store")))
    try:
        expected = {"deepseek_v2": {"q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"},
                    "deepseek_v3": {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}}
        ours, theirs = adapter.layers(engine.model), adapter.layers(reference)
        with torch.no_grad():
            for layer, ref_layer in zip(ours, theirs):
                quantized = {n: m for n, m in vars(layer.self_attn)["_modules"].items() if isinstance(m, HQQLinear)}
                assert set(quantized) == expected.get(name, {"q_proj", "k_proj", "v_proj", "o_proj"})
                for projection, module in quantized.items():  # the reference: hqq's own 8-bit round trip
                    linear = getattr(ref_layer.self_attn, projection)
                    linear.weight.copy_(hqq_dequantized(linear.weight, 8, 64, True, optimize=False))
                    assert (module.bias is None) == (linear.bias is None)
            ids = torch.randint(0, reference.config.vocab_size, (2, 9))
            expected = reference(ids).logits
            # projections a fused kernel fits compute in bf16 (kernels.pack_matrix); the others in fp32
            packed = any(m.kind is not None for layer in ours for m in vars(layer.self_attn)["_modules"].values()
                         if isinstance(m, HQQLinear))
            tol = dict(rtol=1e-2, atol=1e-2 * expected.abs().max().item()) if packed else dict(atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(engine.model(ids).logits, expected, **tol)
    finally:
        engine.close()


@pytest.mark.parametrize("name", ["deepseek_v2", "deepseek_v3", "qwen3_moe", "gpt_oss", "mixtral"])
def test_throughput_shape_counts_the_attention_transformers_builds(name):
    """The throughput model's attention size (head_dim, MLA) equals the projections transformers builds."""
    from moe_runtime.sim.throughput import ModelShape, mla_params

    config = family_configs()[name]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    adapter = adapter_for(config)
    built = sum(linear.weight.numel() for linear in adapter.attention_linears(adapter.layers(model)[-1]).values())
    shape = adapter.shape(config)
    mla = None
    if name.startswith("deepseek"):
        mla = mla_params(config.hidden_size, config.num_attention_heads, config.q_lora_rank, config.kv_lora_rank,
                          config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim)
    modelled = ModelShape(name, shape.num_layers, shape.num_experts, shape.top_k, shape.hidden_size,
                          shape.intermediate_size, config.num_attention_heads, config.num_key_value_heads,
                          config.vocab_size, attn_bits=16, head_dim=getattr(config, "head_dim", None),
                          attention_params=mla)
    assert modelled.attention_bytes == 2 * built


def test_routing_trace_records_what_transformers_routes_and_replays(family, tmp_path):
    """The trace of any family names MoE layers in order and the router's own choices; the simulator
    replays it (LRU without prefetch: the same hits and misses as the engine)."""
    from moe_runtime.sim.replay import simulate
    from moe_runtime.stats import RoutingTrace

    name, path, reference = family
    adapter = adapter_for(reference.config)
    shape = adapter.shape(reference.config)
    chosen = [[] for _ in shape.moe_layers]
    layers = adapter.layers(reference)
    hooks = [adapter.moe_block(layers[layer]).experts.register_forward_hook(
        lambda module, args, out, i=i: chosen[i].extend(args[1].tolist())) for i, layer in enumerate(shape.moe_layers)]
    engine = load(path, OffloadConfig(device="cpu", offload="disk", cache_size=shape.num_experts // 2, prefetch=0,
                                      store_dir=str(tmp_path / "store")))
    try:
        prompt = torch.randint(0, reference.config.vocab_size, (1, 1))  # one token per step, as the simulator
        reference.generate(prompt, max_new_tokens=10, do_sample=False)
        engine.model.generate(prompt, max_new_tokens=10, do_sample=False)
        stats = engine.stats()
        trace = RoutingTrace.load(stats.trace.save(tmp_path / "trace.json"))
    finally:
        engine.close()
        for hook in hooks:
            hook.remove()
    assert (trace.num_layers, trace.num_experts, trace.top_k) == (shape.num_layers, shape.num_experts, shape.top_k)
    assert trace.selected == chosen
    replayed = simulate(trace, "lru", shape.num_experts // 2)
    assert (replayed.hits, replayed.misses) == (stats.hits, stats.misses)


def test_codec_keeps_biases_exactly_and_refuses_a_mismatch():
    from moe_runtime.quant import ExpertCodec

    w = ExpertWeights(torch.randn(32, 64), torch.randn(32, 64), torch.randn(64, 32),
                      torch.randn(32), torch.randn(32), torch.randn(64))
    for bits in (None, 4):
        codec = ExpertCodec(64, 32, bits, 64, True, torch.float32, optimize=False, biases=True)
        decoded = codec.decode(codec.encode(*w))
        for name in ("gate_bias", "up_bias", "down_bias"):  # biases are never quantized
            assert torch.equal(getattr(decoded, name), getattr(w, name))
        with pytest.raises(ValueError, match="gate_bias is missing"):
            codec.encode(*w[:3])
    with pytest.raises(ValueError, match="gate_bias is given"):
        ExpertCodec(64, 32, None, 64, True, torch.float32).encode(*w)
