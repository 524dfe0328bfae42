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
