"""The host level (moe_runtime/host_cache.py): device slots <- host-RAM cache <- disk store.

Parity with transformers across host budgets; the counters add up and agree with the simulator's
three-level replay (sim/hierarchy.py) on the same routing; exclusivity (forced on CPU, where device
slots of unquantized experts are plain records); disk -> host prefetch several layers ahead on a
slow fake disk; injected disk faults poison nothing at this level either; budgets refused with numbers.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from test_faults import FaultyTier, calls_through_a_fault
from transformers import AutoModelForCausalLM

from moe_runtime import OffloadConfig, load
from moe_runtime.host_cache import plan_host_memory
from moe_runtime.sim.hierarchy import simulate_hierarchy
from moe_runtime.stats import RoutingTrace
from moe_runtime.store import SlowTier
from tiny_models import save_tiny_mixtral

LAYERS, EXPERTS = 5, 6


@pytest.fixture(scope="module")
def baby(tmp_path_factory):
    path = save_tiny_mixtral(tmp_path_factory.mktemp("host") / "model", layers=LAYERS, experts=EXPERTS, shards=1)
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _stride(path, store) -> int:
    engine = load(path, OffloadConfig(device="cpu", offload="disk", host_cache_gb=0, store_dir=str(store)))
    engine.close()
    return engine.host_cache.stride


def _engine(path, store, slots: int | None, stride: int, levels: str | None = None, **kw):
    """slots: host slots the budget holds (None: "auto"); levels: the device's own (shared on CPU) or
    "exclusive" (the GPU's path on CPU tensors)."""
    gb = "auto" if slots is None else slots * stride / 1e9
    return load(path, OffloadConfig(device="cpu", offload="disk", host_cache_gb=gb, store_dir=str(store), **kw),
                levels=levels)


@pytest.mark.parametrize("budget", ["none", "some", "all"])
@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("levels", ["shared", "exclusive"])
def test_logits_and_greedy_tokens_match_transformers_at_every_budget(baby, tmp_path, budget, prefetch, levels):
    path, reference = baby
    stride = _stride(path, tmp_path)
    slots = {"none": 0, "some": LAYERS + 2, "all": LAYERS * EXPERTS}[budget]
    engine = _engine(path, tmp_path, slots, stride, levels, cache_size=2, prefetch=prefetch)
    try:
        # exclusive: the arena needs at most the records not on the device, plus one passing through
        expected = min(slots, LAYERS * (EXPERTS - 2) + 1) if levels == "exclusive" else slots
        assert engine.host_cache.slots == expected and engine.describe()["offload"] == "disk"
        assert engine.host_cache.shares_memory == (levels == "shared")
        ids = torch.randint(0, engine.model.config.vocab_size, (2, 9))
        for _ in range(2):  # the second pass reads through a warm host cache
            with torch.no_grad():
                torch.testing.assert_close(engine.model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
        prompt = ids[:1]
        assert torch.equal(engine.model.generate(prompt, max_new_tokens=8, do_sample=False),
                           reference.generate(prompt, max_new_tokens=8, do_sample=False))
    finally:
        engine.close()


def _one_token_at_a_time(engine, tokens: int, check=None) -> RoutingTrace:
    """Single-token forwards (the simulator's unit), then the engine's routing trace of them."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(tokens):
        with torch.no_grad():
            engine.model(torch.randint(0, engine.model.config.vocab_size, (1, 1), generator=gen))
        if check is not None:
            check()
    return engine.stats().trace


@pytest.mark.parametrize("exclusive", [False, True])
@pytest.mark.parametrize("slots", [0, LAYERS + 3, LAYERS * EXPERTS])
@pytest.mark.parametrize("cache_size", [1, 2])
def test_level_counters_add_up_and_match_the_simulator(baby, tmp_path, exclusive, slots, cache_size):
    path, _ = baby
    stride = _stride(path, tmp_path)
    engine = _engine(path, tmp_path, slots, stride, "exclusive" if exclusive else None, cache_size=cache_size,
                     prefetch=0, disk_prefetch_layers=0)
    host = engine.host_cache
    # CPU: shared, replayed as inclusive; exclusive with separate slots (a 0-slot arena is neither)
    assert host.exclusive == (exclusive and slots > 0) and host.shares_memory == (not exclusive)

    def never_in_both():
        if exclusive:
            on_device = {(m.layer, e) for m in engine.experts for e in m.cache.resident()}
            assert not on_device & host.held()

    try:
        trace = _one_token_at_a_time(engine, 24, never_in_both)
        c = engine.counters()
        sim = simulate_hierarchy(trace, cache_size, slots, stride, exclusive=exclusive,
                                 host_policy=engine.config.host_policy)
        assert c.hits == sim.hits and c.misses == sim.misses
        assert c.host_hits == sim.host_hits and c.disk_reads == sim.disk_reads
        assert c.write_back_bytes == [w * stride for w in sim.write_backs]
        assert [h + d for h, d in zip(c.host_hits, c.disk_reads)] == c.misses  # every miss from one level
        assert c.disk_bytes == [d * engine.tier.nbytes for d in c.disk_reads]
        if slots == 0:
            assert c.disk_reads == c.misses
        if slots == LAYERS * EXPERTS:  # the budget holds them all: each expert is read from disk once
            assert sum(c.disk_reads) == sim.distinct_experts
        if exclusive and slots:
            assert sum(c.write_back_bytes) > 0
        assert sum(c.converted_bytes) == 0  # records are in the compute form: nothing converts, on any path
        # a load copies the record into a device slot on the exclusive path; on the shared one nothing is copied
        loads = sum(c.misses)
        assert sum(c.level_copy_bytes) == (loads * engine.tier.nbytes if exclusive else 0)
        levels = engine.describe()["levels"]
        assert levels["host"]["held_bytes"] == len(host.held()) * stride <= levels["host"]["budget_bytes"]
    finally:
        engine.close()


class SlowDisk(SlowTier):
    """The disk tier, 40 ms per read, remembering which layer was computing when each read began."""

    def __init__(self, inner, now_computing) -> None:
        self.inner, self.nbytes, self.now_computing = inner, inner.nbytes, now_computing
        self.reads: list[tuple[str, int, int]] = []  # (thread, layer read, layer computing)

    def copy_to(self, layer, expert, dst):
        self.reads.append((threading.current_thread().name, layer, self.now_computing[0]))
        time.sleep(0.04)
        self.inner.copy_to(layer, expert, dst)

    def close(self):
        self.inner.close()


def test_disk_prefetch_reads_several_layers_ahead(baby, tmp_path):
    path, reference = baby
    stride = _stride(path, tmp_path)
    engine = _engine(path, tmp_path, LAYERS * EXPERTS, stride, cache_size=2, prefetch=0, disk_prefetch_layers=3)
    computing = [-1]
    for module in engine.experts:
        module.register_forward_pre_hook(lambda m, args: computing.__setitem__(0, m.layer))
    disk = SlowDisk(engine.host_cache.inner, computing)
    engine.host_cache.inner = disk
    try:
        ids = torch.randint(0, engine.model.config.vocab_size, (1, 6))
        with torch.no_grad():
            torch.testing.assert_close(engine.model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
        engine.host_cache.drain()
        ahead = [read - now for thread, read, now in disk.reads if thread == "host-cache-io"]
        assert ahead and max(ahead) >= 2, disk.reads  # guesses for layers beyond the next one
        c = engine.counters()
        assert sum(c.disk_prefetch_reads) == len(ahead)
        assert sum(c.host_hits) > 0  # some of them served demand loads from the host
    finally:
        engine.close()


@pytest.mark.parametrize("mode", ["once", "always", "demand"])
@pytest.mark.parametrize("slots", [0, LAYERS + 3, LAYERS * EXPERTS])
def test_disk_faults_under_the_host_cache_poison_nothing(baby, tmp_path, mode, slots):
    path, reference = baby
    stride = _stride(path, tmp_path)
    engine = _engine(path, tmp_path, slots, stride, cache_size=2, prefetch=2)
    disk = FaultyTier(engine.host_cache.inner, mode)
    engine.host_cache.inner = disk
    try:
        calls_through_a_fault(engine, reference, disk, recover_first=True, tokens=7)
    finally:
        engine.host_cache.inner = disk.inner
        engine.close()


GB = 1e9


def test_budgets_are_refused_with_the_numbers():
    shape = dict(num_layers=32, num_experts=8, cache_size=4, stride=66_060_288, exclusive=True)
    with pytest.raises(ValueError, match=r"host_cache_gb=40 is more than this machine has: 12\.70 GB"):
        plan_host_memory("disk", 40, available=int(12.7 * GB), **shape)
    with pytest.raises(ValueError, match=r"too small for one expert per layer: 32 x 66\.1 MB = 2\.114 GB"):
        plan_host_memory("disk", 1.0, available=int(12.7 * GB), **shape)
    with pytest.raises(ValueError, match=r'offload="ram" needs 16\.91 GB .* 12\.70 GB available: use offload="disk" '
                                         r'with host_cache_gb=10\.7'):
        plan_host_memory("ram", "auto", available=int(12.7 * GB), **shape)
    plan = plan_host_memory("auto", "auto", available=int(12.7 * GB), **shape)
    # Colab: exclusive levels need the 4 experts per layer not on the GPU, plus one staging record
    assert plan.offload == "disk" and plan.host_slots == 32 * 4 + 1 and plan.exclusive
    assert plan_host_memory("disk", 0, available=int(12.7 * GB), **shape).host_slots == 0
    assert plan_host_memory("auto", "auto", available=int(40 * GB), **shape).offload == "ram"


def test_a_bad_budget_is_refused_before_any_work(baby, tmp_path):
    path, _ = baby
    with pytest.raises(ValueError, match="more than this machine has"):
        load(path, OffloadConfig(device="cpu", offload="disk", host_cache_gb=1e6, store_dir=str(tmp_path / "s")))
    assert not (tmp_path / "s").exists()  # no store was built
    for bad in (-1, "lots", True, float("nan")):
        with pytest.raises(ValueError, match="host_cache_gb"):
            OffloadConfig(host_cache_gb=bad)
