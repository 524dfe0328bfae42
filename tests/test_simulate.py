"""The trace simulator: hand-computed replays, Belady's optimality, the throughput model, the CLI.

Hand derivations follow the simulator's rules (module docstring of moe_runtime/sim/replay.py): per
token, prefetch first; then the token's experts in ascending id, resident ones (hits) first, then
each missing one loaded; with C >= K the token's experts are pinned.
"""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys

import pytest

from moe_runtime.paths import REPO_ROOT
from moe_runtime.policies import POLICIES
from moe_runtime.sim.cli import main
from moe_runtime.sim.replay import SIM_POLICIES, check_trace, predict_throughput, simulate, sweep
from moe_runtime.sim.throughput import (
    HARDWARE,
    LAYER_OVERHEAD_S,
    MIXTRAL_LRU_HIT_RATES,
    MODELS,
    PAPER_PATH,
    PATHS,
    fitting_cache_size,
    paper_errors,
    predict_from_loads,
)
from moe_runtime.stats import RoutingTrace


def one_layer(selected, num_experts, top_k=None, guess=None) -> RoutingTrace:
    top_k = top_k or len(selected[0])
    return RoutingTrace(1, num_experts, top_k, selected=[selected], guess=[guess or []])


def random_trace(seed, num_layers=2, num_experts=6, top_k=2, num_tokens=40, with_guess=True) -> RoutingTrace:
    rng = random.Random(seed)
    hot = [rng.random() ** 3 + 0.01 for _ in range(num_experts)]  # skewed, like real routers

    def pick():
        chosen = []
        while len(chosen) < top_k:
            e = rng.choices(range(num_experts), weights=hot)[0]
            if e not in chosen:
                chosen.append(e)
        return chosen

    selected = [[pick() for _ in range(num_tokens)] for _ in range(num_layers)]
    guess = [[[] for _ in range(num_tokens)]]  # layer 0: nothing to guess from (as the engine records it)
    guess += [[rng.sample(range(num_experts), num_experts) for _ in range(num_tokens)]
              for _ in range(num_layers - 1)]
    phase = ["prefill"] * 3 + ["decode"] * (num_tokens - 3)
    return RoutingTrace(num_layers, num_experts, top_k, "random", selected,
                        guess if with_guess else [], phase)


# --- hand-computed replays ------------------------------------------------------------------
def test_cyclic_sequence_lru_thrashes_belady_does_not():
    # E=3, K=1, C=2, experts 0 1 2 0 1 2 0 1 2.
    # LRU: the expert needed is always the one evicted last (the least recent): 9 misses, 0 hits.
    # Belady: t0, t1 miss (fill {0,1}); t2 miss, evict 1 (next at t4; 0 is next at t3) -> {0,2};
    # t3 hit 0; t4 miss, evict 0 (t6; 2 is at t5) -> {1,2}; t5 hit 2; t6 miss, evict 2 (t8; 1 at t7)
    # -> {0,1}; t7 hit 1; t8 miss. Hits at t3, t5, t7 = 3; misses 6.
    trace = one_layer([[0], [1], [2]] * 3, num_experts=3)
    lru = simulate(trace, "lru", cache_size=2)
    belady = simulate(trace, "belady", cache_size=2)
    assert (lru.hits, lru.misses) == ([0], [9])
    assert (belady.hits, belady.misses) == ([3], [6])
    assert belady.hit_rate == pytest.approx(3 / 9)


def test_top2_trace_lru_and_belady():
    # E=4, K=2, C=3; tokens {0,1} {0,2} {1,3} {0,3} {1,2}.
    # LRU (recency listed oldest first):
    #   t0: miss 0, 1             -> {0,1}    recency 0 1
    #   t1: hit 0; miss 2 (room)  -> {0,1,2}  recency 1 0 2
    #   t2: hit 1; miss 3, evict the older of the unpinned {0,2}: 0 -> {1,2,3}  recency 2 1 3
    #   t3: hit 3; miss 0, evict the older of {1,2}: 2           -> {0,1,3}  recency 1 3 0
    #   t4: hit 1; miss 2, evict the older of {0,3}: 3           -> {0,1,2}
    #   hits 4, misses 6.
    # Belady:
    #   t0: miss 0, 1; t1: hit 0, miss 2 (room) -> {0,1,2}
    #   t2: hit 1; miss 3, evict 2 (next use t4; 0 is next used at t3) -> {0,1,3}
    #   t3: hit 0, hit 3
    #   t4: hit 1; miss 2, evict 0 (0 and 3 are never used again; ties go to the lowest id)
    #   hits 5, misses 5.
    trace = one_layer([[0, 1], [2, 0], [3, 1], [0, 3], [2, 1]], num_experts=4)
    lru = simulate(trace, "lru", cache_size=3)
    belady = simulate(trace, "belady", cache_size=3)
    assert (lru.hits, lru.misses) == ([4], [6])
    assert (belady.hits, belady.misses) == ([5], [5])


