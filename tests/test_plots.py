"""Plotly figures of the Stats tab: built from hand-made snapshots and from a real run."""

import json

import plotly.graph_objects as go
import pytest

from moe_runtime import GenerationSettings, OffloadConfig, RoutingTrace, load
from moe_runtime.stats import Span, Stats
from webapp import plots


def make_stats(layers=3, experts=4, prefetch=2, tokens=6, empty=False) -> Stats:
    zero = [0] * layers
    counts = [[(layer + 1) * (e + 1) for e in range(experts)] for layer in range(layers)]
    return Stats(
        num_layers=layers, num_experts=experts, top_k=2, cache_size=2, prefetch=prefetch,
        expert_counts=[[0] * experts for _ in range(layers)] if empty else counts,
        selections=zero if empty else [10] * layers,
        hits=zero if empty else [5, 8, 9][:layers] + [9] * (layers - 3),
        misses=zero if empty else [5, 2, 1][:layers] + [1] * (layers - 3),
        prefetch_issued=zero if empty else [0] + [4] * (layers - 1),
        prefetch_used=zero if empty else [0] + [3] * (layers - 1),
        guess_hits=zero if empty or not prefetch else [0] + [7] * (layers - 1),
        guess_total=zero if empty or not prefetch else [0] + [10] * (layers - 1),
        bytes_moved=zero if empty else [3 * 2**20, 2**20, 2**19][:layers] + [2**19] * (layers - 3),
        stall_seconds=[0.0] * layers,
        **{name: zero for name in ("host_hits", "disk_reads", "disk_prefetch_reads", "disk_bytes", "write_back_bytes",
                                   "guess_new_hits", "guess_new_total", "converted_bytes", "level_copy_bytes")},
        tokens_generated=0 if empty else tokens - 1,
        decode_seconds=0.0 if empty else 0.5,
        token_times=[] if empty else [0.1 * i for i in range(tokens)],
        trace=RoutingTrace(layers, experts, 2),
    )


def annotations(fig: go.Figure) -> list[str]:
    return [a.text for a in fig.layout.annotations]


def test_dashboard_has_every_figure_in_order():
    figures = plots.dashboard(make_stats())
    assert list(figures) == ["experts", "hit_rate", "prefetch_recall", "tokens_per_second", "bytes_moved",
                             "timeline", "cache_map"]
    for fig in figures.values():
        assert isinstance(fig, go.Figure) and fig.layout.title.text
        json.loads(fig.to_json())  # serializable, as Gradio sends it


def test_heatmap_is_layers_by_experts_of_selection_counts():
    stats = make_stats(layers=3, experts=4)
    fig = plots.expert_heatmap(stats)
    heat = fig.data[0]
    assert heat.type == "heatmap"
    assert [list(row) for row in heat.z] == stats.expert_counts
    assert list(heat.x) == [0, 1, 2, 3] and list(heat.y) == [0, 1, 2]
    assert fig.layout.yaxis.autorange == "reversed"  # layer 0 on top, like the model
    assert plots.EMPTY_HINT not in annotations(fig)


def test_per_layer_rates_and_recall():
    stats = make_stats()
    hit = plots.hit_rate_per_layer(stats)
    assert list(hit.data[0].y) == pytest.approx([0.5, 0.8, 0.9])
    assert any("all layers" in text for text in annotations(hit))
    recall = plots.prefetch_recall_per_layer(stats)
    assert list(recall.data[0].x) == [1, 2]  # layer 0 has nothing to guess from
    assert list(recall.data[0].y) == pytest.approx([0.7, 0.7])


def test_tokens_per_second_and_bytes_moved():
    stats = make_stats(tokens=6)
    tps = plots.tokens_per_second(stats)
    assert len(tps.data[0].y) == 5 and list(tps.data[0].x) == [2, 3, 4, 5, 6]
    assert all(v == pytest.approx(10.0) for v in tps.data[0].y)  # a token every 0.1 s
    moved = plots.bytes_moved_per_layer(stats)
    assert list(moved.data[0].y) == pytest.approx([3, 1, 0.5])  # in MiB, the unit of the largest layer
    assert "MiB" in moved.layout.yaxis.title.text


