"""What-if replay: the session's routing trace replayed with other cache settings gives the counters
an engine with those settings measures on the same tokens (greedy, a one-token prompt, so every step
is one token as in the simulator); bad input is refused with a reason."""

import json
from dataclasses import replace

import pytest
import torch

from moe_runtime import OffloadConfig, load
from moe_runtime.sim.throughput import MODELS
from webapp import whatif

RUN = dict(policy="lru", cache_size=2, prefetch=2)


def measured(model_dir, store, policy, cache_size, prefetch):
    """Counters of 24 greedy tokens after a one-token prompt, and the engine's facts."""
    engine = load(model_dir, OffloadConfig(device="cpu", policy=policy, cache_size=cache_size, prefetch=prefetch,
                                           store_dir=str(store)))
    try:
        engine.model.generate(torch.tensor([[1]]), max_new_tokens=24, do_sample=False)
        return engine.stats(), engine.describe(), (engine.shape, engine.model.config)
    finally:
        engine.close()


@pytest.fixture(scope="module")
def session(tiny_dir, tmp_path_factory):
    return measured(tiny_dir, tmp_path_factory.mktemp("store"), **RUN)


@pytest.mark.parametrize("policy, cache_size, prefetch", [("lru", 2, 2), ("lru", 1, 0), ("lfu", 3, 1),
                                                            ("lfru", 2, 4), ("lru", 4, 0)])
def test_a_replay_predicts_what_an_engine_with_those_settings_measures(session, tiny_dir, tmp_path, policy,
                                                                       cache_size, prefetch):
    stats, facts, config = session
    shape = whatif.served_shape(*config, None, None)
    result = whatif.replay(stats.trace, policy, cache_size, prefetch, "cpu-space", shape, stats, facts["expert_bytes"])
    other, _, _ = measured(tiny_dir, tmp_path / "store", policy, cache_size, prefetch)
    assert (result.result.hits, result.result.misses) == (other.hits, other.misses)
    assert result.result.prefetch_loads == other.prefetch_issued
    rows = {row[0]: row[1:] for row in whatif.rows(result)}
    assert rows["cache hit rate"][1] == f"{other.hit_rate:.1%}"
    assert rows["bytes per token"][1] == whatif._bytes(other.total("bytes_moved") / other.trace_tokens)
    if (policy, cache_size, prefetch) == tuple(RUN.values()):  # the session's own settings: both columns agree
        assert rows["cache hit rate"][0] == rows["cache hit rate"][1]
        assert rows["experts loaded per token"][0] == rows["experts loaded per token"][1]
    assert rows["decode speed"][2].endswith("tokens/s") and result.prediction.tokens_per_second > 0


def test_the_models_stated_error_is_shown_where_the_paper_measured(session):
    from moe_runtime.sim.throughput import MIXTRAL_LRU_HIT_RATES, paper_errors

    stats = session[0]
    for hardware in ("t4-pcie3", "rtx3060", "a100"):
        notes = whatif.notes(whatif.replay(stats.trace, "lru", 2, 2, hardware, MODELS["mixtral-8x7b"], stats))
        rows = [r for r in paper_errors(MODELS["mixtral-8x7b"], MIXTRAL_LRU_HIT_RATES) if r["hardware"] == hardware]
        assert "stated error" in notes and all(f"paper {r['paper']:.2f}" in notes for r in rows)
        assert all(f"({r['error']:+.0%}" in notes for r in rows)
    notes = whatif.notes(whatif.replay(stats.trace, "lru", 2, 2, "cpu-space", MODELS["mixtral-8x7b"], stats))
    assert "no stated error" in notes


@pytest.mark.parametrize("knobs, message", [
    (dict(policy="fifo"), "policy='fifo' is not allowed"),
    (dict(cache_size=0), "cache_size=0 is not allowed"),
    (dict(cache_size=9), "use 1..4"),
    (dict(prefetch=-1), "prefetch=-1 is not allowed"),
    (dict(hardware="h100"), "hardware='h100' is not allowed"),
])
def test_bad_knobs_are_refused(session, knobs, message):
    stats = session[0]
    args = {**dict(policy="lru", cache_size=2, prefetch=1, hardware="cpu-space"), **knobs}
    with pytest.raises(ValueError, match=message):
        whatif.replay(stats.trace, shape=MODELS["mixtral-8x7b"], **args)


