"""The Triton record form (kernels/triton_hqq.py) against hqq's dequantization, and the dtype/kernel rule
per device capability (kernels/capability.py).

The kernel runs under TRITON_INTERPRET=1 here (conftest sets it where there is no GPU): the same
launches as on a GPU (the configs of a 40-SM T4), numpy in place of the hardware. What only a GPU can
show (speed, tl.dot's real fp16/bf16 paths) is in tests/test_cuda.py.
"""

import os
from dataclasses import replace

import pytest
import torch

from moe_runtime.kernels import linear, reference_linear
from moe_runtime.kernels.capability import DeviceInfo, choose_compute
from moe_runtime.kernels.triton_hqq import TRITON_HQQ, launch_config, record_sizes
from moe_runtime.quant import ExpertLayout, dequantize_matrix, quantize_matrix

T4 = DeviceInfo("cuda", "Tesla T4", (7, 5), 40)
A100 = DeviceInfo("cuda", "NVIDIA A100-SXM4-40GB", (8, 0), 108)
CPU = DeviceInfo("cpu", "cpu")


def _interpreter():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("on a GPU machine this kernel is tested on the GPU (tests/test_cuda.py)")


def _matrix(bits, n, k, group, meta, seed=0):
    """hqq-quantized [N, K] matrix: quant.quantize_matrix's (tensors, info)."""
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02
    return quantize_matrix(weight, bits, group, meta, optimize=False)


