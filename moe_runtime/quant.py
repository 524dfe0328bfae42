"""HQQ quantization of experts and attention, and the packed byte layout of one expert.

One expert = gate [I, H], up [I, H], down [H, I] (+ biases gate_bias, up_bias [I], down_bias [H]
for families that have them, e.g. gpt-oss). `ExpertCodec.encode` turns them into ONE contiguous
uint8 buffer (so a single copy moves a whole expert between tiers); `decode` turns a buffer (on any
device) back into an `ExpertWeights` in the compute dtype. Biases are never quantized. Quantization and
dequantization are hqq's (`Quantizer.quantize` / `Quantizer.dequantize`, data-free); this module
only lays the pieces out. Scales and zeros are optionally meta-quantized to 8 bits, as in the paper.

Dimensions: H hidden size, I expert FFN size, G group size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

import torch
import torch.nn.functional as F
from hqq.core.quantize import Quantizer

from .types import ExpertWeights

MATRICES = ("gate", "up", "down")
BIASES = ("gate_bias", "up_bias", "down_bias")
ALIGN = 64
META_GROUP = 128
META_BITS = 8


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives inside an expert's byte buffer."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def view(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)


@dataclass
class ExpertLayout:
    slots: dict[str, TensorSlot] = field(default_factory=dict)
    hqq_meta: dict[str, dict] = field(default_factory=dict)
    nbytes: int = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        offset = -(-self.nbytes // ALIGN) * ALIGN
        slot = TensorSlot(name, tuple(tensor.shape), tensor.dtype, offset)
        self.slots[name] = slot
        self.nbytes = offset + slot.nbytes


def quantize_matrix(weight: torch.Tensor, bits: int, group_size: int, quantize_meta: bool,
                    optimize: bool = True, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """HQQ-quantize one matrix: packed codes, fp16 scale/zero (or their 8-bit codes + meta).

    `device` is where HQQ's optimizer runs (a GPU is far faster at it than a CPU); the results come
    back to the CPU.
    """
    if weight.numel() % group_size:
        raise ValueError(f"group size {group_size} does not divide a {tuple(weight.shape)} matrix")
    w_q, meta = Quantizer.quantize(
        weight.to(device=device, dtype=torch.float32), nbits=bits, channel_wise=True, group_size=group_size,
        optimize=optimize, round_zero=(bits == 4), axis=1, bitpack=True, device=device,
    )
    home = "meta" if device == "meta" else "cpu"  # meta: shapes only, for the byte layout
    w_q = w_q.to(home)
    meta["scale"], meta["zero"] = meta["scale"].to(home), meta["zero"].to(home)
    tensors = {"W_q": w_q}
    info = {k: meta[k] for k in ("nbits", "group_size", "axis", "packing")}
    info["shape"] = tuple(meta["shape"])
    for part in ("scale", "zero"):
        value = meta[part].half()
        if quantize_meta:
            group = math.gcd(META_GROUP, value.numel())
            codes, sub = Quantizer.quantize(
                value.float(), nbits=META_BITS, channel_wise=True, group_size=group, optimize=False,
                axis=0, bitpack=True, device=home,
            )
            tensors[f"{part}_q"] = codes
            tensors[f"{part}_scale"] = sub["scale"].half()
            tensors[f"{part}_zero"] = sub["zero"].half()
            info[f"{part}_meta"] = {k: sub[k] for k in ("nbits", "group_size", "axis", "packing")}
            info[f"{part}_meta"]["shape"] = tuple(sub["shape"])
        else:
            tensors[part] = value
    return tensors, info


def _hqq_meta(info: dict, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> dict:
    packing = info["packing"]
    return {
        **info, "scale": scale, "zero": zero, "compute_dtype": dtype, "view_as_float": False,
        "unpack_view_dtype": Quantizer.unpack_view_dtype[packing],
    }


def _scale_zero(tensors: dict[str, torch.Tensor], info: dict, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix's HQQ scale and zero [N*K/G, 1] in `dtype` (meta-dequantized when stored as 8-bit codes)."""
    parts = {}
    for part in ("scale", "zero"):
        if f"{part}_q" in tensors:
            sub = _hqq_meta(info[f"{part}_meta"], tensors[f"{part}_scale"].to(dtype),
                            tensors[f"{part}_zero"].to(dtype), dtype)
            parts[part] = Quantizer.dequantize(tensors[f"{part}_q"], sub)
        else:
            parts[part] = tensors[part].to(dtype)
    return parts["scale"], parts["zero"]


