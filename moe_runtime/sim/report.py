"""The simulator's tables and figure: hit rates against Belady, loads, predicted throughput."""

from __future__ import annotations

from ..stats import RoutingTrace
from .hierarchy import HostPolicyRow
from .replay import SIM_POLICIES, SimResult, predict_throughput
from .throughput import (
    GB,
    LAYER_OVERHEAD_S,
    PAPER_TABLE2,
    HardwareProfile,
    ModelShape,
    PaperFigure,
    fitting_cache_size,
    predict_from_loads,
)


def _by_key(results: list[SimResult]) -> dict[tuple[str, int, int], SimResult]:
    return {(r.policy, r.prefetch, r.cache_size): r for r in results}


def _grid_table(results: list[SimResult], cell) -> list[str]:
    sizes = sorted({r.cache_size for r in results})
    rows = dict.fromkeys((r.policy, r.prefetch) for r in results)
    table = _by_key(results)
    lines = ["| policy | prefetch | " + " | ".join(f"C={c}" for c in sizes) + " |",
             "|---|---:|" + "---:|" * len(sizes)]
    for policy, p in rows:
        cells = [cell(table[policy, p, c], table.get(("belady", p, c))) for c in sizes]
        lines.append(f"| {policy} | {p} | " + " | ".join(cells) + " |")
    return lines


def _hit_cell(r: SimResult, best: SimResult | None) -> str:
    if best is None or r.policy == "belady":
        return f"{r.hit_rate:.3f}"
    ratio = r.hit_rate / best.hit_rate if best.hit_rate else float("nan")
    return f"{r.hit_rate:.3f} ({ratio:.2f})"


def _load_cell(r: SimResult, _best) -> str:
    text = f"{r.per_layer_token(r.loads):.2f}"
    loads = sum(r.prefetch_loads)
    return f"{text} ({r.wasted_prefetch / loads:.0%} wasted)" if loads else text


def throughput_rows(results: list[SimResult], model: ModelShape, hardware: list[HardwareProfile]) -> list[dict]:
    """Per hardware: predictions at the largest simulated cache size that fits its memory."""
    rows = []
    for hw in hardware:
        fit = fitting_cache_size(model, hw)
        sizes = [c for c in sorted({r.cache_size for r in results}) if c <= fit]
        configs = []
        if fit >= model.num_experts:
            configs.append(("all experts resident", fit, predict_from_loads(model, hw, 0.0)))
        elif sizes:
            configs += [(f"{r.policy}, prefetch {r.prefetch}", r.cache_size, predict_throughput(r, model, hw))
                        for r in results if r.cache_size == sizes[-1]]
        configs.append(("load all E experts of every layer (accelerate-like)", 0,
                        predict_from_loads(model, hw, float(model.num_experts))))
        for config, cache_size, tp in configs:
            paper = [f for f in PAPER_TABLE2 if f.hardware == hw.name and _paper_applies(model, config, cache_size, f)]
            rows.append({"hardware": hw.name, "fits_cache_size": fit, "cache_size": cache_size,
                         "config": config, "tokens_per_second": tp.tokens_per_second,
                         "compute_s": tp.compute_s, "stall_s": tp.demand_stall_s + tp.prefetch_stall_s,
                         "paper_table2": paper[0].tokens_per_second if paper else None,
                         "paper_method": paper[0].method if paper else None})
    return rows


def _paper_applies(model: ModelShape, config: str, cache_size: int, figure: PaperFigure) -> bool:
    """Only the row of the paper's own setting: its quantization, its method and its cache size."""
    paper_setting = (model.name, model.expert_bits, model.expert_group_size, model.attn_bits) == (
        "mixtral-8x7b", 2, 16, 4)
    if not paper_setting:
        return False
    if figure.method.startswith("naive"):
        return config.startswith("load all")
    return config.startswith("lru") and not config.endswith("prefetch 0") and cache_size == figure.cache_size


