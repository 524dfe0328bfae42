"""Plotly figures of the engine's counters, for the app's Stats tab and for notebooks.

Every function takes a `Stats` snapshot and returns a `plotly.graph_objects.Figure`; none touches
the engine or a tensor. A snapshot taken before any token was generated gives empty figures that
say so, rather than an error.

Dimension names: L layers, E experts per layer, N generated tokens.
"""

from __future__ import annotations

import plotly.graph_objects as go

from moe_runtime.stats import Span, Stats

HEIGHT = 320
TIMELINE_TOKENS = 8  # the timeline shows this many newest tokens unless asked otherwise
MAX_DRAWN_SPANS = 6000  # the timeline draws the newest this many spans (a browser stays responsive)
TIMELINE_KINDS = {  # span kind -> (legend name, colour, row offset within its layer: compute above, loads below)
    "compute": ("layer compute", "#9e9e9e", -0.2),
    "stall": ("stall (waiting for an expert)", "#d62728", -0.2),
    "demand": ("demand load", "#ff7f0e", 0.2),
    "prefetch": ("prefetch", "#1f77b4", 0.2),
}
EMPTY_HINT = "no tokens yet: send a message in the Chat tab"


def dashboard(stats: Stats, timeline_tokens: int | None = TIMELINE_TOKENS,
              levels: list[list[str]] | None = None) -> dict[str, go.Figure]:
    """All figures of the Stats tab; `levels` is `Engine.cache_map()` (None: no cache map)."""
    return {
        "experts": expert_heatmap(stats),
        "hit_rate": hit_rate_per_layer(stats),
        "prefetch_recall": prefetch_recall_per_layer(stats),
        "tokens_per_second": tokens_per_second(stats),
        "bytes_moved": bytes_moved_per_layer(stats),
        "timeline": timeline(stats, timeline_tokens),
        "cache_map": cache_map(levels, stats),
    }


# where an expert can be, in the cache map's order and colours; a level the slow tier names and this
# list does not know is drawn as "slow tier"
PLACES = {
    "device": ("on the device", "#2ca02c"),
    "loading (demand)": ("loading on demand", "#d62728"),
    "loading (prefetch)": ("prefetching", "#1f77b4"),
    "host": ("in the host cache", "#bcbd22"),
    "ram": ("in RAM (slow tier)", "#c7c7c7"),
    "disk": ("on disk only", "#f0f0f0"),
    "slow tier": ("in the slow tier", "#e0e0e0"),
}

# one line under each figure of the Stats tab: how to read it
CAPTIONS = {
    "experts": "Each cell counts how often a layer's router picked that expert (prompt and reply tokens): "
               "bright columns are the experts worth keeping cached.",
    "hit_rate": "Share of the experts a layer needed that were already on the device; the rest were "
                "loaded on demand while the layer waited. Higher is better.",
    "prefetch_recall": "Of the experts a layer selected, the share the previous layer's speculator had "
                       "guessed (and loaded ahead). Layer 0 has nothing to guess from.",
    "tokens_per_second": "Decode speed over the latest reply, over a sliding window of 4 tokens: dips are "
                         "tokens that waited for expert loads.",
    "cache_map": "Where each expert is right now: green on the device (a use is a hit), blue/red being "
                 "prefetched/loaded on demand, grey only in RAM or on disk. Hover a cell for its selections, hits "
                 "and last use.",
    "timeline": "Per layer, the upper bar is its MoE compute (red: waiting for an expert) and the lower one "
                "its loads (orange: on demand, blue: prefetched); prefetch pays when blue bars overlap grey "
                "ones of earlier layers. Ticks on top mark tokens.",
    "bytes_moved": "Bytes copied from the slow tier (RAM or disk) into each layer's cache, demand loads "
                   "and prefetches together. Lower is better.",
}
COUNTER_COLUMNS = ["counter", "value", "how to read it"]