def dequantize_matrix(tensors: dict[str, torch.Tensor], info: dict, dtype: torch.dtype) -> torch.Tensor:
    """The plain reference dequantization (hqq's), used by the engine and by the tests alike."""
    scale, zero = _scale_zero(tensors, info, dtype)
    return Quantizer.dequantize(tensors["W_q"], _hqq_meta(info, scale, zero, dtype))


def hqq_codes(tensors: dict[str, torch.Tensor], info: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One matrix's HQQ pieces unpacked: codes uint8 [N, K], scale and zero fp32 [N, K/G], such that
    hqq's dequantization is w = (codes - zero) * scale, group g covering columns g*G..(g+1)*G-1.

    That reading holds for axis=1 with G dividing K (a group never spans two rows), which this
    function checks (ValueError otherwise); the fused kernels (moe_runtime.kernels) are built from these.
    """
    (n, k), group = info["shape"], info["group_size"]
    if info["axis"] != 1 or k % group:
        raise ValueError(f"hqq_codes needs axis=1 and a group size dividing {k}, got axis {info['axis']}, "
                         f"group {group}")
    scale, zero = _scale_zero(tensors, info, torch.float32)
    codes = tensors["W_q"]
    if info["packing"]:
        codes = Quantizer.unpack[info["packing"]](codes, dtype=torch.uint8)[: n * k // group]
    return codes.reshape(n, k), scale.reshape(n, k // group), zero.reshape(n, k // group)


class MatrixFormat(Protocol):
    """One quantized [N, K] matrix (HQQ axis-1 groups) in a record, for one kind of kernel.

    shapes(info, dtype): named pieces -> (shape, dtype); pack(tensors, info, dtype): quant.quantize_matrix's
    (tensors, info) -> those pieces, exactly (codes bit-exact), at store build time only; weight(views, info):
    what kernels.linear computes with, from views of the record (no copy, no conversion); reference(views,
    info, dtype) -> the dense [N, K] matrix in plain PyTorch (tests: equals hqq's dequantize)."""

    name: str
    converts_per_use: bool
    device_type: str | None  # the device type whose kernel computes from it ("cpu", "cuda"); None: any
    target: str  # what computes from it, in words (reports)

    def supports(self, bits: int, shape: tuple[int, int], group_size: int) -> bool: ...

    def shapes(self, info: dict, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]: ...

    def pack(self, tensors: dict[str, torch.Tensor], info: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]: ...

    def weight(self, views: dict[str, torch.Tensor], info: dict): ...

    def reference(self, views: dict[str, torch.Tensor], info: dict, dtype: torch.dtype) -> torch.Tensor: ...


@dataclass(frozen=True)
class HqqDequantWeight:
    """hqq's pieces of one matrix, dequantized by hqq on each use (the fallback: slow, converts per use)."""

    pieces: dict
    info: dict
    dtype: torch.dtype

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize_matrix(self.pieces, self.info, self.dtype).reshape(tuple(self.info["shape"]))
        return F.linear(x.to(self.dtype), weight).to(x.dtype)


class HqqStoredFormat:
    name = "hqq"
    converts_per_use = True
    device_type = None
    target = "any (hqq dequantize per use; = store version 2's record)"

    def supports(self, bits: int, shape: tuple[int, int], group_size: int) -> bool:
        return bits in (2, 3, 4, 8) and (shape[0] * shape[1]) % group_size == 0

    def shapes(self, info: dict, dtype: torch.dtype) -> dict:
        return {name: (tuple(shape), piece_dtype) for name, (shape, piece_dtype) in info["pieces"].items()}

    def pack(self, tensors: dict[str, torch.Tensor], info: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return tensors

    def weight(self, views: dict[str, torch.Tensor], info: dict) -> HqqDequantWeight:
        return HqqDequantWeight(views, info, info["dtype"])

    def reference(self, views: dict[str, torch.Tensor], info: dict, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_matrix(views, info, dtype).reshape(tuple(info["shape"]))


HQQ_STORED = HqqStoredFormat()


class ExpertCodec:
    """Packs (gate, up, down) into one byte record and reads it back, quantized with HQQ or not.

    The record is written in the form its target computes from: `fmt` (kernels.forms.MatrixFormat) lays
    out each quantized matrix (e.g. `INT4_CPU`: the int4 CPU kernel's tiles); None keeps hqq's pieces as
    stored (`HQQ_STORED`). Unquantized experts are their dense matrices. `weights(record)` hands the record's
    matrices to `kernels.linear` as views, wherever the record lies: no copy, no conversion.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, bits: int | None, group_size: int,
                 quantize_meta: bool, dtype: torch.dtype, optimize: bool = True, quant_device: str = "cpu",
                 biases: bool = False, fmt=None) -> None:
        self.bits, self.group_size, self.quantize_meta, self.biases = bits, group_size, quantize_meta, biases
        self.dtype, self.optimize, self.quant_device = dtype, optimize, quant_device
        self.shapes = {"gate": (intermediate_size, hidden_size), "up": (intermediate_size, hidden_size),
                       "down": (hidden_size, intermediate_size)}
        if biases:
            self.shapes.update(gate_bias=(intermediate_size,), up_bias=(intermediate_size,), down_bias=(hidden_size,))
        if bits is not None:
            for name in MATRICES:
                shape = self.shapes[name]
                if math.prod(shape) % group_size:
                    raise ValueError(
                        f"expert_group_size={group_size} does not divide the {name} matrix {shape}: "
                        "use a power of two that divides hidden_size * intermediate_size"
                    )
        self.fmt = None if bits is None else (fmt or HQQ_STORED)
        if self.fmt is not None and not all(self.fmt.supports(bits, self.shapes[n], group_size) for n in MATRICES):
            raise ValueError(f"the {self.fmt.name} format cannot hold {bits}-bit matrices {[self.shapes[n] for n in MATRICES]} "
                             f"with groups of {group_size}")
        # The layout depends only on shapes and settings: derive it from meta tensors (no memory, no math).
        self.layout = ExpertLayout()
        for name in self._names:
            if bits is None or name in BIASES:
                self.layout.add(name, torch.empty(self.shapes[name], dtype=dtype, device="meta"))
                continue
            tensors, info = quantize_matrix(torch.empty(self.shapes[name], device="meta"), bits, group_size,
                                            quantize_meta, optimize=False, device="meta")
            info.update(pieces={k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}, dtype=dtype)
            self.layout.hqq_meta[name] = info
            for piece, (shape, piece_dtype) in self.fmt.shapes(info, dtype).items():
                self.layout.add(f"{name}.{piece}", torch.empty(shape, dtype=piece_dtype, device="meta"))
        self._views: dict[tuple, ExpertWeights] = {}  # (device, record address) -> its weights

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    @property
    def form_name(self) -> str:
        """The record's form: "dense" (unquantized), or the matrix format's name ("int4-cpu", "hqq", ...)."""
        return "dense" if self.fmt is None else self.fmt.name

    @cached_property
    def converted_bytes_per_use(self) -> int:
        """Bytes a use of one expert converts (dense matrices made from the record): 0 but for the hqq
        fallback. Asked per expert use on the decode path, so computed once."""
        if self.fmt is None or not self.fmt.converts_per_use:
            return 0
        return sum(math.prod(self.shapes[name]) for name in MATRICES) * self.dtype.itemsize

    @property
    def _names(self) -> tuple[str, ...]:
        return MATRICES + BIASES if self.biases else MATRICES

    def _pieces(self, weights, optimize: bool) -> dict[str, torch.Tensor]:
        weights = tuple(weights) + (None,) * (len(MATRICES + BIASES) - len(weights))
        tensors = {}
        for name, weight in zip(MATRICES + BIASES, weights):
            if (weight is None) != (name not in self._names):
                raise ValueError(f"expert {name} is {'missing' if weight is None else 'given'}: this codec's "
                                 f"experts {'have' if self.biases else 'have no'} biases")
            if weight is None:
                continue
            if tuple(weight.shape) != self.shapes[name]:
                raise ValueError(f"expert {name} has shape {tuple(weight.shape)}, expected {self.shapes[name]}")
            if self.bits is None or name in BIASES:
                tensors[name] = weight.to(self.dtype)
                continue
            device = self.quant_device if optimize else "cpu"
            parts, info = quantize_matrix(weight, self.bits, self.group_size, self.quantize_meta, optimize, device)
            packed = self.fmt.pack(parts, {**self.layout.hqq_meta[name], **info}, self.dtype)
            tensors.update({f"{name}.{k}": v for k, v in packed.items()})
        return tensors

    def encode(self, *weights: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
        """(gate, up, down[, gate_bias, up_bias, down_bias]) -> the expert's record, in `out` (uint8, at
        least `nbytes`) when given. An `ExpertWeights` unpacks into these. Quantizing and packing into the
        target's form happen here, once, when the store is built.

        Writing into a caller's reused buffer matters when building a store: a fresh buffer per
        expert of a few MB fragments glibc's heap, and the resident memory it leaves behind stays
        (docs/results.md, "Notes on the measurement").
        """
        tensors = self._pieces(weights, optimize=self.optimize)
        buffer = torch.zeros(self.nbytes, dtype=torch.uint8) if out is None else out
        for name, tensor in tensors.items():
            slot = self.layout.slots[name]
            if tuple(tensor.shape) != slot.shape or tensor.dtype != slot.dtype:
                raise RuntimeError(f"expert piece {name} does not match the store layout")
            slot.view(buffer).copy_(tensor)
        return buffer

    def parts(self, buffer: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
        """One quantized matrix's pieces in the record's form, as views of `buffer`."""
        return {k.split(".", 1)[1]: s.view(buffer) for k, s in self.layout.slots.items() if k.startswith(name + ".")}

    def weights(self, buffer: torch.Tensor) -> ExpertWeights:
        """The record's (gate, up, down[, biases]) for `kernels.linear`: dense views, or the format's weights
        over views. Made once per record address and reused (a reload rewrites the bytes they view)."""
        key = (buffer.device, buffer.data_ptr())
        cached = self._views.get(key)
        if cached is None:
            slots = self.layout.slots
            biases = [slots[name].view(buffer) for name in BIASES if name in slots]
            if self.bits is None:
                matrices = [slots[name].view(buffer) for name in MATRICES]
            else:
                matrices = [self.fmt.weight(self.parts(buffer, name), self.layout.hqq_meta[name]) for name in MATRICES]
            cached = self._views[key] = ExpertWeights(*matrices, *biases)
        return cached

    def decode(self, buffer: torch.Tensor) -> ExpertWeights:
        """Record -> gate [I, H], up [I, H], down [H, I] (+ biases) as dense matrices in the compute dtype
        (the format's plain reference dequantization; tests and the kernel bench)."""
        slots = self.layout.slots
        biases = [slots[name].view(buffer) for name in BIASES if name in slots]
        if self.bits is None:
            return ExpertWeights(*(slots[name].view(buffer) for name in MATRICES), *biases)
        return ExpertWeights(*(self.fmt.reference(self.parts(buffer, name), self.layout.hqq_meta[name], self.dtype)
                               for name in MATRICES), *biases)