def test_uploaded_traces_are_size_capped_and_checked(session, tmp_path):
    stats = session[0]
    good = stats.trace.save(tmp_path / "good.json")
    assert whatif.load_trace(good).to_dict() == stats.trace.to_dict()
    big = tmp_path / "big.json"
    big.write_text(" " * (whatif.MAX_TRACE_BYTES + 1))
    with pytest.raises(ValueError, match="at most 1 MiB"):
        whatif.load_trace(big)
    broken = json.loads(good.read_text())
    broken["selected"][0][0] = [99, 100]
    (tmp_path / "bad.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"selected\[0\]\[0\]"):
        whatif.load_trace(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="no tokens of decode"):  # generate() outside a chat marks no decode
        whatif.replay(stats.trace, "lru", 2, 0, "cpu-space", MODELS["mixtral-8x7b"], include_prefill=False)
    n = stats.trace.num_tokens
    chat = replace(stats.trace, phase=["prefill"] + ["decode"] * (n - 1))
    decode_only = whatif.replay(chat, "lru", 2, 0, "cpu-space", MODELS["mixtral-8x7b"], include_prefill=False)
    assert decode_only.result.num_tokens == n - 1  # the one prompt token left out


def _crafted(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_crafted_uploads_are_refused_before_they_cost_memory(tmp_path):
    import tracemalloc

    from moe_runtime.sim.replay import MAX_EXPERTS, MAX_LAYERS, simulate

    head = '{"format": "moe-routing-trace", '
    cases = [
        (head + '"num_layers": 1, "num_experts": 10000000, "top_k": 1, "selected": [[[0]]]}', "num_experts=10000000"),
        (head + '"num_layers": 1000000000, "num_experts": 8, "top_k": 1, "selected": []}', f"1..{MAX_LAYERS}"),
        (head + '"num_layers": 1, "num_experts": ' + "9" * 5000 + ', "top_k": 1}', "not JSON"),
        ("[" * 100_000 + "]" * 100_000, "not JSON"),
        (head + '"num_layers": 1, "num_experts": 8, "top_k": 1, "selected": [[[' + "1," * 1000 + '1]]]}', "..."),
    ]
    for i, (text, message) in enumerate(cases):
        path = _crafted(tmp_path, f"crafted-{i}.json", text)
        with pytest.raises(ValueError) as info:
            whatif.load_trace(path)
        assert message in str(info.value) and str(tmp_path) not in str(info.value), info.value
        assert len(str(info.value)) < 400  # the error never echoes the whole value
    # the largest allowed expert count: Belady's future is sparse, memory follows the trace, not E
    wide = _crafted(tmp_path, "wide.json", json.dumps({
        "format": "moe-routing-trace", "num_layers": 1, "num_experts": MAX_EXPERTS, "top_k": 2,
        "selected": [[[t % 7, MAX_EXPERTS - 1 - t % 5] for t in range(30)]], "guess": [[]]}))
    trace = whatif.load_trace(wide)
    tracemalloc.start()
    try:
        result = simulate(trace, "belady", 3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes for a 30-token trace"  # a dense table: 31 x 65536 floats, ~16 MB
    assert result.hits[0] + result.misses[0] == 60


def test_a_trace_without_its_routing_is_refused_naming_what_is_missing(tmp_path):
    """A trace file that declares its shape but carries no 'selected' experts is refused at upload,
    not accepted as a trace with no tokens."""
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"format": whatif.TRACE_FORMAT, "num_layers": 2, "num_experts": 4, "top_k": 2}))
    with pytest.raises(ValueError, match="missing or malformed 'selected'"):
        whatif.load_trace(str(path))