def counters(stats: Stats) -> dict:
    """`Stats.summary()` plus the cache shape and totals a reader needs to interpret the plots."""
    return {
        **stats.summary(),
        "layers": stats.num_layers,
        "experts_per_layer": stats.num_experts,
        "top_k": stats.top_k,
        "cache_size": stats.cache_size,
        "prefetch": stats.prefetch,
        "expert_selections": sum(stats.selections),
        "cache_hits": sum(stats.hits),
        "cache_misses": sum(stats.misses),
        "prefetch_loads": sum(stats.prefetch_issued),
        "trace_tokens": stats.trace_tokens,
    }


def cache_map(levels: list[list[str]] | None, stats: Stats) -> go.Figure:
    """Layers × experts: where each expert is now (`Engine.cache_map()`), coloured by place; hover shows
    its selections, hits and last use. Cells shrink with the expert count; tall maps scroll in the app."""
    if not levels:
        return _annotate(_sized(go.Figure(), stats.num_layers, "Live cache map"), "no engine")
    names = list(PLACES)
    z = [[names.index(p) if p in PLACES else names.index("slow tier") for p in row] for row in levels]
    hits = stats.expert_hits or [[0] * stats.num_experts for _ in levels]
    last = stats.expert_last_use or [[None] * stats.num_experts for _ in levels]
    labels = [PLACES[name][0] for name in names]
    text = [[labels[i] for i in row] for row in z]  # short strings and numbers: a 48 x 128 map stays small
    ago = [[None if t is None else stats.tokens_seen - 1 - t for t in row] for row in last]
    data = [[[stats.expert_counts[layer][e], hits[layer][e], ago[layer][e]] for e in range(len(row))]
            for layer, row in enumerate(levels)]
    n = len(names)  # a discrete colour scale: one band per place
    scale = [[b / n, PLACES[name][1]] for i, name in enumerate(names) for b in (i, i + 1)]
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(len(levels[0]))), y=list(range(len(levels))), zmin=-0.5, zmax=n - 0.5,
        colorscale=scale, xgap=1 if len(levels[0]) <= 64 else 0, ygap=1, text=text, customdata=data,
        showscale=False, hovertemplate="layer %{y}, expert %{x}: %{text}<br>%{customdata[0]} selections, "
                                       "%{customdata[1]} hits<br>last used %{customdata[2]} tokens ago "
                                       "(blank: not since the reset)<extra></extra>",
    ))
    for name in names:  # the key, as legend entries (a colour bar of 7 bands is unreadable on a short map)
        label, color = PLACES[name]
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=label, hoverinfo="skip",
                                 marker={"symbol": "square", "size": 11, "color": color,
                                         "line": {"width": 1, "color": "#999"}}))
    fig.update_xaxes(side="top", **_integer_ticks(len(levels[0])))  # expert numbers on top, the key below
    fig.update_yaxes(title_text="layer", autorange="reversed", **_integer_ticks(len(levels)))
    on_device = sum(row.count("device") for row in levels)
    fig = _sized(fig, len(levels), f"Live cache map: layers × experts ({on_device} on the device)")
    fig.update_layout(showlegend=True, legend={"orientation": "h", "y": -0.02, "yanchor": "top", "x": 0,
                                               "font": {"size": 11}},
                      margin={"l": 50, "r": 20, "t": 65, "b": 50})
    return fig


def _sized(fig: go.Figure, layers: int, title: str) -> go.Figure:
    _layout(fig, title, height=max(HEIGHT - 60, 130 + 16 * layers))
    return fig