@pytest.mark.parametrize("policy", SIM_POLICIES)
def test_cache_smaller_than_top_k_runs_experts_one_at_a_time(policy):
    # E=3, K=2, C=1: t0 needs {0,1}: load 0, run it, then 1 evicts it -> {1};
    # t1 needs {1,2}: hit 1, then 2 evicts 1. Every victim is forced: hits 1, misses 3.
    result = simulate(one_layer([[0, 1], [1, 2]], num_experts=3), policy, cache_size=1)
    assert (result.hits, result.misses) == ([1], [3])


def test_prefetch_hand_computed():
    # Two layers with the same routing 0 1 2 0 (E=4, K=1, C=2); only layer 1 has a guess, whose
    # top-1 is 0 2 2 3 (right, wrong, right, wrong: recall 2/4). Layer 1 with LRU, prefetch 1:
    #   t0: prefetch 0 -> {0}; run 0: hit (prefetch used)
    #   t1: prefetch 2 (room) -> {0,2}; run 1: miss, evict 0 (older than 2) -> {1,2}
    #   t2: 2 is resident: no prefetch; run 2: hit (prefetch used)
    #   t3: prefetch 3, evict 1 (older than 2) -> {2,3}; run 0: miss, evict 2 (older than 3) -> {3,0}
    #   hits 2, misses 2, prefetch loads 3, used 2, wasted 1 (expert 3).
    # Layer 0 (no guess): 0 1 fill the cache, 2 evicts 0, 0 evicts 1: 4 misses.
    rankings = [[0, 1, 2, 3], [2, 0, 1, 3], [2, 3, 0, 1], [3, 2, 1, 0]]
    selected = [[0], [1], [2], [0]]
    trace = RoutingTrace(2, 4, 1, selected=[selected, selected], guess=[[[]] * 4, rankings])
    result = simulate(trace, "lru", cache_size=2, prefetch=1)
    assert result.hits == [0, 2]
    assert result.misses == [4, 2]
    assert result.prefetch_loads == [0, 3]
    assert result.prefetch_used == [0, 2]
    assert result.wasted_prefetch == 1
    assert result.prefetch_recall == pytest.approx(0.5)
    assert result.loads == [4, 5]
    no_prefetch = simulate(trace, "lru", cache_size=2)
    assert no_prefetch.hits == [0, 0] and no_prefetch.prefetch_recall is None


@pytest.mark.parametrize("policy", SIM_POLICIES)
@pytest.mark.parametrize("cache_size", [2, 3, 5])
def test_perfect_guess_turns_every_miss_into_a_prefetch_hit(policy, cache_size):
    trace = random_trace(seed=cache_size, num_layers=3)
    for layer in range(1, 3):  # the guess ranks the experts the token will select first
        for t, experts in enumerate(trace.selected[layer]):
            trace.guess[layer][t] = experts + [e for e in range(6) if e not in experts]
    result = simulate(trace, policy, cache_size, prefetch=2)
    base = simulate(trace, policy, cache_size)
    assert result.prefetch_recall == 1.0
    assert result.misses[1:] == [0, 0]
    assert result.hits[1:] == result.selections[1:]
    assert result.prefetch_used == result.prefetch_loads and result.wasted_prefetch == 0
    assert (result.hits[0], result.misses[0]) == (base.hits[0], base.misses[0])  # layer 0 has no guess


# --- invariants and Belady's optimality -----------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_counts_add_up(seed):
    trace = random_trace(seed)
    for r in sweep(trace, SIM_POLICIES, [1, 2, 3, 5], [0, 1, 3]):
        assert r.selections == [trace.num_tokens * trace.top_k] * trace.num_layers
        assert r.loads == [m + p for m, p in zip(r.misses, r.prefetch_loads)]
        assert 0 <= r.prefetch_used[1] <= r.prefetch_loads[1]


