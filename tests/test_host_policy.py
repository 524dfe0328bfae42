"""The host level's eviction policies (policies.HOST_POLICIES): no thrashing on a layer-by-layer walk."""

from __future__ import annotations

import json
import random

import pytest

from moe_runtime.config import OffloadConfig
from moe_runtime.policies import HOST_POLICIES, LRU, LayerClockFrequency, LayerQuota, make_host_policy
from moe_runtime.sim.cli import main
from moe_runtime.sim.hierarchy import host_policy_sweep, host_requests, replay_host, simulate_hierarchy
from moe_runtime.stats import RoutingTrace


def cyclic_trace(num_layers=4, num_experts=4, num_tokens=30):
    """Every token uses experts 0 and 1 of every layer: a working set of 2 per layer, L x 2 in all."""
    selected = [[[0, 1] for _ in range(num_tokens)] for _ in range(num_layers)]
    return RoutingTrace(num_layers, num_experts, 2, selected=selected, guess=[[] for _ in range(num_layers)])


def random_trace(seed, num_layers=3, num_experts=5, top_k=2, num_tokens=40):
    rng = random.Random(seed)
    selected = [[sorted(rng.sample(range(num_experts), top_k)) for _ in range(num_tokens)] for _ in range(num_layers)]
    return RoutingTrace(num_layers, num_experts, top_k, selected=selected, guess=[[] for _ in range(num_layers)],
                        phase=["decode"] * num_tokens)


def test_cyclic_walk_below_the_working_set_lru_thrashes_quota_lfru_does_not():
    # 4 layers x 2 experts in use = 8 records needed, 6 held. The walk visits them in a cycle, so a
    # global LRU always evicts the record needed next: not one hit after the first token. Quotas
    # (2, 2, 1, 1) keep every layer's share until its next visit; a layer that needs more than its
    # share takes it from the layer visited last (needed last).
    trace = cyclic_trace()
    lru = simulate_hierarchy(trace, 0, 6, 1, level="single", host_policy="lru")
    quota = simulate_hierarchy(trace, 0, 6, 1, level="single", host_policy="quota-lfru")
    best = simulate_hierarchy(trace, 0, 6, 1, level="single", host_policy="belady")
    assert sum(lru.host_hits) == 0
    assert all(hits >= trace.num_tokens - 2 for hits in quota.host_hits)  # every layer keeps a record
    assert quota.host_hit_rate > 0.55 and sum(quota.host_hits) >= 0.9 * sum(best.host_hits)


@pytest.mark.parametrize("name", list(HOST_POLICIES))
def test_every_host_policy_holds_everything_when_everything_fits(name):
    trace = random_trace(3)
    r = simulate_hierarchy(trace, 0, trace.num_layers * trace.num_experts, 1, level="single", host_policy=name)
    assert sum(r.disk_reads) == r.distinct_experts and sum(r.disk_rereads) == 0


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("slots", [2, 5, 9])
def test_belady_beats_every_host_policy_on_a_single_level(seed, slots):
    # On one level with the token's experts pinned (slots >= K), MIN is optimal: a bound for every policy.
    requests = host_requests(random_trace(seed), "single")
    best = sum(replay_host(requests, slots, "belady")[0].host_hits)
    for name in HOST_POLICIES:
        assert sum(replay_host(requests, slots, name)[0].host_hits) <= best, name


def test_layer_quota_takes_the_victim_from_the_layer_over_its_quota():
    policy = LayerQuota(num_layers=2, slots=4, inner=LRU())  # quotas 2 and 2
    for key in [(0, 0), (1, 0), (1, 1), (1, 2)]:  # layer 1 holds 3: one over
        policy.insert(key)
    assert policy.victim([(0, 0), (1, 0), (1, 1), (1, 2)]) == (1, 0)  # LRU within layer 1, not the older (0, 0)
    policy.evict((1, 0))
    policy.insert((0, 1))  # now 2 and 2: no layer over, the inner policy ranks them all
    assert policy.victim([(0, 0), (0, 1), (1, 1), (1, 2)]) == (0, 0)
    policy.evict((1, 3))  # a key it never held (the engine evicts only held keys): counts stay >= 0
    assert min(policy.held) >= 0


def test_layer_clock_frequency_counts_time_per_layer():
    policy = LayerClockFrequency(num_layers=2, half_life=1.0)
    policy.access((0, 0))
    policy.access((0, 1))
    for _ in range(5):  # layer 1's events do not age layer 0's keys
        policy.access((1, 0))
    assert policy.victim([(0, 0), (1, 0)]) == (0, 0)  # 1 * 0.5 (one layer-0 event old) < 5 recent uses
    policy.access((0, 1))
    policy.access((0, 1))  # (0, 0) is now 3 of its layer's events old: 0.125
    assert policy.victim([(0, 0), (0, 1)]) == (0, 0)
    assert policy.victim([(0, 1), (1, 7)]) == (1, 7)  # never used: score 0
    with pytest.raises(ValueError, match="half_life"):
        LayerClockFrequency(1, half_life=0)