def markdown_report(trace: RoutingTrace, results: list[SimResult], model: ModelShape,
                    hardware: list[HardwareProfile], source: str = "") -> str:
    recalls = {r.prefetch: r.prefetch_recall for r in results if r.prefetch_recall is not None}
    lines = [f"## Expert cache replay: {source or trace.model or 'trace'}", "",
             (f"{trace.num_tokens} tokens, L={trace.num_layers} layers, E={trace.num_experts} experts, "
              f"top-{trace.top_k}; one cache of C experts per layer."), "",
             "Hit rate (ratio to Belady's MIN at the same prefetch):", "", *_grid_table(results, _hit_cell), "",
             "Experts loaded per layer and token (share of prefetch loads never used):", "",
             *_grid_table(results, _load_cell), ""]
    lines += [f"Prefetch top-{p} recall (selected experts that were guessed, layers with a guess): {v:.3f}"
              for p, v in sorted(recalls.items())]
    if any(r.prefetch for r in results) and not recalls:
        lines.append("The trace holds no prefetch guesses: rows with prefetch > 0 equal prefetch 0.")
    lines += ["", (f"### Predicted decode throughput: {model.name}, {model.expert_bits}-bit experts "
                   f"(group {model.expert_group_size}), {model.attn_bits}-bit attention"), "",
              f"Model: {model.expert_bytes / 1e6:.1f} MB per expert, {model.resident_dense_bytes / GB:.2f} GB "
              "dense weights. Assumed bandwidths (link = host/disk to device, device = resident weights): "
              + "; ".join(f"{h.name} {h.link_gbs:g} / {h.device_gbs:g} GB/s, {h.memory_gb:g} GB ({h.notes})"
                          for h in hardware) + ".",
              ("Time per token = per layer, device traffic on the engine's path (dense + active experts, the "
               "fused kernel reading each record, nothing converted per load or use) / device bandwidth + a fitted "
               f"per-layer overhead ({LAYER_OVERHEAD_S * 1e3:.2f} ms, from the paper's T4 row on the paper's path), "
               "+ misses x expert bytes / link bandwidth; prefetch loads are hidden up to one layer's compute; "
               "write-backs are not counted here (overlapped, they hide behind the loads: `scenario` counts them). The trace's per-layer hit "
               "rates are applied to the model's layers. Paper, Table 2 values were measured by its authors, "
               "not by us; they are shown only on the row of the paper's setting (method and cache size)."), "",
              "| hardware | C (fits) | configuration | predicted tok/s | stall s/token | paper, Table 2 tok/s |",
              "|---|---:|---|---:|---:|---|"]
    for row in throughput_rows(results, model, hardware):
        paper = f"{row['paper_table2']:.2f} ({row['paper_method']})" if row["paper_table2"] else ""
        lines.append(f"| {row['hardware']} | {row['cache_size'] or '-'} ({row['fits_cache_size']}) | "
                     f"{row['config']} | {row['tokens_per_second']:.2f} | {row['stall_s']:.3f} | {paper} |")
    if trace.num_experts != model.num_experts or trace.top_k != model.top_k:
        lines += ["", (f"Note: the trace has E={trace.num_experts}, top-{trace.top_k}; {model.name} has "
                       f"E={model.num_experts}, top-{model.top_k}, so the prediction borrows hit rates across shapes.")]
    return "\n".join(lines) + "\n"


