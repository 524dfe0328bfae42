"""The benchmark: trace replay, its variants' accounting, and the --quick CLI end to end."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, replace

import pytest
import torch
from references import workload_reference_step

from moe_runtime.bench import accelerate, cli, measure, runners
from moe_runtime.bench import model as bench_model
from moe_runtime.bench import workload as wl
from moe_runtime.paths import SHIPPED_TRACE
from moe_runtime.sim.replay import simulate
from moe_runtime.stats import RoutingTrace
from tiny_models import save_tiny_mixtral

SPEC16 = wl.WorkloadSpec(layers=2, hidden=64, intermediate=128, experts=6, top_k=2, bits=None, dtype="float32")


def local_trace(layers=4, experts=6, top_k=2, tokens=30, seed=0) -> RoutingTrace:
    """Routing with locality: each layer mostly reuses a few favourite experts; guesses rank them."""
    rng = random.Random(seed)
    trace = RoutingTrace(layers, experts, top_k, "synthetic")
    for layer in range(layers):
        favourites = rng.sample(range(experts), 3)
        for _ in range(tokens):
            pool = favourites if rng.random() < 0.8 else list(range(experts))
            chosen = rng.sample(pool, top_k)
            trace.selected[layer].append(chosen)
            rest = [e for e in range(experts) if e not in chosen]
            trace.guess[layer].append((chosen + rest) if layer and rng.random() < 0.7 else rng.sample(range(experts), experts))
    trace.phase = ["prefill"] * 2 + ["decode"] * (tokens - 2)
    return trace


def test_map_trace_takes_consecutive_middle_layers_decode_only():
    trace = local_trace(layers=5)
    replay = wl.map_trace(trace, 2)
    assert replay.trace_layers == [1, 2]
    assert replay.num_tokens == 28  # the two prefill tokens are left out
    assert replay.selected[1] == trace.selected[2][2:]
    assert replay.guess[1] == trace.guess[2][2:]
    assert all(g == [] for g in replay.guess[0])  # workload layer 0 has no layer before it
    assert wl.map_trace(trace, 7, first_layer=3).trace_layers == [3, 4, 0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="first trace layer"):
        wl.map_trace(trace, 2, first_layer=5)


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("cache_size", [2, 4])
def test_replayed_engine_cache_matches_simulator(tmp_path, cache_size, prefetch):
    trace = local_trace()
    replay = wl.map_trace(trace, 3, first_layer=0)
    spec = replace(SPEC16, layers=3)
    stack = wl.OffloadedStack(spec, replay, wl.build_store(spec, tmp_path), cache_size, prefetch, torch.device("cpu"))
    tokens = 20
    for n in range(tokens):
        stack.step(n)
        stack.drain()  # the simulator has no timing: let every prefetch land before the next token
    stats = stack.stats.snapshot()
    stack.close()
    replayed = RoutingTrace(3, spec.experts, 2, selected=[s[:tokens] for s in replay.selected],
                            guess=[g[:tokens] for g in replay.guess], phase=["decode"] * tokens)
    sim = simulate(replayed, "lru", cache_size, prefetch)
    assert sum(stats.selections) == 3 * tokens * 2 == sum(stats.hits) + sum(stats.misses)
    assert stats.hits == sim.hits
    if prefetch:
        assert stats.prefetch_recall == pytest.approx(sim.prefetch_recall)


def test_no_cache_loads_every_selected_expert(tmp_path):
    replay = wl.map_trace(local_trace(), 2)
    stack = wl.OffloadedStack(SPEC16, replay, wl.build_store(SPEC16, tmp_path), 2, 0, torch.device("cpu"))
    for n in range(10):
        stack.drop_resident()
        stack.step(n)
    stats = stack.stats.snapshot()
    stack.close()
    assert sum(stats.hits) == 0
    assert stats.total("bytes_moved") == sum(stats.selections) * SPEC16.codec().nbytes


@pytest.mark.parametrize("granularity", ["fused", "per-expert"])
def test_accelerate_stack_computes_what_the_engine_computes(tmp_path, granularity):
    replay = wl.map_trace(local_trace(), 2)
    ours = wl.OffloadedStack(SPEC16, replay, wl.build_store(SPEC16, tmp_path), SPEC16.experts, 0, torch.device("cpu"))
    theirs = accelerate.AccelerateStack(SPEC16, replay, accelerate.build_offload_folder(SPEC16, tmp_path, granularity),
                                torch.device("cpu"), granularity)
    for n in range(4):
        torch.testing.assert_close(theirs.step(n), ours.step(n))
    ours.close()
    expert_bytes = 3 * SPEC16.hidden * SPEC16.intermediate * 4  # float32 spec
    if granularity == "fused":  # accelerate moves the whole [E, 2I, H] and [E, H, I] parameters
        assert theirs.loader.nbytes == 4 * SPEC16.layers * SPEC16.experts * expert_bytes
    else:
        distinct = sum(len(set(replay.selected[layer][n])) for layer in range(2) for n in range(4))
        assert theirs.loader.nbytes == distinct * expert_bytes


def test_bench_ids_repeat_the_text_without_a_bos_in_the_middle():
    class Tokenizer:  # a BOS (id 1) with special tokens, the text's ids 5 6 7
        def __call__(self, text, return_tensors=None, add_special_tokens=True):
            assert text == bench_model.TEXT
            return {"input_ids": torch.tensor([[1] * add_special_tokens + [5, 6, 7]])}

    assert bench_model.bench_ids(Tokenizer(), 9).tolist() == [[1, 5, 6, 7, 5, 6, 7, 5, 6]]
    assert bench_model.bench_ids(Tokenizer(), 3).tolist() == [[1, 5, 6]]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    model = save_tiny_mixtral(root / "model", layers=3, experts=6, hidden=32, intermediate=64)
    trace_path = bench_model.record_trace(model, root / "trace.json", decode_tokens=16, max_new_tokens=8,
                                             store_dir=str(root / "store"))
    out = root / "out"
    code = cli.main(["--quick", "--model", str(model), "--trace", str(trace_path), "--out", str(out),
                       "--store-dir", str(root / "store"), "--cache-size", "3",
                       "--parts", "model,workload-16bit,workload-2bit,workload-4bit,kernels"])
    return code, json.loads((out / "bench.json").read_text()), out


def test_quick_bench_runs_every_variant(quick_run):
    code, report, out = quick_run
    assert code == 0, [r.get("error") for r in report["results"]]
    got = {(r["part"], r["variant"]) for r in report["results"]}
    engine = set(cli.ENGINE_VARIANTS)
    # the half host budget is a workload variant (its budget is counted in records of the workload's store)
    assert got >= {("model", v) for v in {"accelerate", "transformers", *engine - {"lru+host-half"}}}
    assert got >= {("workload-16bit", v) for v in {"accelerate", "accelerate-per-expert", *engine}}
    assert got >= {("workload-2bit", v) for v in engine} | {("workload-4bit", v) for v in engine}
    assert (out / "bench.md").read_text().count("| lru+prefetch |") == 4
    kernels = json.loads((out / "kernels.json").read_text())["rows"]
    assert {r["bits"] for r in kernels if r["format"] == "fused (int4-cpu)"} == {2, 3, 4, 8}
    assert "| fused (int4-cpu) | 4 | 64 |" in (out / "kernels.md").read_text()
    assert (out / "bench.html").stat().st_size > 1000
    for r in report["results"]:  # a CPU: records are computed where they lie, never converted or copied
        if r["part"].startswith("workload") and r["variant"] in engine:
            assert r["converted_bytes_per_token"] == 0 and r["level_copy_bytes_per_token"] == 0, r["variant"]


def test_quick_bench_numbers_are_consistent(quick_run):
    _, report, _ = quick_run
    for r in report["results"]:
        w = r["window"]
        assert r["tokens"] == r["job"]["tokens"] and r["tokens_per_second"] > 0 and r["peak_rss_bytes"] > 0
        assert r["tokens_per_second"] == pytest.approx(r["tokens"] / r["seconds"])
        assert r["seconds"] <= r["wall_seconds"] and r["warmup_seconds"] <= r["wall_seconds"]
        if r["variant"] in cli.ENGINE_VARIANTS:
            layers = r["workload"]["layers"] if "workload" in r else r["engine"]["layers"]
            assert w["hits"] + w["misses"] == w["selections"] == r["tokens"] * layers * 2
        if r["variant"] in ("accelerate", "accelerate-per-expert", "no-cache", "lru"):
            assert r["bytes_per_token"] > 0 and r["stall_ms_per_token"] > 0
        if r["variant"] == "no-cache":
            assert w["hits"] == 0
        if r["variant"].startswith("resident"):  # everything loaded during warm-up
            assert w["bytes_moved"] == 0 and r["hit_rate"] == 1.0, (r["part"], r["variant"], w)
        if r["variant"] == "accelerate" and "workload" in r:
            spec = r["workload"]
            assert r["bytes_per_token"] == spec["layers"] * spec["experts"] * spec["expert_bytes_16bit"]


def test_simulator_cross_check_agrees_with_the_engine(quick_run):
    _, report, _ = quick_run
    for part in ("workload-16bit", "workload-2bit"):
        check = report["simulator"][part]
        assert check["engine_lru_matches_sim"], check
        assert 0 < check["sim_belady_hit_rate"] <= 1 and check["sim_lru_hit_rate"] <= check["sim_belady_hit_rate"]
    assert {t["target"] for t in report["targets"]} >= {"vs_accelerate", "vs_resident", "prefetch_recall"}


def test_isolated_worker_reports_the_same_fields(tmp_path):
    trace = local_trace()
    trace_path = trace.save(tmp_path / "trace.json")
    job = measure.Job("workload-16bit", "resident", 1, 2, store_dir=str(tmp_path), trace=str(trace_path),
                    spec={"hidden": 64, "intermediate": 128, "layers": 2, "experts": 6, "top_k": 2, "bits": None})
    result = cli.run_isolated(job)
    assert "error" not in result, result.get("error")
    assert result["window"]["bytes_moved"] == 0 and result["tokens"] == 2 and result["peak_rss_bytes"] > 0
    in_process = runners.run_job(job)
    assert result.keys() == in_process.keys()
    assert result["job"] == in_process["job"] and result["window"].keys() == in_process["window"].keys()
    assert {k: result["window"][k] for k in ("hits", "misses", "bytes_moved")} == \
        {k: in_process["window"][k] for k in ("hits", "misses", "bytes_moved")}


def test_isolated_worker_reports_its_error(tmp_path):
    missing = tmp_path / "no-such-trace.json"
    job = measure.Job("workload-16bit", "lru", 1, 2, store_dir=str(tmp_path), trace=str(missing),
                    spec={"hidden": 64, "intermediate": 128, "layers": 2, "experts": 6, "top_k": 2, "bits": None})
    result = cli.run_isolated(job)
    assert (result["part"], result["variant"], result["job"]) == ("workload-16bit", "lru", asdict(job))
    assert "No such file" in result["error"] and str(missing) in result["error"], result["error"]
    assert "Traceback" in result["error"]  # the worker's traceback, not only its exit code


@pytest.mark.skipif(not SHIPPED_TRACE.exists(), reason="no shipped trace yet")
def test_shipped_trace_is_replayable():
    trace = RoutingTrace.load(SHIPPED_TRACE)
    assert (trace.num_experts, trace.top_k) == (8, 2)
    replay = wl.map_trace(trace, 2)
    assert replay.num_tokens >= 100
    assert all(len(g) >= 2 for g in replay.guess[1])  # the prefetcher's guesses were recorded


@pytest.mark.parametrize("group_size", [16, 32])
def test_quantized_workload_computes_the_plain_reference(tmp_path, group_size):
    """2-bit experts: groups of 16 fit no fused kernel (hqq's dequantization per use, fp32), groups of 32
    run the bf16 int4 kernel over the transcoded codes."""
    spec = replace(SPEC16, bits=2, group_size=group_size)
    replay = wl.map_trace(local_trace(), 2)
    stack = wl.OffloadedStack(spec, replay, wl.build_store(spec, tmp_path), 2, 2, torch.device("cpu"))
    try:
        for n in range(6):
            expected = workload_reference_step(spec, replay, n)
            tol = dict(rtol=1e-4, atol=1e-5) if group_size == 16 else \
                dict(rtol=1e-2, atol=1e-2 * expected.abs().max().item())
            torch.testing.assert_close(stack.step(n), expected, **tol)
        stack.drain()
        stats = stack.stats.snapshot()  # what moves is the 2-bit record, whatever the slot holds
        assert stats.total("bytes_moved") == (stats.total("misses") + stats.total("prefetch_issued")) * \
            spec.codec().nbytes
    finally:
        stack.close()