@pytest.mark.parametrize("policy", SIM_POLICIES)
def test_cache_holding_every_expert_only_misses_first_uses(policy):
    trace = random_trace(seed=7)
    result = simulate(trace, policy, cache_size=trace.num_experts)
    assert result.misses == [len({e for x in layer for e in x}) for layer in trace.selected]


@pytest.mark.parametrize("seed", range(8))
def test_belady_beats_every_policy_without_prefetch(seed):
    # MIN is optimal for C >= K without prefetch; prefetch forces loads and C < K forces the load
    # order, and there another policy can beat it (documented in sim/replay.py).
    trace = random_trace(seed, num_layers=3, num_experts=8, top_k=1 + seed % 3, num_tokens=60)
    for cache_size in range(trace.top_k, trace.num_experts):
        best = simulate(trace, "belady", cache_size)
        for policy in POLICIES:
            other = simulate(trace, policy, cache_size)
            assert all(b >= o for b, o in zip(best.hits, other.hits)), (policy, cache_size)


def brute_force_min_misses(selected, cache_size):
    """Fewest misses over every choice of victims (never the current token's experts)."""
    states = {frozenset(): 0}
    for needed in selected:
        after = {}
        for resident, cost in states.items():
            missing = set(needed) - resident
            excess = len(resident) + len(missing) - cache_size
            for victims in itertools.combinations(sorted(resident - set(needed)), max(0, excess)):
                state = (resident - set(victims)) | missing
                after[state] = min(after.get(state, cost + len(missing)), cost + len(missing))
        states = after
    return min(states.values())


@pytest.mark.parametrize("seed", range(20))
def test_belady_matches_exhaustive_search(seed):
    rng = random.Random(seed)
    num_experts = rng.randint(3, 5)
    top_k = rng.randint(1, 2)
    selected = [rng.sample(range(num_experts), top_k) for _ in range(rng.randint(4, 10))]
    for cache_size in range(top_k, num_experts):
        result = simulate(one_layer(selected, num_experts), "belady", cache_size)
        assert result.misses[0] == brute_force_min_misses(selected, cache_size)


def test_policies_come_from_policies_py():
    assert SIM_POLICIES == (*POLICIES, "belady")


# --- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (lambda t: t.selected[1].pop(), "tokens"),
    (lambda t: t.selected[0].__setitem__(0, [0, 9]), "expert ids"),
    (lambda t: t.selected[0].__setitem__(0, [1, 1]), "distinct"),
    (lambda t: t.guess[1].__setitem__(0, ["x"]), "guess"),
    (lambda t: setattr(t, "phase", ["decode"]), "phase"),
    (lambda t: setattr(t, "top_k", 0), "top_k"),
])
def test_check_trace_names_the_problem(change, message):
    trace = random_trace(seed=0)
    check_trace(trace)
    change(trace)
    with pytest.raises(ValueError, match=message):
        check_trace(trace)


@pytest.mark.parametrize("kwargs, message", [
    ({"policy": "fifo", "cache_size": 2}, "use one of lru, lfu, lfru, belady"),
    ({"policy": "lru", "cache_size": 0}, r"use 1\.\.6"),
    ({"policy": "lru", "cache_size": 2, "prefetch": 7}, r"use 0\.\.6"),
])
def test_simulate_rejects_bad_knobs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        simulate(random_trace(seed=0), **kwargs)


# --- throughput model ------------------------------------------------------------------------
MIXTRAL = MODELS["mixtral-8x7b"]


def test_mixtral_sizes():
    # An expert is 3 x 4096 x 14336 weights at 2 bits + 2 x 8-bit meta per group of 16 = 3 bits.
    assert MIXTRAL.expert_bytes == 3 * 4096 * 14336 * 3 // 8 == 66_060_288
    # Attention 4096 x (4096 + 1024) x 2 at 4 + 16/64 bits, plus router and norms in fp16.
    assert MIXTRAL.layer_dense_bytes == 41_943_040 * 17 // 32 + 2 * 4096 * 10
    assert fitting_cache_size(MIXTRAL, HARDWARE["t4-pcie3"]) == 5  # (15 - 2) GB - 1.24 GB = 5.6 x 2.11 GB
    assert fitting_cache_size(MIXTRAL, HARDWARE["a100"]) == 8


