"""What a cache slot holds for one expert, per device: the expert's compute form.

The store keeps the compact HQQ record (quant.ExpertCodec); when an expert enters a slot,
`ComputeForm.load` writes the record into the slot in the form the device computes with fastest,
and `weights` hands the slot's (gate, up, down) to `kernels.linear` as views (a hit costs only the
matmuls). Forms:

- `StoredForm`: the slot holds the record itself. Unquantized experts (their record *is* the dense
  matrices) and, as the fallback where no fused kernel fits, quantized ones dequantized per use by hqq.
- `PackedForm`: fused low-bit kernels — torch's int4 CPU kernel (kernels/cpu.py) or the Triton
  kernel on CUDA (kernels/triton_hqq.py). Codes are transcoded exactly; no dense matrix is ever made.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Protocol

import torch

from ..arch.base import ExpertWeights
from ..quant import BIASES, MATRICES, ExpertCodec, ExpertLayout, hqq_codes
from .cpu import Int4CpuWeight, int4_pack, int4_shapes, int4_supports
from .triton_hqq import HqqTritonWeight, triton_pack, triton_shapes, triton_supports


class ComputeForm(Protocol):
    """nbytes: a slot's size; load(record uint8 [>= codec.nbytes], slot uint8 [>= nbytes]) on the slot's
    device; weights(slot) -> ExpertWeights: gate [I, H], up [I, H], down [H, I], each a tensor or a packed
    weight, and the expert's biases (dense, or None)."""

    nbytes: int
    transcodes: bool  # False: a slot is a plain copy of the record

    def load(self, record: torch.Tensor, slot: torch.Tensor) -> None: ...

    def weights(self, slot: torch.Tensor) -> ExpertWeights: ...


class StoredForm:
    transcodes = False

    def __init__(self, codec: ExpertCodec) -> None:
        self.codec, self.nbytes = codec, codec.nbytes

    def load(self, record: torch.Tensor, slot: torch.Tensor) -> None:
        slot[: self.nbytes].copy_(record[: self.nbytes])

    def weights(self, slot: torch.Tensor) -> ExpertWeights:
        return self.codec.decode(slot)


class PackedForm:
    """`kind` "int4-cpu" (torch's int4 CPU kernel) or "triton" (the HQQ Triton kernel, CUDA)."""

    transcodes = True

    def __init__(self, codec: ExpertCodec, kind: str, dtype: torch.dtype = torch.float16) -> None:
        if kind not in ("int4-cpu", "triton"):
            raise ValueError(f"packed form kind={kind!r} is not allowed: use 'int4-cpu' or 'triton'")
        self.codec, self.kind, self.dtype = codec, kind, dtype
        self.layout = ExpertLayout()
        for name in MATRICES:
            for piece, (shape, piece_dtype) in self._shapes(codec.shapes[name]).items():
                self.layout.add(f"{name}.{piece}", torch.empty(shape, dtype=piece_dtype, device="meta"))
        self.biases = [name for name in BIASES if name in codec.layout.slots]  # kept dense, as stored
        for name in self.biases:
            stored = codec.layout.slots[name]
            self.layout.add(name, torch.empty(stored.shape, dtype=stored.dtype, device="meta"))
        self.nbytes = self.layout.nbytes
        self._views: dict[tuple, ExpertWeights] = {}  # (device, slot address) -> that slot's weights

    def _shapes(self, shape: tuple[int, int]) -> dict:
        bits, group = self.codec.bits, self.codec.group_size
        if self.kind == "int4-cpu":
            return int4_shapes(bits, shape, group)
        return triton_shapes(bits, shape, group, self.dtype)

    def load(self, record: torch.Tensor, slot: torch.Tensor) -> None:
        bits, group = self.codec.bits, self.codec.group_size
        for name in MATRICES:
            codes, scale, zero = hqq_codes(self.codec.parts(record, name), self.codec.layout.hqq_meta[name])
            if self.kind == "int4-cpu":
                pieces = int4_pack(codes, scale, zero, bits, group)
            else:
                pieces = triton_pack(codes, scale, zero, bits, self.dtype)
            for piece, tensor in pieces.items():
                self.layout.slots[f"{name}.{piece}"].view(slot).copy_(tensor)
        for name in self.biases:
            self.layout.slots[name].view(slot).copy_(self.codec.layout.slots[name].view(record))

    def weights(self, slot: torch.Tensor) -> ExpertWeights:
        """The slot's packed weights: views, made once per slot and reused (a reload rewrites the bytes
        they view, not the views), so a hit costs no Python bookkeeping beyond a dict lookup."""
        key = (slot.device, slot.data_ptr())
        cached = self._views.get(key)
        if cached is None:
            cached = self._views[key] = self._make_views(slot)
        return cached

    def _make_views(self, slot: torch.Tensor) -> ExpertWeights:
        out = []
        for name in MATRICES:
            view = {piece: s.view(slot) for piece, s in self.layout.slots.items() if piece.startswith(name + ".")}
            view = {k.split(".", 1)[1]: v for k, v in view.items()}
            out.append(packed_weight(self.kind, view, self.codec.layout.hqq_meta[name]))
        return ExpertWeights(*out, *(self.layout.slots[name].view(slot) for name in self.biases))