def counter_rows(stats: Stats) -> list[list[str]]:
    """The counters as a small table for people: [plain name, value with its unit, how to read it]."""
    totals, tokens = stats.totals(), max(stats.tokens_generated, 1)
    moved, stall = totals["bytes_moved"], totals["stall_seconds"]
    scale, unit = byte_unit(moved)

    def percent(value: float | None) -> str:
        return "—" if value is None else f"{value:.1%}"

    return [
        ["decode speed", f"{stats.tokens_per_second:.2f} tokens/s",
         "reply tokens per second after the first one (prefill excluded)"],
        ["tokens generated", f"{stats.tokens_generated} tokens", "reply tokens counted in the decode speed"],
        ["cache hit rate", percent(stats.hit_rate if stats.total("selections") else None),
         "selected experts already on the device: no wait"],
        ["expert loads on demand", f"{int(stats.total('misses'))} loads",
         "selected experts that were not on the device: the layer waited for each"],
        ["prefetch loads", f"{int(stats.total('prefetch_issued'))} loads",
         "experts loaded ahead on the speculator's guess"],
        ["prefetch recall", percent(stats.prefetch_recall),
         "of the experts selected, the share the speculator had guessed (— without guesses)"],
        ["prefetch precision", percent(stats.prefetch_precision),
         "of the prefetched experts, the share used before being evicted"],
        ["host-cache hits", f"{int(stats.total('host_hits'))} loads",
         "loads served from the host-RAM cache: no disk read (0 without a host cache)"],
        ["disk reads", f"{int(stats.total('disk_reads'))} reads, {_bytes_text(stats.total('disk_bytes'))}",
         f"expert records read from disk ({int(stats.total('disk_prefetch_reads'))} of them read ahead)"],
        ["bytes moved", f"{moved / scale:.2f} {unit}" if scale > 1 else f"{moved:.0f} B",
         f"copied from the slow tier (prompt and reply); {moved / tokens / 2**20:.2f} MiB per reply token"],
        ["stall time", f"{stall:.3f} s", f"compute waiting for experts; {1e3 * stall / tokens:.1f} ms per reply token"],
        ["expert selections", f"{int(stats.total('selections'))}", "experts the routers picked (hits + demand loads)"],
        ["cache", f"{stats.cache_size} of {stats.num_experts} experts × {stats.num_layers} layers",
         f"device slots per layer; each token uses top-{stats.top_k}, prefetch width {stats.prefetch}"],
        ["routing trace", f"{stats.trace_tokens} tokens", "tokens in the downloadable routing trace"],
    ]


def _bytes_text(n: float) -> str:
    scale, unit = byte_unit(n)
    return f"{n / scale:.2f} {unit}" if scale > 1 else f"{n:.0f} B"


def expert_heatmap(stats: Stats) -> go.Figure:
    """How often the router picked each expert: z[L][E] = selections (prompt and reply tokens)."""
    layers, experts = list(range(stats.num_layers)), list(range(stats.num_experts))
    fig = go.Figure(go.Heatmap(
        z=stats.expert_counts, x=experts, y=layers, colorscale="Viridis",
        colorbar={"title": {"text": "selections"}},
        hovertemplate="layer %{y}, expert %{x}: %{z} selections<extra></extra>",
    ))
    fig.update_xaxes(title_text="expert", **_integer_ticks(stats.num_experts))
    fig.update_yaxes(title_text="layer", autorange="reversed", **_integer_ticks(stats.num_layers))
    _layout(fig, "Expert selections (layer × expert)")
    return _hint_if_empty(fig, sum(stats.selections) == 0)


def hit_rate_per_layer(stats: Stats) -> go.Figure:
    """Fraction of the experts a layer needed that were already in its cache."""
    fig = _per_layer_bars(stats.layer_hit_rate, "cache hit rate", "%{y:.0%}")
    fig.add_hline(y=stats.hit_rate, line_dash="dash", line_color="gray",
                  annotation_text=f"all layers {stats.hit_rate:.0%}", annotation_position="top left")
    fig.update_yaxes(range=[0, 1.05], tickformat=".0%")
    _layout(fig, f"Cache hit rate per layer (cache {stats.cache_size} of {stats.num_experts} experts)")
    return _hint_if_empty(fig, sum(stats.selections) == 0)


