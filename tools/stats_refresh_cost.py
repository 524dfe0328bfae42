"""What one refresh of the app's Stats tab costs (each open tab refreshes once a second while a reply
streams): the snapshot, the cache map query, every figure, and the JSON the browser is sent.

    python -m tools.stats_refresh_cost                  # the embedded model after a 40-token reply
    python -m tools.stats_refresh_cost --repeats 20

Also times the two new figures at Mixtral/Qwen3-MoE-like sizes on made-up data (48 layers x 128
experts, a full timeline ring buffer), the worst case a big model gives them.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time

from moe_runtime import GenerationSettings
from moe_runtime.config import OffloadConfig
from moe_runtime.stats import MAX_SPANS, StatsCollector
from webapp import plots
from webapp.service import EngineService


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall time of `fn()` in ms over `repeats` calls, and its last result."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times), out


def served_model(repeats: int, tokens: int) -> list[str]:
    with tempfile.TemporaryDirectory() as store:
        service = EngineService(config=OffloadConfig(device="cpu", store_dir=store))
        service.start()
        try:
            list(service.chat([{"role": "user", "content": "To be, or not to be"}],
                              GenerationSettings(tokens, temperature=0.7, seed=0)))
            snapshot_ms, stats = timed(lambda: service.stats(trace=False), repeats)
            map_query_ms, levels = timed(service.cache_map, repeats)
            figures_ms, figures = timed(lambda: plots.dashboard(stats, levels=levels), repeats)
            map_ms, _ = timed(lambda: plots.cache_map(levels, stats), repeats)
            timeline_ms, _ = timed(lambda: plots.timeline(stats), repeats)
            table_ms, _ = timed(lambda: (plots.counters(stats), plots.counter_rows(stats)), repeats)
            json_ms, payload = timed(lambda: [fig.to_json() for fig in figures.values()], repeats)
            kib = sum(map(len, payload)) / 1024
            shape = f"{stats.num_layers} layers x {stats.num_experts} experts, {len(stats.timeline)} timeline spans"
        finally:
            service.close()
    total = snapshot_ms + map_query_ms + figures_ms + table_ms + json_ms
    return [f"## embedded model ({shape}), median of {repeats}", "",
            "| part | ms |", "| --- | ---: |",
            f"| snapshot (counters, timeline; no trace) | {snapshot_ms:.1f} |",
            f"| cache map query (every layer's slots) | {map_query_ms:.2f} |",
            f"| all {len(figures)} figures | {figures_ms:.1f} |",
            f"| of which the live cache map | {map_ms:.1f} |",
            f"| of which the timeline (newest {plots.TIMELINE_TOKENS} tokens) | {timeline_ms:.1f} |",
            f"| counter table | {table_ms:.2f} |",
            f"| figures to JSON ({kib:.0f} KiB sent) | {json_ms:.1f} |",
            f"| **one refresh, one open tab** | **{total:.0f}** |", ""]


def big_model(repeats: int, layers: int = 48, experts: int = 128, top_k: int = 8) -> list[str]:
    """The new figures on made-up data of a large model: every place in the map, a full ring of spans."""
    rng = random.Random(0)
    collector = StatsCollector(layers, experts, top_k, 16, 8, record_trace=False)
    collector.start_generation()
    for _ in range(MAX_SPANS // (layers * 4)):
        start = time.perf_counter()
        collector.mark_token()
        for layer in range(layers):
            t = start + layer * 1e-5
            collector.record_span("compute", layer, -1, t, t + 8e-4)
            collector.record_span("prefetch", layer, rng.randrange(experts), t, t + 2e-3, "ram")
            collector.record_span("demand", layer, rng.randrange(experts), t, t + 5e-4, "disk")
            collector.record_span("stall", layer, rng.randrange(experts), t, t + 5e-4)
    stats = collector.snapshot(trace=False)
    places = list(plots.PLACES)
    levels = [[rng.choice(places) for _ in range(experts)] for _ in range(layers)]
    map_ms, fig = timed(lambda: plots.cache_map(levels, stats), repeats)
    map_kib = len(fig.to_json()) / 1024
    newest_ms, fig = timed(lambda: plots.timeline(stats), repeats)
    newest_kib = len(fig.to_json()) / 1024
    all_ms, fig = timed(lambda: plots.timeline(stats, last_tokens=None), repeats)
    all_kib = len(fig.to_json()) / 1024
    return [f"## made-up large model ({layers} layers x {experts} experts, {len(stats.timeline)} spans), "
            f"median of {repeats}", "", "| figure | ms | KiB as JSON |", "| --- | ---: | ---: |",
            f"| live cache map | {map_ms:.1f} | {map_kib:.0f} |",
            f"| timeline, newest {plots.TIMELINE_TOKENS} tokens | {newest_ms:.1f} | {newest_kib:.0f} |",
            f"| timeline, whole ring (at most {plots.MAX_DRAWN_SPANS} spans drawn) | {all_ms:.1f} | {all_kib:.0f} |", ""]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.stats_refresh_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=10, help="timed calls per part (the median is printed)")
    p.add_argument("--tokens", type=int, default=40, help="tokens of the reply before timing")
    args = p.parse_args(argv)
    print("\n".join(served_model(args.repeats, args.tokens) + big_model(max(args.repeats // 2, 1))))


if __name__ == "__main__":
    main()
