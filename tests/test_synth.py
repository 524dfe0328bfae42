"""Mixtral-like synthetic routing: a generated trace reproduces the real routing's statistics.

The generator is fitted to the per-expert shares and stay probabilities only; the overlap with the
previous token and the LRU hit rates are the statistics file's independent reference figures.
"""

from __future__ import annotations

import json

import pytest

from moe_runtime.sim.cli import main
from moe_runtime.sim.replay import check_trace, simulate
from moe_runtime.sim.synth import RoutingStats, expert_shares, overlap_with_previous, synthesize
from moe_runtime.stats import RoutingTrace

GENERATIONS, TOKENS_PER_GENERATION = 8, 250


@pytest.fixture(scope="module")
def stats():
    return RoutingStats.load()


@pytest.fixture(scope="module")
def generations(stats):
    """Independent generations, each replayed from a cold cache (as the reference figures were)."""
    trace = synthesize(stats, GENERATIONS * TOKENS_PER_GENERATION, GENERATIONS, seed=1)
    check_trace(trace)
    n = TOKENS_PER_GENERATION
    return [RoutingTrace(trace.num_layers, trace.num_experts, trace.top_k, trace.model,
                         selected=[rows[g * n:(g + 1) * n] for rows in trace.selected], phase=["decode"] * n)
            for g in range(GENERATIONS)]


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.parametrize("cache_size", [2, 3, 4, 5, 6])
def test_lru_hit_rate_near_real_mixtral(stats, generations, cache_size):
    hit_rate = _mean([simulate(g, "lru", cache_size).hit_rate for g in generations])
    assert hit_rate == pytest.approx(stats.reference_hit_rates["lru"][str(cache_size)], abs=0.035)


def test_overlap_with_previous_token_near_real_mixtral(stats, generations):
    synthetic = _mean([_mean(overlap_with_previous(g)) for g in generations])
    assert synthetic == pytest.approx(_mean(stats.overlap_with_previous_token), abs=0.03)
    per_layer = [_mean(layer) for layer in zip(*(overlap_with_previous(g) for g in generations))]
    for layer, (ours, real) in enumerate(zip(per_layer, stats.overlap_with_previous_token)):
        assert ours == pytest.approx(real, abs=0.08), f"layer {layer}"


def test_expert_shares_match(stats):
    trace = synthesize(stats, 4000, 4, seed=2)
    for layer, (ours, real) in enumerate(zip(expert_shares(trace), stats.expert_share)):
        assert ours == pytest.approx(real, abs=0.03), f"layer {layer}"


def test_same_seed_same_trace_and_shape(stats):
    a, b = synthesize(stats, 40, 2, seed=5), synthesize(stats, 40, 2, seed=5)
    assert a.selected == b.selected and a.num_tokens == 40 and a.num_layers == 32
    assert synthesize(stats, 40, 2, seed=6).selected != a.selected


@pytest.mark.parametrize("bad", [{"num_tokens": 0}, {"num_tokens": 3, "generations": 4}, {"generations": 0}])
def test_bad_sizes_are_refused(stats, bad):
    with pytest.raises(ValueError, match="not allowed"):
        synthesize(stats, **{"num_tokens": 10, "generations": 1, **bad})


def test_cli_writes_a_replayable_trace(tmp_path, capsys):
    out = tmp_path / "synthetic.json"
    assert main(["synth", "--out", str(out), "--tokens", "64", "--generations", "2"]) == 0
    trace = RoutingTrace.load(out)
    check_trace(trace)
    assert trace.num_tokens == 64 and trace.num_layers == 32
    assert json.loads(out.read_text())["model"].startswith("mixtral-8x7b-like synthetic")
    assert main([str(out), "--cache-sizes", "4", "--prefetch", "0", "--policies", "lru"]) == 0
    assert "lru" in capsys.readouterr().out