def pack_matrix(tensors: dict[str, torch.Tensor], info: dict, device: torch.device,
                dtype: torch.dtype) -> tuple[str, dict[str, torch.Tensor]] | None:
    """One HQQ-quantized matrix (quant.quantize_matrix's pieces) -> (kind, the fused kernel's pieces) for
    `device`, or None where no fused kernel fits (attention projections: quant.HQQLinear)."""
    bits, group, shape = info["nbits"], info["group_size"], tuple(info["shape"])
    if info["axis"] != 1:
        return None
    if device.type == "cpu" and int4_supports(bits, shape, group):
        return "int4-cpu", int4_pack(*hqq_codes(tensors, info), bits, group)
    if device.type == "cuda" and triton_supports(bits, shape, group) and importlib.util.find_spec("triton"):
        dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16
        return "triton", triton_pack(*hqq_codes(tensors, info), bits, dtype)
    return None


def packed_weight(kind: str, pieces: dict[str, torch.Tensor], info: dict):
    """The weight object `kernels.linear` computes with, from `pack_matrix`'s pieces."""
    if kind == "int4-cpu":
        return Int4CpuWeight(pieces["packed"], pieces["scale_bias"], info["group_size"], 2 if info["nbits"] == 8 else 1)
    return HqqTritonWeight(pieces["codes"], pieces["scale"], pieces["zero"], info["nbits"], info["group_size"])


def compute_form(codec: ExpertCodec, device: torch.device) -> ComputeForm:
    """The fastest form `device` computes `codec`'s experts with (docs/results.md, "Fused quantized compute")."""
    if codec.bits is None:
        return StoredForm(codec)
    matrices = [codec.shapes[name] for name in MATRICES]  # biases stay dense whatever the form
    fits = {kind: all(check(codec.bits, shape, codec.group_size) for shape in matrices)
            for kind, check in (("int4-cpu", int4_supports), ("triton", triton_supports))}
    if device.type == "cpu" and fits["int4-cpu"]:
        return PackedForm(codec, "int4-cpu")
    if device.type == "cuda" and fits["triton"] and importlib.util.find_spec("triton") is not None:
        dtype = codec.dtype if codec.dtype in (torch.float16, torch.bfloat16) else torch.float16
        return PackedForm(codec, "triton", dtype)
    inputs = sorted({shape[1] for shape in matrices})
    warnings.warn(f"no fused kernel for {codec.bits}-bit experts with group size {codec.group_size} and input "
                  f"sizes {inputs} on {device.type} (CPU: groups of 32/64/128/256 dividing the input size; CUDA: "
                  "the triton package, input sizes divisible by 64 and by the group): experts are dequantized by "
                  "hqq on every use, which is slow", stacklevel=2)
    return StoredForm(codec)