def test_empty_and_prefetch_off_figures_say_so():
    empty = make_stats(empty=True)
    for name, fig in plots.dashboard(empty).items():
        assert (plots.EMPTY_HINT if name != "cache_map" else "no engine") in annotations(fig)
    off = plots.prefetch_recall_per_layer(make_stats(prefetch=0))
    assert any("prefetch is off" in text for text in annotations(off))


def test_counters_extend_the_summary():
    stats = make_stats()
    counters = plots.counters(stats)
    assert stats.summary().items() <= counters.items()
    assert counters["cache_hits"] == 22 and counters["cache_misses"] == 8
    assert counters["experts_per_layer"] == 4 and counters["trace_tokens"] == 0
    json.dumps(counters)


def test_timeline_draws_each_kind_of_span_in_its_layers_row():
    stats = make_stats(layers=2, tokens=3)
    stats.first_token_at, stats.token_times = 0.010, [0.0, 0.004, 0.008]
    stats.timeline = [Span("compute", 0, -1, 0.001, 0.003), Span("stall", 0, 5, 0.0015, 0.0025),
                      Span("demand", 0, 5, 0.0015, 0.0025, "disk"), Span("prefetch", 1, 2, 0.002, 0.006, "ram"),
                      Span("compute", 1, -1, 0.012, 0.013)]
    fig = plots.timeline(stats, last_tokens=None)
    bars = {t.name: t for t in fig.data if t.type == "bar"}
    compute, prefetch = bars["layer compute"], bars["prefetch"]
    assert list(compute.base) == pytest.approx([1.0, 12.0]) and list(compute.x) == pytest.approx([2.0, 1.0])
    assert list(compute.y) == pytest.approx([-0.2, 0.8])  # upper half of layers 0 and 1
    assert list(prefetch.y) == pytest.approx([1.2]) and prefetch.customdata[0][1] == "expert 2 from ram"
    assert bars["demand load"].customdata[0][1] == "expert 5 from disk"
    assert "stalls 1 ms, 33% of compute" in fig.layout.title.text
    ticks = next(t for t in fig.data if t.type == "scatter")
    assert list(ticks.x) == pytest.approx([10.0, 14.0, 18.0])
    newest = plots.timeline(stats, last_tokens=2)  # spans that end after the first token (10 ms)
    assert [t.name for t in newest.data if t.type == "bar"] == ["layer compute"]
    assert "last 2 tokens" in newest.layout.title.text and "latest reply (" in fig.layout.title.text
    assert plots.EMPTY_HINT in annotations(plots.timeline(make_stats(empty=True)))


def test_counter_table_names_units_and_how_to_read_each_row():
    stats = make_stats()
    rows = plots.counter_rows(stats)
    assert all(len(row) == len(plots.COUNTER_COLUMNS) and all(row) for row in rows)
    table = {name: value for name, value, _ in rows}
    assert table["cache hit rate"] == "73.3%"  # 22 hits of 30 selections
    assert table["expert loads on demand"] == "8 loads" and table["prefetch loads"] == "8 loads"
    assert table["prefetch recall"] == "70.0%" and table["prefetch precision"] == "75.0%"
    assert table["bytes moved"] == "4.50 MiB" and table["decode speed"] == "10.00 tokens/s"
    assert table["cache"] == "2 of 4 experts × 3 layers"
    empty = {name: value for name, value, _ in plots.counter_rows(make_stats(empty=True))}
    assert empty["cache hit rate"] == "—" and empty["prefetch recall"] == "—"
    assert set(plots.CAPTIONS) >= set(plots.dashboard(stats))


def test_figures_from_a_real_run(tiny_dir, tmp_path):
    engine = load(tiny_dir, OffloadConfig(device="cpu", store_dir=str(tmp_path / "store")))
    try:
        settings = GenerationSettings(max_new_tokens=6, temperature=0)
        updates = list(engine.chat([{"role": "user", "content": "To be"}], settings))
        stats = engine.stats()
    finally:
        engine.close()
    assert updates[-1].finished
    figures = plots.dashboard(stats)
    heat = figures["experts"].data[0]
    assert sum(map(sum, heat.z)) == stats.trace.num_tokens * stats.top_k * stats.num_layers > 0
    assert len(figures["hit_rate"].data[0].y) == stats.num_layers
    assert len(figures["tokens_per_second"].data[0].y) == len(stats.token_times) - 1

