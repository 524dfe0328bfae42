"""Fused quantized compute against hqq's dequantization + F.linear (moe_runtime.kernels).

The Triton kernel runs under TRITON_INTERPRET=1 here when there is no GPU (conftest sets it; small
shapes: the interpreter is slow); on a GPU tests/test_cuda.py runs it for real.
"""

import os

import pytest
import torch

from moe_runtime.kernels import PackedForm, compute_form, linear, reference_linear
from moe_runtime.quant import ExpertCodec

H, INTER = 128, 192  # Mixtral-shaped (I = 3.5 H), small


def _expert(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(INTER, H, generator=g) * 0.02, torch.randn(INTER, H, generator=g) * 0.02,
            torch.randn(H, INTER, generator=g) * 0.02]


def _loaded(form, codec, record):
    slot = torch.zeros(form.nbytes, dtype=torch.uint8)
    form.load(record, slot)
    return form.weights(slot)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("quantize_meta", [True, False])
def test_int4_cpu_linear_matches_hqq_dequantize(bits, group_size, tokens, quantize_meta):
    codec = ExpertCodec(H, INTER, bits, group_size, quantize_meta, torch.float32, optimize=False)
    record = codec.encode(*_expert())
    form = compute_form(codec, torch.device("cpu"))
    assert isinstance(form, PackedForm) and form.kind == "int4-cpu"
    x = {"gate": torch.randn(tokens, H), "up": torch.randn(tokens, H), "down": torch.randn(tokens, INTER)}
    for name, weight in zip(("gate", "up", "down"), _loaded(form, codec, record)):
        reference = reference_linear(x[name], codec.parts(record, name), codec.layout.hqq_meta[name])
        # the kernel runs in bf16 (activations, scales, biases rounded; codes exact)
        torch.testing.assert_close(linear(x[name], weight), reference, rtol=0.02, atol=0.02 * reference.abs().max().item())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_linear_matches_hqq_dequantize(bits, group_size, dtype):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("on a GPU machine this kernel is tested on the GPU (tests/test_cuda.py)")
    codec = ExpertCodec(H, INTER, bits, group_size, True, torch.float32, optimize=False)
    record = codec.encode(*_expert(1))
    form = PackedForm(codec, "triton", dtype)
    x = {"gate": torch.randn(3, H), "down": torch.randn(3, INTER)}
    weights = dict(zip(("gate", "up", "down"), _loaded(form, codec, record)))
    for name in ("gate", "down"):
        reference = reference_linear(x[name], codec.parts(record, name), codec.layout.hqq_meta[name])
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(linear(x[name], weights[name]), reference, rtol=tol,
                                   atol=tol * reference.abs().max().item())


def test_fallback_form_for_group_sizes_the_cpu_kernel_cannot_run():
    codec = ExpertCodec(H, INTER, 2, 16, True, torch.float32, optimize=False)
    with pytest.warns(UserWarning, match="no fused kernel"):
        form = compute_form(codec, torch.device("cpu"))
    record = codec.encode(*_expert())
    x = torch.randn(2, H)
    gate = _loaded(form, codec, record)[0]
    torch.testing.assert_close(linear(x, gate), reference_linear(x, codec.parts(record, "gate"),
                                                                 codec.layout.hqq_meta["gate"]))


def test_linear_of_a_dense_weight_is_f_linear():
    x, w, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(6)
    torch.testing.assert_close(linear(x, w, b), torch.nn.functional.linear(x, w, b))


@pytest.mark.parametrize("tokens,top_k,num_experts", [(1, 2, 8), (7, 2, 8), (5, 8, 64)])
def test_dispatch_groups_every_assignment_under_its_expert(tokens, top_k, num_experts):
    from moe_runtime.experts import dispatch

    top_k_index = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(tokens)])
    top_k_index[0, 0] = num_experts  # out of range: dropped, like transformers' padding ids
    plan = dispatch(top_k_index, num_experts)
    for expert in range(num_experts):
        token_idx, k_pos = torch.where(top_k_index == expert)  # the plain per-expert lookup
        if len(token_idx) == 0:
            assert expert not in plan.spans
            continue
        got_tokens, got_k = plan[expert]
        torch.testing.assert_close(got_tokens, token_idx)
        torch.testing.assert_close(got_k, k_pos)
    assert num_experts not in plan.spans


def test_kernel_bench_rows_on_a_small_expert():
    from moe_runtime.kernels.bench import expert_formats, to_markdown

    rows = expert_formats(hidden=64, intermediate=128, bits=(2, 8), repeats=1, hqq_repeats=1)
    fused = [r for r in rows if r["format"].startswith("fused")]
    assert [r["bits"] for r in fused] == [2, 8]
    assert all(r["err_vs_hqq"] < 0.02 for r in fused)  # the kernel adds bf16 rounding only
    assert "| fused (int4-cpu) | 8 | 64 |" in to_markdown(rows, "small")


@pytest.mark.parametrize("rows,cols", [(64, 32), (192, 256), (96, 64)])
def test_int4_packing_is_torchs_own(rows, cols):
    from moe_runtime.kernels.cpu import pack_int4

    codes = torch.randint(0, 16, (rows, cols), dtype=torch.uint8)
    expected = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    assert torch.equal(pack_int4(codes), expected)


@pytest.mark.parametrize("rows,cols", [(64, 32), (192, 256)])
def test_8bit_codes_pack_as_their_hi_and_lo_nibble_matrices(rows, cols):
    from moe_runtime.kernels.cpu import _pack_split_8bit

    codes = torch.randint(0, 256, (rows, cols), dtype=torch.uint8)
    nibbles = torch.cat([codes >> 4, codes & 15], dim=1).to(torch.int32)  # [N, 2K]: hi | lo
    assert torch.equal(_pack_split_8bit(codes), torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1))
