"""Fused quantized compute against hqq's dequantization + F.linear (moe_runtime.kernels).

The Triton kernel runs under TRITON_INTERPRET=1 here when there is no GPU (conftest sets it; small
shapes: the interpreter is slow); on a GPU tests/test_cuda.py runs it for real.
"""

import dataclasses
import os

import pytest
import torch

from moe_runtime.kernels import HQQ_STORED, INT4_CPU, choose_format, linear, reference_linear
from moe_runtime.kernels.triton_hqq import TRITON_HQQ
from moe_runtime.quant import MATRICES, ExpertCodec, quantize_matrix

H, INTER = 128, 192  # Mixtral-shaped (I = 3.5 H), small


def _expert(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(INTER, H, generator=g) * 0.02, torch.randn(INTER, H, generator=g) * 0.02,
            torch.randn(H, INTER, generator=g) * 0.02]


def _hqq_reference(x, weight, bits, group, quantize_meta):
    """hqq's own quantization of the same matrix, its dequantize, then F.linear (no codec, no format)."""
    tensors, info = quantize_matrix(weight, bits, group, quantize_meta, optimize=False)
    return reference_linear(x, tensors, info)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("quantize_meta", [True, False])
def test_int4_cpu_records_compute_what_hqq_dequantizes(bits, group_size, tokens, quantize_meta):
    assert choose_format(bits, group_size, [(INTER, H), (H, INTER)], torch.device("cpu")) is INT4_CPU
    codec = ExpertCodec(H, INTER, bits, group_size, quantize_meta, torch.float32, optimize=False, fmt=INT4_CPU)
    weights = _expert()
    record = codec.encode(*weights)
    x = {"gate": torch.randn(tokens, H), "up": torch.randn(tokens, H), "down": torch.randn(tokens, INTER)}
    for name, weight, w in zip(MATRICES, codec.weights(record), weights):
        reference = _hqq_reference(x[name], w, bits, group_size, quantize_meta)
        # the kernel runs in bf16 (activations, scales, biases rounded; codes exact)
        tol = dict(rtol=0.02, atol=0.02 * reference.abs().max().item())
        torch.testing.assert_close(linear(x[name], weight), reference, **tol)
        # the format's plain reference reads the same record back to hqq's matrix (bf16 scales aside)
        plain = torch.nn.functional.linear(x[name], INT4_CPU.reference(codec.parts(record, name),
                                                                       codec.layout.hqq_meta[name], torch.float32))
        torch.testing.assert_close(plain, reference, **tol)


@pytest.mark.parametrize("fmt", [INT4_CPU, HQQ_STORED, TRITON_HQQ], ids=lambda f: f.name)
def test_weights_are_views_of_the_record_no_copy_no_conversion(fmt):
    codec = ExpertCodec(H, INTER, 2, 32, True, torch.float32, optimize=False, fmt=fmt)
    record = codec.encode(*_expert())
    lo, hi = record.data_ptr(), record.data_ptr() + record.numel()
    for weight in codec.weights(record)[:3]:
        if isinstance(weight, torch.Tensor):
            pieces = [weight]
        else:  # a format's weight: a dataclass of tensors (or, hqq's, of a dict of them)
            values = [getattr(weight, f.name) for f in dataclasses.fields(weight)]
            pieces = [v for v in values if isinstance(v, torch.Tensor)]
            pieces += [t for v in values if isinstance(v, dict) for t in v.values() if isinstance(t, torch.Tensor)]
        assert pieces and all(lo <= p.data_ptr() < hi for p in pieces)  # every piece lies in the record
    assert codec.converted_bytes_per_use == (3 * H * INTER * 4 if fmt.converts_per_use else 0)


def test_record_sizes_per_form():
    """A 2-bit expert's record: hqq's pieces (today's 55.4 MB for Mixtral), the int4 CPU kernel's (2/3-bit
    codes take 4 bits), the Triton layout's; 16-bit: the dense matrices."""
    sizes = {f.name: ExpertCodec(H, INTER, 2, 32, True, torch.float16, optimize=False, fmt=f).nbytes
             for f in (HQQ_STORED, INT4_CPU, TRITON_HQQ)}
    codes = 3 * H * INTER // 4  # 2-bit codes
    assert codes < sizes["triton-hqq"] <= sizes["hqq"] < sizes["int4-cpu"] <= 2 * codes + 3 * H * INTER // 32 * 4 + 3 * 64
    assert ExpertCodec(H, INTER, None, 32, True, torch.float16).nbytes >= 3 * H * INTER * 2


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_linear_matches_hqq_dequantize(bits, group_size, dtype):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("on a GPU machine this kernel is tested on the GPU (tests/test_cuda.py)")
    codec = ExpertCodec(H, INTER, bits, group_size, True, dtype, optimize=False, fmt=TRITON_HQQ)
    weights = _expert(1)
    record = codec.encode(*weights)
    x = {"gate": torch.randn(3, H), "down": torch.randn(3, INTER)}
    packed = dict(zip(MATRICES, codec.weights(record)))
    for name, w in (("gate", weights[0]), ("down", weights[2])):
        reference = _hqq_reference(x[name], w, bits, group_size, True)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(linear(x[name], packed[name]), reference, rtol=tol,
                                   atol=tol * reference.abs().max().item())


def test_fallback_format_for_group_sizes_the_cpu_kernel_cannot_run():
    with pytest.warns(UserWarning, match="no fused kernel"):
        fmt = choose_format(2, 16, [(INTER, H), (H, INTER)], torch.device("cpu"))
    assert fmt is HQQ_STORED
    codec = ExpertCodec(H, INTER, 2, 16, True, torch.float32, optimize=False, fmt=fmt)
    weights = _expert()
    record = codec.encode(*weights)
    x = torch.randn(2, H)
    torch.testing.assert_close(linear(x, codec.weights(record)[0]), _hqq_reference(x, weights[0], 2, 16, True))


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
    assert all(r["slot_bytes"] >= r2["slot_bytes"] for r in fused for r2 in rows
               if r2["format"].startswith("hqq") and r2["bits"] == r["bits"])  # 2/3-bit codes take 4 bits


@pytest.mark.parametrize("rows,cols", [(64, 32), (192, 256), (96, 64), (32, 64), (48, 32)])
def test_int4_packing_is_torchs_own(rows, cols):
    from moe_runtime.kernels.cpu import int4_codes, int4_supports, pack_int4

    codes = torch.randint(0, 16, (rows, cols), dtype=torch.uint8)
    expected = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    assert torch.equal(pack_int4(codes), expected)
    if int4_supports(4, (rows, cols), 32):  # the layouts the format reads back
        assert torch.equal(int4_codes(expected), codes)


@pytest.mark.parametrize("rows,cols", [(64, 32), (192, 256)])
def test_8bit_codes_pack_as_their_hi_and_lo_nibble_matrices(rows, cols):
    from moe_runtime.kernels.cpu import _pack_split_8bit

    codes = torch.randint(0, 256, (rows, cols), dtype=torch.uint8)
    nibbles = torch.cat([codes >> 4, codes & 15], dim=1).to(torch.int32)  # [N, 2K]: hi | lo
    assert torch.equal(_pack_split_8bit(codes), torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1))