def test_recent_bonus_favours_the_experts_of_the_layers_latest_visit():
    # (0, 0) used 3 times long ago, (0, 1) once at layer 0's latest visit (then layer 1 ran).
    plain, stay = (LayerClockFrequency(num_layers=2, half_life=1e9, recent_bonus=b) for b in (0.0, 4.0))
    for policy in (plain, stay):
        for key in [(0, 0), (0, 0), (0, 0), (1, 0), (0, 1), (1, 0)]:
            policy.access(key)
    assert plain.victim([(0, 0), (0, 1)]) == (0, 1)  # 1 use < 3 uses
    assert stay.victim([(0, 0), (0, 1)]) == (0, 0)  # 1 x (1 + 4) > 3: (0, 0) was not used at the latest visit
    stay.access((0, 2))  # a new visit of layer 0: (0, 1) is no longer recent
    assert stay.victim([(0, 0), (0, 1)]) == (0, 1)


def test_frequency_keeps_the_often_used_expert_where_lru_keeps_the_last_one():
    policy = LayerClockFrequency(num_layers=1, half_life=100.0)
    for _ in range(4):
        policy.access((0, 0))
    policy.access((0, 1))
    assert policy.victim([(0, 0), (0, 1)]) == (0, 1)
    lru = LRU()
    for key in [(0, 0)] * 4 + [(0, 1)]:
        lru.access(key)
    assert lru.victim([(0, 0), (0, 1)]) == (0, 0)


def test_make_host_policy_checks_its_arguments():
    with pytest.raises(ValueError, match="host_policy='mru' is not allowed: use one of quota-lfru, quota-lfru-stay, lru"):
        make_host_policy("mru", num_layers=2, num_experts=4, slots=3)
    for bad in ({"num_layers": 0}, {"num_experts": True}, {"slots": -1}):
        args = {"num_layers": 2, "num_experts": 4, "slots": 3, **bad}
        with pytest.raises(ValueError, match=f"{next(iter(bad))}=.* is not allowed"):
            make_host_policy("lru", **args)
    for name in HOST_POLICIES:
        policy = make_host_policy(name, num_layers=2, num_experts=4, slots=0)  # no slots: a valid, empty pool
        policy.insert((1, 3))
        policy.access((1, 3))
        assert policy.victim([(1, 3)]) == (1, 3)


def test_single_level_smaller_than_a_token_computes_from_staging():
    # 1 slot, K=2: both experts are pinned while they run, so the second is never kept.
    r = simulate_hierarchy(cyclic_trace(num_layers=1), 0, 1, 1, level="single", host_policy="quota-lfru")
    assert r.peak_host_records == 1 and sum(r.host_hits) == r.num_tokens - 1
    with pytest.raises(ValueError, match="level='single'"):
        simulate_hierarchy(cyclic_trace(), 2, 4, 1, level="single")
    with pytest.raises(ValueError, match="contradicts"):
        simulate_hierarchy(cyclic_trace(), 2, 4, 1, level="single", exclusive=True)
    with pytest.raises(ValueError, match="host_policy='mru'"):
        simulate_hierarchy(cyclic_trace(), 2, 4, 1, host_policy="mru")


def test_config_host_policy_default_and_validation():
    assert OffloadConfig().host_policy == next(iter(HOST_POLICIES)) == "quota-lfru"
    assert OffloadConfig(host_policy="lru").host_policy == "lru"
    with pytest.raises(ValueError, match="host_policy='belady' is not allowed: use one of 'quota-lfru', 'quota-lfru-stay', 'lru'"):
        OffloadConfig(host_policy="belady")


def test_sweep_and_cli_table(tmp_path, capsys):
    trace = random_trace(1, num_layers=4, num_experts=6, num_tokens=30)
    rows = host_policy_sweep(trace, [0.25, 1.0], ["lru", "belady"], cache_size=2)
    assert {(r.level, r.budget) for r in rows} == {(lv, b) for lv in ("exclusive", "inclusive", "single")
                                                   for b in (0.25, 1.0)}
    for r in rows:
        assert r.slots == (6 if r.budget == 0.25 else 24)
    with pytest.raises(ValueError, match="budget=0 is not allowed"):
        host_policy_sweep(trace, [0], ["lru"])
    path = tmp_path / "t.json"
    trace.save(path)
    md, js = tmp_path / "h.md", tmp_path / "h.json"
    assert main(["host-policy", "--trace", str(path), "--budgets", "25,100", "--levels", "single",
                 "--host-policies", "quota-lfru,lru,belady", "--half-lives", "4", "--markdown", str(md),
                 "--json", str(js)]) == 0
    text = capsys.readouterr().out
    assert "single RAM level" in text and "| quota-lfru/h4 |" in text and "| belady |" in text
    assert md.read_text() == text
    assert {(r["host_policy"], r["budget"]) for r in json.loads(js.read_text())} == {
        (p, b) for p in ("quota-lfru", "lru", "belady", "quota-lfru/h4") for b in (0.25, 1.0)}
    assert main(["host-policy", "--trace", str(path), "--levels", "sideways"]) == 2
    assert "level='sideways' is not allowed" in capsys.readouterr().err
