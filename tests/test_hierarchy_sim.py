"""The three-level replay (sim/hierarchy.py) and the Colab-T4 scenario (sim/scenario.py)."""

from __future__ import annotations

import json

import pytest

from moe_runtime.config import OffloadConfig
from moe_runtime.sim.cli import main
from moe_runtime.sim.hierarchy import simulate_hierarchy
from moe_runtime.sim.replay import simulate
from moe_runtime.sim.scenario import run_scenario, scenario_report
from moe_runtime.sim.synth import RoutingStats, synthesize
from moe_runtime.sim.throughput import HARDWARE
from moe_runtime.stats import RoutingTrace
from tests.test_simulate import random_trace


def one_layer(selected, num_experts):
    return RoutingTrace(1, num_experts, len(selected[0]), selected=[selected], guess=[[]])


def test_exclusive_by_hand():
    # E=3, K=1, C=1 device slot, host 1 slot, exclusive. Tokens 0 1 0 1:
    # t0: 0 from disk (host stays empty); t1: 1 from disk, 0 evicted -> written back (host {0});
    # t2: 0 from host (host empty again), 1 written back (host {1}); t3: 1 from host, 0 written back.
    r = simulate_hierarchy(one_layer([[0], [1], [0], [1]], 3), 1, 1, 10, exclusive=True)
    assert (r.hits, r.misses, r.disk_reads, r.host_hits, r.write_backs) == ([0], [4], [2], [2], [3])
    assert r.disk_rereads == [0] and r.peak_host_records == 1 and r.peak_host_bytes == 20


def test_inclusive_by_hand():
    # Same tokens, inclusive, host 1 slot: t0 disk (host {0}); t1 disk (host {1}, 0 evicted);
    # t2 disk again (re-read; host {0}); t3 disk again (host {1}).
    r = simulate_hierarchy(one_layer([[0], [1], [0], [1]], 3), 1, 1, 10, exclusive=False)
    assert (r.disk_reads, r.host_hits, r.write_backs, r.disk_rereads) == ([4], [0], [0], [2])
    # With 2 host slots both stay: only the first use of each is read from disk.
    r = simulate_hierarchy(one_layer([[0], [1], [0], [1]], 3), 1, 2, 10, exclusive=False)
    assert (r.disk_reads, r.host_hits) == ([2], [2])


@pytest.mark.parametrize("exclusive", [True, False])
@pytest.mark.parametrize("cache_size,prefetch", [(1, 0), (2, 0), (3, 2), (5, 1)])
def test_device_level_is_the_plain_replay_and_levels_add_up(exclusive, cache_size, prefetch):
    trace = random_trace(seed=11, num_layers=3, num_experts=6, num_tokens=60)
    plain = simulate(trace, "lru", cache_size, prefetch)
    for host_slots in (0, 4, 18):
        r = simulate_hierarchy(trace, cache_size, host_slots, 100, exclusive=exclusive, prefetch=prefetch)
        assert (r.hits, r.misses, r.prefetch_loads) == (plain.hits, plain.misses, plain.prefetch_loads)
        loads = [m + p for m, p in zip(r.misses, r.prefetch_loads)]
        assert [h + d for h, d in zip(r.host_hits, r.disk_reads)] == loads  # every load comes from one level
        assert r.peak_host_records <= host_slots
        if host_slots == 0:
            assert r.disk_reads == loads
        if host_slots == 18:  # every expert fits: each is read from disk once
            assert sum(r.disk_reads) == r.distinct_experts and sum(r.disk_rereads) == 0


@pytest.fixture(scope="module")
def mixtral_like():
    return synthesize(RoutingStats.load(), 160, 2, seed=3)


def test_single_level_by_hand():
    # E=3, K=1, 1 host slot, no device slots: tokens 0 0 1 0. t0: disk (host {0}); t1: host hit;
    # t2: disk, 0 evicted (host {1}); t3: disk again (a re-read).
    r = simulate_hierarchy(one_layer([[0], [0], [1], [0]], 3), 0, 1, 10, level="single")
    assert (r.host_hits, r.disk_reads, r.disk_rereads, r.write_backs) == ([1], [3], [1], [0])
    assert (r.hits, r.misses) == (r.host_hits, r.disk_reads) and r.host_hit_rate == 0.25


