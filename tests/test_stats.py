"""Counters, snapshots and the routing trace file."""

import json

import pytest

from moe_runtime import OffloadConfig, RoutingTrace, load
from moe_runtime.stats import StatsCollector


def test_trace_from_a_real_run_round_trips_through_a_file(tiny_dir, tmp_path):
    engine = load(tiny_dir, OffloadConfig(device="cpu", cache_size=2, prefetch=2, store_dir=str(tmp_path / "s")))
    try:
        ids = engine.tokenizer("To be, or not", return_tensors="pt")["input_ids"]
        engine.model.generate(ids, max_new_tokens=5, do_sample=False)
        trace = engine.stats().trace
    finally:
        engine.close()
    assert trace.num_tokens == ids.shape[1] + 4  # the prompt, then one token per decode step
    assert all(len(layer) == trace.num_tokens for layer in trace.selected)
    assert all(len(experts) == 2 for layer in trace.selected for experts in layer)
    assert trace.guess[0][0] == [] and len(trace.guess[1][0]) == 4  # no guess for layer 0
    path = trace.save(tmp_path / "trace.json")
    again = RoutingTrace.load(path)
    assert again.to_dict() == trace.to_dict()
    decode = again.decode_only()
    assert decode.num_tokens == 0 or set(decode.phase) == {"decode"}


def test_bad_trace_files_are_refused_with_a_message(tmp_path):
    (tmp_path / "a.json").write_text("{broken")
    with pytest.raises(ValueError, match="cannot read routing trace"):
        RoutingTrace.load(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="is not a routing trace"):
        RoutingTrace.load(tmp_path / "b.json")


def test_recall_counts_top_width_guesses_per_token():
    stats = StatsCollector(2, 4, 2, 2, 2)
    stats.record_routing(0, [[0, 1]], None, 2)
    stats.record_routing(1, [[2, 3], [0, 1]], [[2, 0, 3, 1], [0, 1, 2, 3]], 2)
    s = stats.snapshot()
    assert s.guess_total == [0, 4] and s.guess_hits == [0, 3]
    assert s.prefetch_recall == pytest.approx(0.75)
    assert s.expert_counts == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_token_times_make_decode_throughput():
    stats = StatsCollector(1, 2, 1, 1, 0)
    stats.start_generation()
    for _ in range(5):
        stats.mark_token()
    s = stats.snapshot()
    assert s.tokens_generated == 4 and len(s.token_times) == 5
    assert s.token_times[0] == 0.0 and s.token_times == sorted(s.token_times)
    assert s.tokens_per_second > 0 and len(s.tokens_per_second_series()) == 4
    stats.reset()
    assert stats.snapshot().tokens_generated == 0


def test_trace_keeps_only_the_newest_tokens():
    stats = StatsCollector(2, 4, 1, 2, 0, max_trace_tokens=20)
    for token in range(100):
        stats.record_routing(0, [[token % 4]], None, 1)
        stats.record_routing(1, [[(token + 1) % 4]], [[0, 1, 2, 3]], 1)
    trace = stats.snapshot().trace
    assert 20 <= trace.num_tokens <= 22
    assert len(trace.phase) == trace.num_tokens == len(trace.selected[1]) == len(trace.guess[1])
    assert trace.selected[0][-1] == [99 % 4] and trace.selected[1][-1] == [100 % 4]
    assert sum(stats.snapshot().expert_counts[0]) == 100  # counters are not trimmed


def test_a_snapshot_without_the_trace_still_counts_its_tokens():
    stats = StatsCollector(1, 4, 1, 2, 0)
    stats.record_routing(0, [[1], [2]], None, 1)
    light, full = stats.snapshot(trace=False), stats.snapshot()
    assert light.trace is None and light.trace_tokens == full.trace_tokens == full.trace.num_tokens == 2


def test_a_counters_window_counts_only_what_happened_in_it(tiny_dir, tmp_path):
    engine = load(tiny_dir, OffloadConfig(device="cpu", cache_size=1, prefetch=0, store_dir=str(tmp_path / "s")))
    try:
        ids = engine.tokenizer("To be, or not", return_tensors="pt")["input_ids"]
        engine.model.generate(ids, max_new_tokens=3, do_sample=False)
        start = engine.counters()
        engine.model(ids)  # one forward over the prompt: each layer uses each of its selected experts once
        window = engine.counters() - start
        trace = engine.stats().trace
    finally:
        engine.close()
    distinct = [len({e for token in layer[-ids.shape[1]:] for e in token}) for layer in trace.selected]
    assert window.selections == distinct
    assert [h + m for h, m in zip(window.hits, window.misses)] == window.selections
    assert window.prefetch_precision is None  # prefetch off: nothing loaded ahead, no precision to speak of
    assert 0 <= window.hit_rate <= 1


def test_recall_over_experts_not_on_the_device():
    """prefetch_recall counts every selected expert; prefetch_recall_new only those that were not on
    the device when the guess was made (guessing a resident expert is free)."""
    from moe_runtime.stats import StatsCollector

    stats = StatsCollector(2, 4, 2, 2, 2, record_trace=False)
    # token 1: selected {0, 1}, guessed [0, 2]; 0 was resident -> all: 1 of 2; new: expert 1 only, missed
    stats.record_routing(1, [[0, 1]], [[0, 2, 1, 3]], 2, resident_at_guess={0})
    # token 2: selected {2, 3}, guessed [2, 3]; nothing resident -> all: 2 of 2; new: 2 of 2
    stats.record_routing(1, [[2, 3]], [[2, 3, 0, 1]], 2, resident_at_guess=set())
    c = stats.counters()
    assert c.prefetch_recall == 3 / 4
    assert c.prefetch_recall_new == 2 / 3
    assert StatsCollector(2, 4, 2, 2, 2).counters().prefetch_recall_new is None