def test_throughput_model_by_hand():
    t4 = HARDWARE["t4-pcie3"]
    # Compute of one layer on the engine's path: the fused kernel reads attention's 22.36 MB (with
    # router and norms) and 2 active experts' 66.06 MB records at 320 GB/s, nothing else; plus the
    # fitted per-layer overhead.
    layer = (22_364_160 + 2 * 66_060_288) / 320e9 + LAYER_OVERHEAD_S
    # Loading all 8 experts of every layer (accelerate-like): 32 x 8 x 66.06 MB / 12 GB/s = 1.409 s.
    naive = predict_from_loads(MIXTRAL, t4, misses_per_layer=8)
    assert naive.demand_stall_s == pytest.approx(32 * 8 * 66_060_288 / 12e9)
    assert naive.compute_s == pytest.approx(32 * layer + 262_144_000 / 320e9)
    assert naive.write_back_s == 0
    # Prefetch loads hide behind one layer's compute: 0.05 loads fully, 4 loads (22 ms) not.
    assert predict_from_loads(MIXTRAL, t4, 0, prefetch_loads_per_layer=0.05).prefetch_stall_s == 0
    four = predict_from_loads(MIXTRAL, t4, 0, prefetch_loads_per_layer=4)
    assert four.prefetch_stall_s == pytest.approx(32 * (4 * 66_060_288 / 12e9 - layer))