def test_colab_t4_scenario_meets_the_budgets(mixtral_like):
    out = run_scenario("colab-t4", mixtral_like)
    r = out.result
    assert r.cache_size == 4 and out.fits_cache_size >= 4 and r.exclusive
    assert r.host_policy == OffloadConfig().host_policy
    assert out.model.expert_group_size == OffloadConfig(expert_bits=2).expert_group  # the engine's record
    assert sum(r.disk_rereads) == 0 and r.late_disk_reads == 0  # no disk reads after each expert's first use
    assert sum(r.disk_reads) == r.distinct_experts
    assert out.peak_host_bytes < 12.7e9
    assert 1.0 < out.tokens_per_second < 4.0 and out.cold_tokens_per_second < out.tokens_per_second


def test_colab_t4_scenario_counts_write_backs(mixtral_like):
    out = run_scenario("colab-t4", mixtral_like)
    r, m = out.result, out.model
    engine, serial, main_path = (out.predictions[p] for p in ("engine", "engine-serial", "main"))
    assert sum(r.write_backs) > 0
    assert engine.write_back_s == 0  # overlapped: every write-back runs during its miss's load
    one_way = r.per_token(r.write_backs) * m.expert_bytes / (HARDWARE["t4-pcie3"].link_gbs * 1e9)
    assert serial.write_back_s == pytest.approx(one_way)
    assert 1 / serial.tokens_per_second - 1 / engine.tokens_per_second == pytest.approx(one_way)
    assert main_path.tokens_per_second < serial.tokens_per_second
    text = scenario_report(out)
    assert f"including {serial.write_back_s * 1e3:.1f} ms/token of write-back" in text
    assert "including 0.0 ms/token of write-back" in text


def test_scenario_refuses_what_does_not_fit(mixtral_like):
    with pytest.raises(ValueError, match="does not fit"):
        run_scenario("colab-t4", mixtral_like, cache_size=8)
    with pytest.raises(ValueError, match="not allowed"):
        run_scenario("colab-t5", mixtral_like)
    with pytest.raises(ValueError, match="trace has L=1"):
        run_scenario("colab-t4", one_layer([[0, 1]], 8))


def test_cli_scenario_and_calibrate(tmp_path, capsys):
    trace = tmp_path / "t.json"
    assert main(["synth", "--out", str(trace), "--tokens", "40", "--generations", "1"]) == 0
    out = tmp_path / "s.json"
    assert main(["scenario", "colab-t4", "--trace", str(trace), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "peak host memory" in text and "2.09" in text
    data = json.loads(out.read_text())
    assert data["num_tokens"] == 40 and data["peak_host_bytes"] < 12.7e9
    assert main(["calibrate"]) == 0
    text = capsys.readouterr().out
    for paper in ("2.09", "0.66", "2.28", "0.92", "3.06", "1.39"):
        assert paper in text


@pytest.mark.parametrize("exclusive", [True, False])
def test_engine_at_colab_ratios_matches_the_three_level_replay(tmp_path, mixtral_like, exclusive):
    """The colab-t4 scenario through the real engine, scaled down: Mixtral's 32 layers x 8 experts and
    the scenario's ratios (4 device slots per layer, 129 host records = the 128 experts not on the
    device + 1 staging), experts shrunk from H 4096 / I 14336 to 32 / 64 (a factor of 28,672 in bytes).
    The CPU engine stands in for the device: exclusive levels are the GPU's stacking on CPU tensors,
    inclusive ones the CPU's own (the layers compute from the host arena, replayed as inclusive)."""
    import torch

    from moe_runtime.bench import workload as wl

    tokens = 48
    spec = wl.WorkloadSpec(layers=32, hidden=32, intermediate=64, experts=8, top_k=2, bits=None, dtype="float32")
    replay = wl.map_trace(mixtral_like, 32, first_layer=0)
    stack = wl.OffloadedStack(spec, replay, wl.build_store(spec, tmp_path), 4, 0, torch.device("cpu"),
                              host_slots=129, levels="exclusive" if exclusive else "shared")
    try:
        for n in range(tokens):
            stack.step(n)
        c = stack.stats.counters()
    finally:
        stack.close()
    trace = RoutingTrace(32, 8, 2, selected=[rows[:tokens] for rows in replay.selected], phase=["decode"] * tokens)
    sim = simulate_hierarchy(trace, 4, 129, stack.tier.stride, exclusive=exclusive, host_policy="lru")
    assert (c.hits, c.misses) == (sim.hits, sim.misses)
    assert (c.host_hits, c.disk_reads) == (sim.host_hits, sim.disk_reads)
    if exclusive:  # the scenario's claim: each expert is read from disk once, then moves RAM <-> device
        assert sum(c.disk_reads) == sim.distinct_experts and sum(sim.disk_rereads) == 0
        assert sum(c.write_back_bytes) == sum(sim.write_backs) * stack.tier.stride > 0