def prefetch_recall_per_layer(stats: Stats) -> go.Figure:
    """Of the experts layer L selected, the fraction guessed from layer L-1 (layer 0 has no guess)."""
    recall = stats.layer_prefetch_recall
    fig = go.Figure(go.Bar(
        x=list(range(1, stats.num_layers)), y=recall[1:], marker_color="#ff7f0e",
        hovertemplate="layer %{x}: %{y:.0%}<extra></extra>",
    ))
    fig.update_xaxes(title_text="layer", range=[-0.5, stats.num_layers - 0.5], **_integer_ticks(stats.num_layers))
    fig.update_yaxes(title_text="prefetch recall", range=[0, 1.05], tickformat=".0%")
    _layout(fig, f"Prefetch recall per layer (top-{stats.prefetch} guesses)")
    if stats.prefetch == 0:
        return _annotate(fig, "prefetch is off (prefetch = 0)")
    return _hint_if_empty(fig, sum(stats.guess_total) == 0)


def tokens_per_second(stats: Stats, window: int = 4) -> go.Figure:
    """Decode throughput over the course of the latest reply (sliding window of `window` tokens)."""
    series = stats.tokens_per_second_series(window)
    fig = go.Figure(go.Scatter(
        x=list(range(2, len(series) + 2)), y=series, mode="lines+markers", marker_size=4,
        hovertemplate="token %{x}: %{y:.1f} tokens/s<extra></extra>",
    ))
    if series:
        fig.add_hline(y=stats.tokens_per_second, line_dash="dash", line_color="gray",
                      annotation_text=f"mean {stats.tokens_per_second:.1f} tokens/s",
                      annotation_position="bottom right")
    fig.update_xaxes(title_text="token of the reply")
    fig.update_yaxes(title_text="tokens/s", rangemode="tozero")
    _layout(fig, "Tokens per second over the reply")
    return _hint_if_empty(fig, not series)


def bytes_moved_per_layer(stats: Stats) -> go.Figure:
    """Bytes copied from the slow tier into each layer's cache (misses and prefetches)."""
    scale, unit = byte_unit(max(stats.bytes_moved, default=0))
    fig = _per_layer_bars([b / scale for b in stats.bytes_moved], f"moved ({unit})", f"%{{y:.2f}} {unit}",
                          color="#2ca02c")
    fig.update_yaxes(rangemode="tozero")
    total = stats.total("bytes_moved") / scale
    _layout(fig, f"Bytes moved per layer (total {total:.2f} {unit})")
    return _hint_if_empty(fig, stats.total("bytes_moved") == 0)


