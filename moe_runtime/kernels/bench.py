"""The kernel part of the benchmark: one expert FFN (Mixtral's: H 4096, I 14336) per compute format.

For each format: the time of one expert FFN at a batch of B tokens, as a ratio to hqq's
dequantize-then-matmul path of the same bits and to dense bf16; the time to bring a stored record
into the format (what a cache miss adds); the bytes a slot holds; and the relative output error
against the unquantized fp32 expert (quantization + kernel) and against hqq's dequantization (the
kernel alone). Weights are random (std 0.02, like the workload's), inputs standard normal.

    python -m moe_runtime.kernels.bench                      # CPU, batch 1, bits 2,3,4,8
    python -m moe_runtime.kernels.bench --batch 8 --device cuda

Dimensions: B tokens, H hidden, I expert FFN size.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

from ..quant import ExpertCodec
from ..types import ExpertWeights, swiglu
from . import linear
from .capability import choose_compute
from .forms import FORMATS, HQQ_STORED, choose_format

DEFAULT_GROUP = {2: 32, 3: 32, 4: 64, 8: 64}  # OffloadConfig.expert_group's defaults


def expert_ffn(x, gate, up, down, act):
    """The SwiGLU expert (arch.swiglu) through kernels.linear, for whatever form the weights are in."""
    return swiglu(act)(x, ExpertWeights(gate, up, down), linear)


def _timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of `fn()` over `repeats` runs, after one warm-up."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _hqq_path(x: torch.Tensor, codec: ExpertCodec, record: torch.Tensor) -> torch.Tensor:
    return expert_ffn(x, *codec.decode(record)[:3], F.silu)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.no_grad()
def expert_formats(hidden: int = 4096, intermediate: int = 14336, batch: int = 1, bits=(2, 3, 4, 8),
                   extra_groups: dict[int, tuple[int, ...]] | None = None, repeats: int = 5,
                   hqq_repeats: int = 2, device: str = "cpu", seed: int = 0) -> list[dict]:
    """One row per format: name, bits, group, ms, load_ms, slot_bytes, err_vs_fp32, err_vs_hqq."""
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(intermediate, hidden, generator=gen) * 0.02,
               torch.randn(intermediate, hidden, generator=gen) * 0.02,
               torch.randn(hidden, intermediate, generator=gen) * 0.02]  # fp32 gate, up, down
    x = torch.randn(batch, hidden, generator=gen).to(dev)
    exact = expert_ffn(x.float().cpu(), *weights, F.silu).to(dev)  # fp32, unquantized
    rows = []
    half = choose_compute(dev, "half").dtype  # the device's 16-bit dtype: no bf16 below sm_80
    for dtype in dict.fromkeys((torch.float32, half) + ((torch.float16,) if dev.type == "cuda" else ())):
        dense = [w.to(dev, dtype) for w in weights]
        xd = x.to(dtype)
        seconds = _timed(partial(expert_ffn, xd, *dense, F.silu), repeats, dev)
        rows.append({"format": f"dense {str(dtype).removeprefix('torch.')}", "bits": None, "group": None,
                     "ms": seconds * 1e3, "load_ms": None, "slot_bytes": 3 * hidden * intermediate * dtype.itemsize,
                     "err_vs_fp32": _rel(expert_ffn(xd, *dense, F.silu), exact), "err_vs_hqq": None})
    compute_dtype = torch.float32 if dev.type == "cpu" else torch.float16
    extra_groups = extra_groups or {}
    for b in bits:
        for group in (DEFAULT_GROUP[b],) + tuple(extra_groups.get(b, ())):
            codec = ExpertCodec(hidden, intermediate, b, group, True, compute_dtype, optimize=False, fmt=HQQ_STORED)
            record = codec.encode(*weights).to(dev)
            dequantized = [w.to(dev) for w in codec.decode(record)[:3]]
            reference = expert_ffn(x.to(compute_dtype), *dequantized, F.silu)  # hqq's dequantize + F.linear
            del dequantized
            hqq_s = _timed(partial(_hqq_path, x.to(compute_dtype), codec, record), hqq_repeats, dev)
            rows.append({"format": "hqq dequantize + matmul", "bits": b, "group": group, "ms": hqq_s * 1e3,
                         "load_ms": None, "slot_bytes": codec.nbytes, "err_vs_fp32": _rel(reference, exact),
                         "err_vs_hqq": 0.0})
            fmt = choose_format(b, group, list(codec.shapes.values()), dev, warn=False)
            if fmt is HQQ_STORED:
                continue  # no fused kernel for this group size (the hqq row is the engine's path)
            fused = ExpertCodec(hidden, intermediate, b, group, True, compute_dtype, optimize=False, fmt=fmt)
            record = fused.encode(*weights).to(dev)  # packed once, as the store does
            slot = torch.zeros_like(record)
            load_s = _timed(partial(slot.copy_, record), 2, dev)  # a load: one contiguous copy
            packed = fused.weights(slot)[:3]
            fast_s = _timed(partial(expert_ffn, x.to(compute_dtype), *packed, F.silu), repeats, dev)
            fast = expert_ffn(x.to(compute_dtype), *packed, F.silu)
            rows.append({"format": f"fused ({fmt.name})", "bits": b, "group": group, "ms": fast_s * 1e3,
                         "load_ms": load_s * 1e3, "slot_bytes": fused.nbytes, "err_vs_fp32": _rel(fast, exact),
                         "err_vs_hqq": _rel(fast, reference)})
    return rows


PREVIOUS_2BIT_MIXTRAL_RECORD = 55.4e6  # store version 2's record (hqq's pieces) of a 2-bit Mixtral expert, group 32


def record_sizes(hidden: int = 4096, intermediate: int = 14336, bits: int = 2, group: int | None = None) -> list[dict]:
    """The record of one expert in each target's form (layouts only: no weights, no memory): bytes and the
    ratio to store version 2's single record format (hqq's pieces, converted at run time)."""
    group = group or DEFAULT_GROUP[bits]
    rows = []
    for name, fmt in FORMATS.items():
        dtype = torch.float16 if fmt.device_type == "cuda" else torch.float32  # the device's usual compute dtype
        if not all(fmt.supports(bits, shape, group) for shape in ((intermediate, hidden), (hidden, intermediate))):
            continue
        codec = ExpertCodec(hidden, intermediate, bits, group, True, dtype, optimize=False, fmt=fmt)
        rows.append({"form": name, "target": fmt.target, "bits": bits, "group": group, "bytes": codec.nbytes})
    dense = ExpertCodec(hidden, intermediate, None, group, True, torch.bfloat16).nbytes
    rows.append({"form": "dense", "target": "16-bit experts (any device)", "bits": 16, "group": None, "bytes": dense})
    return rows


def record_sizes_markdown(rows: list[dict], previous: float | None = None) -> str:
    lines = ["| form | target | bits | group | MB per expert | × store version 2's record |", "|---|---|---:|---:|---:|---:|"]
    base = previous or next((r["bytes"] for r in rows if r["form"] == "hqq"), None)
    for r in rows:
        ratio = f"{r['bytes'] / base:.2f}×" if base and r["bits"] != 16 else "–"
        lines.append(f"| {r['form']} | {r['target']} | {r['bits']} | {r['group'] or '–'} | {r['bytes'] / 1e6:.1f} "
                     f"| {ratio} |")
    return "\n".join(lines)


def to_markdown(rows: list[dict], title: str) -> str:
    dense16 = next(r for r in rows if r["format"].startswith("dense") and "32" not in r["format"])
    bf16 = dense16["ms"]
    hqq = {(r["bits"], r["group"]): r["ms"] for r in rows if r["format"].startswith("hqq")}
    lines = [f"**{title}**", "",
             "| format | bits | group | ms per expert FFN | × hqq path | × " + dense16["format"] + " | load into slot (a copy), ms "
             "| slot bytes | GB/s (slot bytes / time) | rel. error vs fp32 | rel. error vs hqq |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        base = hqq.get((r["bits"], r["group"]))
        cells = [r["format"], r["bits"] or "–", r["group"] or "–", f"{r['ms']:.2f}",
                 f"{base / r['ms']:.1f}×" if base else "–", f"{bf16 / r['ms']:.2f}×",
                 "–" if r["load_ms"] is None else f"{r['load_ms']:.0f}", f"{r['slot_bytes']:,}",
                 f"{r['slot_bytes'] / r['ms'] / 1e6:.1f}",
                 f"{r['err_vs_fp32']:.4f}", "–" if r["err_vs_hqq"] is None else f"{r['err_vs_hqq']:.4f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--batch", type=int, default=1, help="tokens per expert call (default: %(default)s)")
    parser.add_argument("--bits", default="2,3,4,8", help="comma-separated from 2, 3, 4, 8")
    parser.add_argument("--group16", action="store_true",
                        help="also 2/3-bit with groups of 16 (the paper's; hqq path only on CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--record-sizes", action="store_true",
                        help="only print one expert's record size in each target's form (layouts, instant)")
    ns = parser.parse_args(argv)
    if ns.record_sizes:
        for b in (int(b) for b in ns.bits.split(",") if b.strip()):
            print(record_sizes_markdown(record_sizes(ns.hidden, ns.intermediate, b),
                                        PREVIOUS_2BIT_MIXTRAL_RECORD if (b, ns.hidden, ns.intermediate) == (2, 4096, 14336)
                                        else None) + "\n")
        return
    bits = tuple(int(b) for b in ns.bits.split(",") if b.strip())
    if any(b not in DEFAULT_GROUP for b in bits):
        parser.error(f"--bits={ns.bits!r} is not allowed: use comma-separated bits from 2, 3, 4, 8")
    extra = {2: (16,), 3: (16,)} if ns.group16 else None
    rows = expert_formats(ns.hidden, ns.intermediate, ns.batch, bits, extra, ns.repeats, device=ns.device)
    print(to_markdown(rows, f"One expert FFN (H {ns.hidden}, I {ns.intermediate}), batch {ns.batch}, "
                            f"{ns.device}, {torch.get_num_threads()} threads"))


if __name__ == "__main__":
    main()