def hit_rate_figure(results: list[SimResult]):
    """Plotly figure: hit rate vs cache size, one line per policy, one panel per prefetch value."""
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:
        raise ValueError("--html needs plotly: pip install plotly") from None
    prefetches = sorted({r.prefetch for r in results})
    fig = make_subplots(rows=1, cols=len(prefetches), shared_yaxes=True,
                        subplot_titles=[f"prefetch {p}" for p in prefetches])
    colors = dict(zip(SIM_POLICIES, ("#1f77b4", "#ff7f0e", "#2ca02c", "#444444")))
    for col, p in enumerate(prefetches, start=1):
        for policy in dict.fromkeys(r.policy for r in results):
            points = sorted((r.cache_size, r.hit_rate) for r in results if r.policy == policy and r.prefetch == p)
            fig.add_trace(go.Scatter(
                x=[c for c, _ in points], y=[h for _, h in points], name=policy, legendgroup=policy,
                showlegend=col == 1, mode="lines+markers",
                line={"color": colors[policy], "dash": "dash" if policy == "belady" else "solid"}), row=1, col=col)
        fig.update_xaxes(title_text="cache size (experts per layer)", dtick=1, row=1, col=col)
    fig.update_yaxes(title_text="hit rate", range=[0, 1], row=1, col=1)
    fig.update_layout(title="Expert cache hit rate by policy (Belady's MIN dashed)", template="plotly_white")
    return fig


LEVEL_TITLES = {
    "exclusive": "exclusive under {c} device slots per layer (the engine on CUDA: a host hit moves to the device, "
                 "device evictions are written back)",
    "inclusive": "inclusive under {c} device slots per layer (the host keeps what it sends; device evictions are "
                 "dropped)",
    "single": "single RAM level (the engine on a CPU-only machine: experts compute in place from the host arena)",
}


def host_policy_report(rows: list[HostPolicyRow], trace: RoutingTrace, cache_size: int, source: str = "") -> str:
    """Per level: host hit rate by budget and policy (ratio to Belady in brackets), and the steady-state
    disk reads per token."""
    lines = [f"## Host-level policies: {source or trace.model or 'trace'}", "",
             f"{trace.num_tokens} tokens, L={trace.num_layers} layers x E={trace.num_experts} experts, "
             f"top-{trace.top_k}. Host hit rate = host hits / host requests (loads from the device level; on a "
             "single level, every use); Belady = MIN over the host's own requests. In brackets: disk reads per "
             "token in the trace's second half (steady state).", ""]
    budgets = sorted({r.budget for r in rows})
    for level in dict.fromkeys(r.level for r in rows):
        table = {(r.host_policy, r.budget): r for r in rows if r.level == level}
        policies = list(dict.fromkeys(r.host_policy for r in rows if r.level == level))
        slots = {r.budget: r.slots for r in rows if r.level == level}
        lines += [f"### {LEVEL_TITLES[level].format(c=cache_size)}", "",
                  "| host policy | " + " | ".join(f"{b:.0%} ({slots[b]} records)" for b in budgets) + " |",
                  "|---|" + "---:|" * len(budgets)]
        for name in policies:
            cells = []
            for b in budgets:
                r = table[name, b]
                cells.append(f"{r.hit_rate:.3f} ({r.late_disk_reads / max(1, r.num_tokens):.1f})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def fits_report(models: list[ModelShape], hardware: list[HardwareProfile]) -> str:
    """Per model shape: the store's size, the resident dense part, and per machine the experts per
    layer that fit beside it and, where every expert fits, the predicted decode tok/s with nothing to
    load (the engine's path, spec-sheet bandwidths: an optimistic bound)."""
    lines = ["| model (bits: experts/attention, expert group) | all experts | resident dense | "
             + " | ".join(f"{h.name}: cache / tok/s" for h in hardware) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in hardware) + " |"]
    for m in models:
        cells = []
        for h in hardware:
            fit = fitting_cache_size(m, h)
            speed = f"{predict_from_loads(m, h, 0.0).tokens_per_second:.1f}" if fit >= m.num_experts else "offloaded"
            cells.append(f"{fit}/{m.num_experts} / {speed}")
        lines.append(f"| {m.name} ({m.expert_bits}/{m.attn_bits}, g{m.expert_group_size}) | "
                     f"{m.num_layers * m.num_experts * m.expert_bytes / GB:.1f} GB | "
                     f"{m.resident_dense_bytes / GB:.2f} GB | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