def timeline(stats: Stats, last_tokens: int | None = TIMELINE_TOKENS) -> go.Figure:
    """Gantt-style chart of the latest reply: per layer, when it computed, stalled and loaded experts
    (x: ms since the reply started; y: layer). `last_tokens` keeps the spans of the newest tokens
    only (None: the whole reply, up to MAX_DRAWN_SPANS spans)."""
    spans, marks = stats.timeline, _token_marks(stats)
    if last_tokens is not None and len(marks) > last_tokens:
        since = marks[-last_tokens - 1]
        spans, marks = [s for s in spans if s.end >= since], marks[-last_tokens - 1:]
    spans = spans[-MAX_DRAWN_SPANS:]
    fig = go.Figure()
    for kind, (name, color, offset) in TIMELINE_KINDS.items():
        rows = [s for s in spans if s.kind == kind]
        if not rows:
            continue
        fig.add_trace(go.Bar(
            orientation="h", name=name, marker_color=color, width=0.36, y=[s.layer + offset for s in rows],
            base=[round(1e3 * s.start, 3) for s in rows], x=[round(1e3 * (s.end - s.start), 3) for s in rows],
            customdata=[[s.layer, _span_label(s)] for s in rows],
            hovertemplate="layer %{customdata[0]}: %{customdata[1]}<br>%{base:.1f} ms, %{x:.2f} ms long"
                          f"<extra>{name}</extra>",
        ))
    if marks:
        fig.add_trace(go.Scatter(
            x=[1e3 * t for t in marks], y=[-0.75] * len(marks), mode="markers", name="token",
            marker={"symbol": "line-ns", "size": 10, "line": {"width": 1, "color": "#555"}},
            customdata=list(range(len(stats.token_times) - len(marks) + 1, len(stats.token_times) + 1)),
            hovertemplate="token %{customdata} at %{x:.1f} ms<extra></extra>",
        ))
    layers = stats.num_layers
    shown = len(marks) - 1 if last_tokens is not None and len(stats.token_times) > last_tokens else None
    fig.update_layout(barmode="overlay")
    fig.update_xaxes(title_text="ms since the reply started")
    ticks = list(range(0, layers, 1 if layers <= 16 else 4))
    fig.update_yaxes(title_text="layer", range=[layers - 0.5, -1],  # layer 0 on top, token ticks above it
                     tickmode="array", tickvals=ticks, ticktext=[str(t) for t in ticks])
    compute = sum(s.end - s.start for s in spans if s.kind == "compute")
    stall = sum(s.end - s.start for s in spans if s.kind == "stall")
    share = f", {stall / compute:.0%} of compute" if compute > 0 else ""
    which = f"last {shown} tokens of the latest reply" if shown else "the latest reply"
    _layout(fig, f"Load/compute timeline, {which} (stalls {1e3 * stall:.0f} ms{share})",
            height=max(HEIGHT, 110 + 26 * layers))
    fig.update_layout(showlegend=True, legend={"orientation": "h", "y": -0.25, "yanchor": "top", "x": 0},
                      margin={"l": 50, "r": 20, "t": 45, "b": 90})
    return _hint_if_empty(fig, not spans)


def _token_marks(stats: Stats) -> list[float]:
    """When each token of the reply left the model, seconds since the reply started."""
    if stats.first_token_at is None:
        return []
    return [stats.first_token_at + t for t in stats.token_times]


def _span_label(span: Span) -> str:
    if span.kind == "compute":
        return "MoE compute"
    where = f" from {span.level}" if span.level else ""
    return f"expert {span.expert}{where}" if span.kind != "stall" else f"waited for expert {span.expert}"


def _per_layer_bars(values: list[float], y_title: str, y_hover: str, color: str = "#1f77b4") -> go.Figure:
    fig = go.Figure(go.Bar(x=list(range(len(values))), y=values, marker_color=color,
                           hovertemplate=f"layer %{{x}}: {y_hover}<extra></extra>"))
    fig.update_xaxes(title_text="layer", **_integer_ticks(len(values)))
    fig.update_yaxes(title_text=y_title)
    return fig


def _integer_ticks(count: int) -> dict:
    """Ticks on whole layer/expert numbers: every one when few, every 4th up to 64 (Mixtral's 32 layers,
    OLMoE's 64 experts), else every 16th (Qwen3's 128 experts; hovering names each one)."""
    return {"tickmode": "linear", "tick0": 0, "dtick": 1 if count <= 16 else 4 if count <= 64 else 16}


def byte_unit(largest: float) -> tuple[int, str]:
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if largest >= scale:
            return scale, unit
    return 1, "B"


def _layout(fig: go.Figure, title: str, height: int = HEIGHT) -> None:
    fig.update_layout(title={"text": title, "font": {"size": 14}}, height=height, template="plotly_white",
                      margin={"l": 50, "r": 20, "t": 45, "b": 40}, showlegend=False)


def _annotate(fig: go.Figure, text: str) -> go.Figure:
    fig.add_annotation(text=text, xref="paper", yref="paper", x=0.5, y=0.5, showarrow=False,
                       font={"size": 13, "color": "gray"})
    return fig


def _hint_if_empty(fig: go.Figure, empty: bool) -> go.Figure:
    return _annotate(fig, EMPTY_HINT) if empty else fig
