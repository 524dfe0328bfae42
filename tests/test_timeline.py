"""The load/compute timeline: spans recorded by the cache, the transfer and the experts modules,
checked against the independent counters and against the order the pipeline must follow."""

import time
from collections import Counter

import pytest

from moe_runtime import GenerationSettings, OffloadConfig, load
from moe_runtime.stats import StatsCollector


@pytest.mark.parametrize("offload, cache_size, prefetch", [("ram", 1, 0), ("ram", 2, 2), ("disk", 3, 1)])
def test_a_replys_spans_match_its_counters_and_the_pipeline(tiny_dir, tmp_path, offload, cache_size, prefetch):
    engine = load(tiny_dir, OffloadConfig(device="cpu", offload=offload, cache_size=cache_size, prefetch=prefetch,
                                          store_dir=str(tmp_path / "store")))
    try:
        engine.reset_stats()
        final = list(engine.chat([{"role": "user", "content": "To be"}], GenerationSettings(6, temperature=0)))[-1]
        stats = engine.stats(trace=False)
    finally:
        engine.close()
    spans, layers = stats.timeline, stats.num_layers
    kinds = Counter(s.kind for s in spans)
    # one compute span per layer and forward pass (the prompt's, then one per token but the last)
    assert Counter(s.layer for s in spans if s.kind == "compute") == {layer: final.new_tokens for layer in range(layers)}
    assert kinds["demand"] == stats.total("misses") and kinds["prefetch"] == stats.total("prefetch_issued")
    assert kinds["stall"] >= kinds["demand"]  # every demand load is waited for
    # loads come from the tier: RAM, or disk through the host-RAM cache (a load it serves is "host")
    assert {s.level for s in spans if s.kind in ("demand", "prefetch")} <= ({"ram"} if offload == "ram" else {"host", "disk"})
    assert all(0 <= s.start <= s.end for s in spans)
    computes = {layer: [s for s in spans if s.kind == "compute" and s.layer == layer] for layer in range(layers)}
    for span in spans:
        if span.kind in ("demand", "stall"):  # a demand load and a wait happen inside its layer's forward
            assert any(c.start <= span.start and span.end <= c.end for c in computes[span.layer]), span
    for rows in computes.values():  # a layer's passes follow each other
        assert all(a.end <= b.start for a, b in zip(rows, rows[1:]))
    assert stats.first_token_at is not None and 0 < stats.first_token_at <= max(s.end for s in spans) + 1


def test_the_ring_buffer_keeps_the_newest_spans_and_reset_empties_it():
    stats = StatsCollector(2, 4, 2, 2, 2, max_spans=10)
    stats.start_generation()
    for i in range(25):
        stats.record_span("compute", i % 2, -1, float(i), float(i) + 0.5)
    assert len(stats.spans) == 10 and stats.spans[-1].start == 24.0 and stats.spans[0].start == 15.0
    stats.record_stall(1, 0.25, expert=3)
    assert stats.spans[-1][:3] == ("stall", 1, 3) and stats.spans[-1].end - stats.spans[-1].start == 0.25
    stats.reset()
    assert stats.snapshot().timeline == []


def test_a_snapshot_holds_only_the_latest_reply_in_its_own_seconds():
    stats = StatsCollector(1, 4, 2, 2, 2)
    stats.record_span("compute", 0, -1, 0.0, 1.0)  # long before the reply: left out
    stats.start_generation()
    now = time.perf_counter()
    stats.record_span("prefetch", 0, 2, now, now + 0.25, "ram")
    (span,) = stats.snapshot().timeline
    assert span[:3] == ("prefetch", 0, 2) and span.level == "ram"
    assert 0 <= span.start < 1 and span.end - span.start == pytest.approx(0.25)
