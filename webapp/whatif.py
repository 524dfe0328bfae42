"""What-if replay: the session's routing trace (or an uploaded one) through the simulator with other
cache settings, beside what the engine measured.

`replay` runs `moe_runtime.sim`'s replay with a chosen policy, cache size and prefetch width, and its
throughput model on a chosen hardware profile for a chosen model shape (the served model's own, or a
named one such as Mixtral-8x7B); `rows` lays the measured and replayed figures side by side. Nothing
here touches the engine: the caller passes a `Stats` snapshot and the served model's config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from moe_runtime.sim.replay import (
    MAX_EXPERTS,
    MAX_LAYERS,
    MAX_TOP_K,
    SIM_POLICIES,
    SimResult,
    check_trace,
    predict_throughput,
    simulate,
)
from moe_runtime.sim.throughput import (
    GB,
    HARDWARE,
    MIXTRAL_LRU_HIT_RATES,
    MODELS,
    ModelShape,
    Throughput,
    paper_errors,
)
from moe_runtime.stats import TRACE_FORMAT, RoutingTrace, Stats
from moe_runtime.types import MoEShape

SERVED_SHAPE = "served model"  # the model-shape choice that means "the model the app serves"
MAX_REPLAY_TOKENS = 20_000  # the newest this many tokens are replayed (a replay stays within seconds)
MAX_TRACE_BYTES = 1 << 20  # an uploaded trace larger than this is refused (gradio's upload cap is the same)
COLUMNS = ["figure", "measured (this session, this machine)", "replayed (simulator)", "predicted on the hardware"]


@dataclass
class WhatIf:
    """One replay: the simulator's counters, the throughput model's prediction and what was measured."""

    trace: RoutingTrace
    result: SimResult
    shape: ModelShape
    hardware: str
    prediction: Throughput
    measured: Stats | None
    measured_expert_bytes: int | None  # one expert as the engine moves it (None: no engine)

    @property
    def loads_per_token(self) -> float:
        """Experts moved per token, all layers (demand + prefetch)."""
        return sum(self.result.loads) / max(self.result.num_tokens, 1)

    @property
    def expert_bytes(self) -> int:
        """One expert as moved: the engine's record for the served model, the shape's size otherwise."""
        if self.shape.name == SERVED_SHAPE and self.measured_expert_bytes:
            return self.measured_expert_bytes
        return self.shape.expert_bytes

    @property
    def bytes_per_token(self) -> float:
        return self.loads_per_token * self.expert_bytes


def served_shape(moe: MoEShape, config, expert_bits: int | None, attn_bits: int | None, name: str = SERVED_SHAPE,
                 expert_group_size: int | None = None, attn_group_size: int = 64) -> ModelShape:
    """The throughput model's shape of the served model: its MoE dimensions as the family's adapter
    reads them (`Engine.shape`), attention and vocabulary from the transformers config; 16 bits where
    not quantized."""
    group = expert_group_size or (16 if expert_bits in (2, 3) else 64)
    heads = config.num_attention_heads
    return ModelShape(
        name, num_layers=moe.num_layers, num_experts=moe.num_experts, top_k=moe.top_k, hidden_size=moe.hidden_size,
        intermediate_size=moe.intermediate_size, num_attention_heads=heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads, vocab_size=config.vocab_size,
        expert_bits=expert_bits or 16, expert_group_size=group, attn_bits=attn_bits or 16,
        attn_group_size=attn_group_size, head_dim=getattr(config, "head_dim", None))


def load_trace(path: str | Path) -> RoutingTrace:
    """An uploaded trace file, size-capped and checked (ValueError naming what is wrong, never the
    file's path). Its shape is checked against the simulator's limits before anything is built from
    it, so the memory a replay takes is bounded by the file's size."""
    size = Path(path).stat().st_size
    if size > MAX_TRACE_BYTES:
        raise ValueError(f"the trace file is {size / 2**20:.1f} MiB: at most {MAX_TRACE_BYTES / 2**20:.0f} MiB")
    try:
        data = json.loads(Path(path).read_bytes())
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deep, a number too long
        raise ValueError("the uploaded file is not a routing trace: not JSON (or nested too deep, or a number "
                         "over 4300 digits)") from None
    if not isinstance(data, dict) or data.get("format") != TRACE_FORMAT:
        raise ValueError(f"the uploaded file is not a routing trace (expected format {TRACE_FORMAT!r})")
    for name, most in (("num_layers", MAX_LAYERS), ("num_experts", MAX_EXPERTS), ("top_k", MAX_TOP_K)):
        value = data.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise ValueError(f"trace {name}={shown}: expected an integer in 1..{most} (the simulator's limits: "
                             f"{MAX_LAYERS} layers, {MAX_EXPERTS} experts, top-{MAX_TOP_K})")
    try:
        trace = RoutingTrace(num_layers=data["num_layers"], num_experts=data["num_experts"], top_k=data["top_k"],
                             model=str(data.get("model", ""))[:200], selected=data["selected"],
                             guess=data.get("guess") or [], phase=data.get("phase") or [])
    except (KeyError, TypeError) as err:
        raise ValueError(f"not a valid routing trace: missing or malformed {err}") from None
    check_trace(trace)
    return trace


def replay(trace: RoutingTrace, policy: str, cache_size: int, prefetch: int, hardware: str, shape: ModelShape,
           measured: Stats | None = None, measured_expert_bytes: int | None = None,
           include_prefill: bool = True) -> WhatIf:
    """Replay `trace` (all tokens, or decode only; the newest MAX_REPLAY_TOKENS) and predict tokens/s
    of `shape` on `hardware`.
    ValueError names a bad knob (policy, cache size, prefetch, hardware) or an empty trace."""
    if hardware not in HARDWARE:
        raise ValueError(f"hardware={hardware!r} is not allowed: use one of {', '.join(HARDWARE)}")
    if not include_prefill:
        trace = trace.decode_only()
    if trace.num_tokens > MAX_REPLAY_TOKENS:
        keep = slice(trace.num_tokens - MAX_REPLAY_TOKENS, None)
        trace = RoutingTrace(trace.num_layers, trace.num_experts, trace.top_k, trace.model,
                             selected=[rows[keep] for rows in trace.selected],
                             guess=[rows[keep] if rows else [] for rows in trace.guess], phase=trace.phase[keep])
    if trace.num_tokens == 0:
        raise ValueError("the trace has no tokens" + ("" if include_prefill else " of decode") +
                         ": send a message in the Chat tab first, or upload a trace")
    result = simulate(trace, policy, cache_size, prefetch)
    if (shape.num_experts, shape.top_k) != (trace.num_experts, trace.top_k):
        shape = replace(shape, name=f"{shape.name} (with this trace's hit rates)")
    return WhatIf(trace, result, shape, hardware, predict_throughput(result, shape, HARDWARE[hardware]),
                  measured, measured_expert_bytes)


def rows(w: WhatIf) -> list[list[str]]:
    """[figure, measured, replayed, predicted] for a table; '—' where a figure has no meaning."""
    r, m = w.result, w.measured
    comparable = m is not None and (m.num_layers, m.num_experts) == (w.trace.num_layers, w.trace.num_experts)
    tokens = m.trace_tokens if comparable else 0
    decoded = m is not None and m.tokens_generated > 0

    def pct(value):
        return "—" if value is None else f"{value:.1%}"

    def num(value, unit):
        return "—" if value is None else f"{value:.2f} {unit}"

    measured_loads = (m.total("misses") + m.total("prefetch_issued")) / tokens if tokens else None
    stalls = w.prediction.demand_stall_s + w.prediction.prefetch_stall_s
    return [
        ["cache per layer", f"{m.cache_size} of {m.num_experts}, {m.prefetch} prefetched" if comparable else "—",
         f"{r.cache_size} of {w.trace.num_experts}, {r.prefetch} prefetched, {r.policy}", ""],
        ["tokens", f"{tokens} (since the last reset)" if comparable else "—", f"{r.num_tokens}", ""],
        ["cache hit rate", pct(m.hit_rate if comparable and m.total("selections") else None), pct(r.hit_rate), ""],
        ["prefetch recall", pct(m.prefetch_recall if comparable else None), pct(r.prefetch_recall), ""],
        ["experts loaded per token", num(measured_loads, "experts"), num(w.loads_per_token, "experts"), ""],
        ["bytes per token", _bytes(m.total("bytes_moved") / tokens) if tokens else "—", _bytes(w.bytes_per_token),
         f"{w.shape.name}: {_bytes(w.loads_per_token * w.shape.expert_bytes)}"],
        ["decode speed", num(m.tokens_per_second if decoded else None, "tokens/s"), "—",
         f"{w.prediction.tokens_per_second:.2f} tokens/s"],
        ["stalls per token", num(1e3 * m.total("stall_seconds") / m.tokens_generated if decoded else None, "ms"),
         "—", f"{1e3 * stalls:.2f} ms"],
    ]


def notes(w: WhatIf) -> str:
    """How to read the prediction: the model's assumptions, and its error where the paper measured it."""
    hw, s = HARDWARE[w.hardware], w.shape
    lines = [f"**Predicted on {hw.name}** ({hw.notes}; assumed {hw.link_gbs:g} GB/s host/disk → device, "
             f"{hw.device_gbs:g} GB/s device memory) for **{s.name}**: {s.num_layers} layers × {s.num_experts} "
             f"experts, {s.expert_bytes / 1e6:.2f} MB per expert ({s.expert_bits}-bit), "
             f"{s.resident_dense_bytes / GB:.3f} GB dense. The throughput model takes spec-sheet bandwidths and "
             "mean loads per layer: an optimistic bound, not a measurement."]
    rows = [r for r in paper_errors(MODELS["mixtral-8x7b"], MIXTRAL_LRU_HIT_RATES) if r["hardware"] == hw.name]
    if rows:
        lines.append(f"The throughput model's stated error on {hw.name}, against the paper's Table 2 (Mixtral-8x7B, "
                     "2-bit experts, real Mixtral routing; `python -m moe_runtime.sim calibrate`): "
                     + "; ".join(map(_paper_row, rows)) + ".")
    else:
        lines.append(f"The paper measured nothing on {hw.name}, so the throughput model has no stated error there.")
    if w.measured is not None:
        lines.append("Measured figures are this app's own counters since the last reset, on this machine "
                     "(not on the chosen hardware). The engine runs a prompt's tokens together and the simulator "
                     "one at a time, so where a chat's prompts count the two columns differ even with the same "
                     "settings; token by token (decode) the replay counts what the engine counts.")
    return "\n\n".join(lines)


def _paper_row(row: dict) -> str:
    cache = f" (cache {row['cache_size']})" if row["cache_size"] else ""
    fitted = ", the row it is fitted to" if row["fitted"] else ""
    return (f"{row['method']}{cache}: paper {row['paper']:.2f}, model {row['predicted']:.2f} tokens/s "
            f"({row['error']:+.0%}{fitted})")


def model_choices() -> list[str]:
    return [SERVED_SHAPE, *MODELS]


def policy_choices() -> list[str]:
    return list(SIM_POLICIES)


def _bytes(n: float) -> str:
    for scale, unit in ((GB, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"