def test_paper_path_dequantizes_scales_and_zeros_per_call():
    # 8-bit scales and zeros become fp16 (written, then read) before the kernel: 2 x 2 x 2 bytes per
    # group, i.e. 0.5 byte per weight at group 16 and 0.125 at attention's group 64.
    t4 = HARDWARE["t4-pcie3"]
    paper = predict_from_loads(MIXTRAL, t4, 0, path=PAPER_PATH, overhead_s=0.0)
    layer = (22_364_160 + 41_943_040 // 8 + 2 * (66_060_288 + 176_160_768 // 2)) / 320e9
    assert paper.compute_s == pytest.approx(32 * layer + 262_144_000 / 320e9)
    main_path = predict_from_loads(MIXTRAL, t4, 0, path=PATHS["main"], overhead_s=0.0)  # + 5.6 GB per expert use
    engine = predict_from_loads(MIXTRAL, t4, 0, overhead_s=0.0)
    assert main_path.compute_s - engine.compute_s == pytest.approx(32 * 2 * 5.6e9 / 320e9)


def test_write_back_serial_or_overlapped():
    t4, load = HARDWARE["t4-pcie3"], 66_060_288 / 12e9
    serial = predict_from_loads(MIXTRAL, t4, 0.8, path=PATHS["engine-serial"], write_backs_per_layer=0.8)
    assert serial.write_back_s == pytest.approx(32 * 0.8 * load)
    overlapped = predict_from_loads(MIXTRAL, t4, 0.8, write_backs_per_layer=0.8)
    assert overlapped.write_back_s == 0  # each write-back runs while its miss's load comes the other way
    assert serial.token_s - overlapped.token_s == pytest.approx(32 * 0.8 * load)
    more = predict_from_loads(MIXTRAL, t4, 0.5, prefetch_loads_per_layer=0.1, write_backs_per_layer=0.8)
    assert more.write_back_s == pytest.approx(32 * (0.8 - 0.6) * load)  # only what the loads cannot hide


def test_calibration_reproduces_its_row_and_reports_the_others():
    # The overhead is fitted to the T4 full-method row on the paper's path (cache 4: 2 x (1 - 0.612)
    # misses per layer, each evicted expert written back in series).
    misses = 2 * (1 - 0.612)
    fitted = predict_from_loads(MIXTRAL, HARDWARE["t4-pcie3"], misses, path=PAPER_PATH, write_backs_per_layer=misses)
    assert fitted.tokens_per_second == pytest.approx(2.09)
    assert fitted.write_back_s == pytest.approx(32 * misses * 66_060_288 / 12e9)
    assert 0 < LAYER_OVERHEAD_S < 0.05
    rows = paper_errors(MIXTRAL, MIXTRAL_LRU_HIT_RATES)
    assert [(r["hardware"], r["paper"]) for r in rows] == [
        ("t4-pcie3", 2.09), ("t4-pcie3", 0.66), ("rtx3060", 2.28), ("rtx3060", 0.92), ("a100", 3.06),
        ("a100", 1.39)]
    assert [r["cache_size"] for r in rows] == [4, 0, 3, 0, 4, 0]  # the paper's cache per card
    assert [r["fitted"] for r in rows] == [True] + [False] * 5
    for r in rows:
        assert r["error"] == pytest.approx(r["predicted"] / r["paper"] - 1)
        assert abs(r["error"]) < 0.25  # what docs/results.md states for the model


def test_fewer_misses_predict_more_tokens_per_second():
    trace = random_trace(seed=3)
    lru, belady = (simulate(trace, p, 3) for p in ("lru", "belady"))
    for hw in HARDWARE.values():
        assert predict_throughput(belady, MIXTRAL, hw).tokens_per_second >= \
            predict_throughput(lru, MIXTRAL, hw).tokens_per_second


# --- command line ------------------------------------------------------------------------------
def test_cli_writes_json_markdown_html(tmp_path, capsys):
    trace_path = random_trace(seed=1, num_experts=4).save(tmp_path / "trace.json")
    out = {k: tmp_path / f"out.{k}" for k in ("json", "md", "html")}
    code = main([str(trace_path), "--prefetch", "0,2", "--json", str(out["json"]),
                 "--markdown", str(out["md"]), "--html", str(out["html"])])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| policy | prefetch | C=1 | C=2 | C=3 |" in printed
    assert "paper, Table 2" in printed and "0.66" in printed
    assert out["md"].read_text() == printed
    report = json.loads(out["json"].read_text())
    assert report["trace"]["num_tokens"] == 37  # decode tokens only
    assert len(report["results"]) == len(SIM_POLICIES) * 3 * 2
    assert {"hit_rate", "ratio_to_belady", "bytes_loaded", "throughput"} <= set(report["results"][0])
    assert "plotly" in out["html"].read_text()[:5000].lower()


def test_cli_include_prefill(tmp_path, capsys):
    trace_path = random_trace(seed=1).save(tmp_path / "trace.json")
    out = tmp_path / "out.json"
    assert main([str(trace_path), "--include-prefill", "--policies", "lru", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["trace"]["num_tokens"] == 40


@pytest.mark.parametrize("content, args, message", [
    (None, [], "cannot read routing trace"),
    ("{not json", [], "cannot read routing trace"),
    ('{"format": "moe-routing-trace"}', [], "not a valid routing trace"),
    ("trace", ["--policies", "lru,fifo"], "use one of lru, lfu, lfru, belady"),
    ("trace", ["--hardware", "tpu"], "use one of t4-pcie3"),
    ("trace", ["--cache-sizes", "0,2"], "use 1..6"),
    ("prefill-only", [], "--include-prefill"),
])
def test_cli_bad_input_exits_2_with_a_message(tmp_path, capsys, content, args, message):
    path = tmp_path / "trace.json"
    if content == "trace":
        random_trace(seed=0).save(path)
    elif content == "prefill-only":
        trace = random_trace(seed=0)
        trace.phase = ["prefill"] * trace.num_tokens
        trace.save(path)
    elif content is not None:
        path.write_text(content)
    assert main([str(path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err


def test_module_entry_point_reports_errors_without_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "moe_runtime.sim", str(tmp_path / "missing.json")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "error: cannot read routing trace" in done.stderr and "Traceback" not in done.stderr


def test_cli_fits_table(capsys):
    assert main(["fits", "--hardware", "t4-pcie3", "--bits", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and " GB |" in line]
    assert len(rows) == len(MODELS)
    mixtral = next(r for r in rows if r.startswith("| mixtral-8x7b "))
    assert "(2/4, g32)" in mixtral and "| 14.1 GB |" in mixtral  # 256 x 55.05 MB at the engine's group 32
    assert mixtral.endswith("| 6/8 / offloaded |")  # 11.76 GB free on a T4 / (32 x 55.05 MB) = 6.7
    olmoe = next(r for r in rows if r.startswith("| olmoe-1b-7b "))
    assert "64/64 / " in olmoe and "offloaded" not in olmoe
    assert main(["fits", "--hardware", "t5"]) == 2
    assert "hardware='t5' is not allowed" in capsys.readouterr().err