def _odd_n(bits, k, group):
    """An odd N where hqq's bitpacking allows it (N*K/G divisible by its codes per byte), else N - 1."""
    per = {2: 4, 4: 2}.get(bits, 1)
    return 37 if (37 * k // group) % per == 0 else 36


def _check(y, reference, dtype):
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.float(), reference, rtol=tol, atol=tol * reference.abs().max().item())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("meta", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_record_reference_is_hqqs_dequantize(bits, meta, dtype):
    tensors, info = _matrix(bits, _odd_n(bits, 96, 32), 96, 32, meta)
    pieces = TRITON_HQQ.pack(tensors, info)
    expected = dequantize_matrix(tensors, info, dtype).reshape(info["shape"])  # hqq's Quantizer.dequantize
    assert torch.equal(TRITON_HQQ.reference(pieces, info, dtype), expected)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("meta", [True, False])
@pytest.mark.parametrize("tokens", [1, 7, 17, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_hqq_dequantize(bits, meta, tokens, dtype):
    """Odd N, K = 96 (not a multiple of the 64/128-wide K tiles), M from decode to prefill."""
    _interpreter()
    k, group = 96, 32
    tensors, info = _matrix(bits, _odd_n(bits, k, group), k, group, meta, seed=bits)
    x = torch.randn(tokens, k).to(dtype)
    y = linear(x, TRITON_HQQ.weight(TRITON_HQQ.pack(tensors, info), info))
    assert y.dtype == dtype and y.shape == (tokens, info["shape"][0])
    _check(y, reference_linear(x.float(), tensors, info), dtype)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [16, 64, 128])
def test_kernel_matches_hqq_dequantize_per_group_size(bits, group):
    _interpreter()
    tensors, info = _matrix(bits, 40, 256, group, True, seed=group)
    x = torch.randn(3, 1, 256)  # [..., K]: leading dims kept
    y = linear(x, TRITON_HQQ.weight(TRITON_HQQ.pack(tensors, info), info))
    _check(y, reference_linear(x, tensors, info), torch.float32)


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_split_k_equals_the_unsplit_kernel(bits, tokens):
    """K = 1056 split in 3 and in 5 (the last split partial) against one program per (N, M) tile."""
    _interpreter()
    k, group = 1056, 32
    tensors, info = _matrix(bits, 24, k, group, True)
    weight = TRITON_HQQ.weight(TRITON_HQQ.pack(tensors, info), info)
    x = torch.randn(tokens, k)
    base = replace(launch_config(tokens, 24, k, T4.sm_count), split_k=1)  # the table's tiles, one program per tile
    unsplit = weight.linear(x, base)
    _check(unsplit, reference_linear(x, tensors, info), torch.float32)
    for split in (3, 5):
        torch.testing.assert_close(weight.linear(x, replace(base, split_k=split)), unsplit, rtol=1e-5, atol=1e-5 * unsplit.abs().max().item())


def test_default_launch_splits_a_long_k_at_decode():
    """The default launch at M = 1 on K = 2048 (a T4's table: it splits) equals hqq's dequantize."""
    _interpreter()
    tensors, info = _matrix(4, 48, 2048, 64, True)
    assert launch_config(1, 48, 2048, T4.sm_count).split_k > 1
    x = torch.randn(1, 2048, dtype=torch.float16)
    y = linear(x, TRITON_HQQ.weight(TRITON_HQQ.pack(tensors, info), info))
    _check(y, reference_linear(x.float(), tensors, info), torch.float16)


def test_launch_table_fills_the_gpu_at_decode_and_covers_k():
    down = launch_config(1, 4096, 14336, T4.sm_count)  # Mixtral's down_proj, one token, a T4
    n_tiles, m_tiles, splits = down.grid(1, 4096)
    assert splits > 1 and n_tiles * m_tiles * splits >= 2 * T4.sm_count
    assert launch_config(1, 14336, 4096, T4.sm_count).split_k == 1  # gate/up: 224 tiles already
    assert launch_config(512, 4096, 14336, T4.sm_count).split_k == 1  # prefill: tiles enough
    for m in (*range(1, 9), 17, 64, 512):
        for n, k in ((4096, 14336), (14336, 4096), (24, 1056)):
            config = launch_config(m, n, k, A100.sm_count)
            assert config.block_m >= m or config.block_m == 64  # decode batches in one row tile
            per = config.k_per_split(k)
            assert per % config.block_k == 0 and (config.split_k - 1) * per < k <= config.split_k * per


def test_record_pieces_laid_out_in_one_buffer_compute_from_its_views():
    """As a store lays a record out (ExpertLayout from `shapes`), the kernel computes from byte views."""
    _interpreter()
    matrices = {"gate": _matrix(3, 40, 64, 32, True, 1), "down": _matrix(2, 64, 40, 8, False, 2)}
    layout = ExpertLayout()
    for name, (_, info) in matrices.items():
        for piece, (shape, dtype) in TRITON_HQQ.shapes(info, torch.float16).items():
            layout.add(f"{name}.{piece}", torch.empty(shape, dtype=dtype, device="meta"))
    record = torch.zeros(layout.nbytes, dtype=torch.uint8)
    for name, (tensors, info) in matrices.items():
        for piece, tensor in TRITON_HQQ.pack(tensors, info).items():
            layout.slots[f"{name}.{piece}"].view(record).copy_(tensor)
    for name, (tensors, info) in matrices.items():
        views = {p.split(".", 1)[1]: s.view(record) for p, s in layout.slots.items() if p.startswith(name + ".")}
        x = torch.randn(5, info["shape"][1])
        _check(linear(x, TRITON_HQQ.weight(views, info)), reference_linear(x, tensors, info), torch.float32)


def test_mixtral_expert_record_is_no_larger_than_the_codecs():
    rows = {r["bits"]: r for r in record_sizes(4096, 14336, (2, 3, 4, 8), 32)}
    assert all(r["triton_hqq_bytes"] <= r["codec_bytes"] for r in rows.values())
    assert rows[2]["triton_hqq_bytes"] <= 55.4e6  # what the Colab host budget was planned for
    assert rows[3]["triton_hqq_bytes"] < rows[3]["codec_bytes"]  # 3.0 bits a code, not hqq's 3.2


def test_format_refuses_what_it_cannot_lay_out():
    assert TRITON_HQQ.supports(2, (37, 96), 32)
    assert not TRITON_HQQ.supports(2, (64, 100), 20)  # K not a multiple of 8
    assert not TRITON_HQQ.supports(4, (64, 96), 64)  # group does not divide K
    assert not TRITON_HQQ.supports(1, (64, 96), 32)
    _, info = _matrix(4, 8, 96, 32, False)
    with pytest.raises(ValueError, match="K a multiple of 8 and of the group size"):
        TRITON_HQQ.shapes({**info, "group_size": 64})


# --- the dtype and kernel per device capability ---------------------------------------------------
@pytest.mark.parametrize("device,asked,expected,kernel", [
    (CPU, "auto", torch.float32, "int4-cpu"), (CPU, "half", torch.bfloat16, "int4-cpu"),
    (CPU, "bfloat16", torch.bfloat16, "int4-cpu"),
    (T4, "auto", torch.float16, "triton-hqq"), (T4, "half", torch.float16, "triton-hqq"),
    (T4, "float32", torch.float32, "triton-hqq"),
    (A100, "auto", torch.float16, "triton-hqq"), (A100, "half", torch.bfloat16, "triton-hqq"),
    (A100, torch.bfloat16, torch.bfloat16, "triton-hqq"),
    (DeviceInfo("cuda", "Tesla P100", (6, 0), 56), "auto", torch.float16, None),  # below Triton's 7.0
])
def test_compute_choice_per_capability(device, asked, expected, kernel):
    pytest.importorskip("triton")
    choice = choose_compute(device, asked)
    assert (choice.dtype, choice.kernel) == (expected, kernel)


def test_bf16_below_sm80_is_refused_naming_the_gpu_and_the_allowed_dtypes():
    with pytest.raises(ValueError, match=r"Tesla T4 \(compute capability 7.5\).*'auto' \(float16\), 'float16', 'float32'"):
        choose_compute(T4, "bfloat16")
    with pytest.raises(ValueError, match="dtype='float64' is not allowed"):
        choose_compute(CPU, "float64")


def test_loading_and_the_kernel_launch_ask_the_same_rule(monkeypatch):
    """On a (mocked) T4: the engine's dtype and the kernel's launch refuse bf16; fp16 is taken."""
    from moe_runtime.kernels import capability
    from moe_runtime.loading import resolve_dtype

    monkeypatch.setattr(capability, "device_info", lambda device: T4)
    capability.check_kernel_dtype.cache_clear()
    try:
        assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
        with pytest.raises(ValueError, match="Tesla T4"):
            resolve_dtype("bfloat16", torch.device("cuda"))
        tensors, info = _matrix(4, 8, 64, 32, True)
        weight = TRITON_HQQ.weight(TRITON_HQQ.pack(tensors, info), info)
        with pytest.raises(ValueError, match="bf16 needs compute capability 8.0"):
            weight.linear(torch.randn(1, 64, dtype=torch.bfloat16))
    finally:
        capability.check_kernel_dtype.cache_clear()


def test_workload_takes_the_devices_16bit_dtype():
    from moe_runtime.bench.workload import spec_for

    assert spec_for(T4, bits=None).dtype == "float16"
    assert spec_for(A100, bits=None).dtype == "bfloat16"
    assert spec_for(CPU, bits=2).dtype == "bfloat16"  # the CPU rows' dtype, as before
    assert spec_for(T4, bits=None, dtype="float32").dtype == "float32"  # one given is kept
    with pytest.raises(ValueError, match="Tesla T4"):
        spec_for(T4, dtype="bfloat16")


def test_kernel_bench_record_sizes_list_the_triton_record_no_larger_than_hqqs():
    """The kernel bench's record-size table (python -m moe_runtime.kernels.bench --record-sizes): the CUDA
    record (triton-hqq) of a 2- and 3-bit Mixtral expert at group 32 is no larger than hqq's own record,
    and its bytes are what TRITON_HQQ's layout says."""
    from moe_runtime.kernels.bench import record_sizes as bench_record_sizes

    for bits in (2, 3):
        rows = {r["form"]: r["bytes"] for r in bench_record_sizes(4096, 14336, bits, 32)}
        (direct,) = record_sizes(4096, 14336, (bits,), 32)
        assert rows["triton-hqq"] == direct["triton_hqq_bytes"] <= rows["hqq"] == direct["codec_bytes"]
