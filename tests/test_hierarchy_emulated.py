"""The memory hierarchy on CUDA's semantics, on a CPU: `load(..., device_ops=EmulatedDevice(...))` runs the
GPU's layout (device slots, pinned RAM records / host arena / staging buffers, exclusive levels with
write-back) with every stream, event, copy, pinned buffer and thread's device going through
device.py's emulator, whose side-stream copies run late and in any order unless an event orders them.

Parity with transformers, counters against the simulator, every record where it lies equal to the
store's (the written-back ones included), a removed event wait caught, pinned bytes = the plan and 0
after close, threads on device 1. Every test has "emulated" in its name (`pytest -k emulated`).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from test_faults import FaultyTier, calls_through_a_fault
from test_host_cache import EXPERTS, LAYERS, _one_token_at_a_time, baby  # noqa: F401 - baby is a fixture
from transformers import AutoModelForCausalLM

import moe_runtime.cache
import moe_runtime.engine
from moe_runtime import OffloadConfig, load
from moe_runtime.device import EmulatedDevice, WrongDeviceError, arena_pin_bytes, device_guard, pinned_size
from moe_runtime.engine import GenerationSettings
from moe_runtime.host_cache import HostCache
from moe_runtime.policies import LRU
from moe_runtime.sim.hierarchy import simulate_hierarchy
from moe_runtime.stats import StatsCollector
from moe_runtime.store import STAGING_BUFFERS, DiskTier, checksum


@pytest.fixture(scope="module")
def stride(baby, tmp_path_factory):  # noqa: F811
    path, _ = baby
    engine = load(path, OffloadConfig(device="cpu", offload="disk", host_cache_gb=0,
                                      store_dir=str(tmp_path_factory.mktemp("stride"))))
    engine.close()
    return engine.host_cache.stride


def _emulated(path, store, dev: EmulatedDevice, slots: int | None, stride: int, offload="disk", **kw):
    """An engine whose hierarchy runs on `dev`; `slots`: host records the budget holds beyond the two
    pinned staging buffers (None: "auto"; 0: no host cache)."""
    gb = "auto" if slots is None else ((slots + STAGING_BUFFERS) * stride + 1) / 1e9 if slots else 0  # +1 B: rounding
    return load(path, OffloadConfig(device="cpu", offload=offload, host_cache_gb=gb, store_dir=str(store), **kw),
                device_ops=dev)


def _records_where_they_lie_are_the_stores(engine) -> None:
    """After the device ran everything queued: each device slot holds its expert's record and each
    arena slot the record of its key (written back or read from disk), byte for byte (checksums)."""
    engine.dev.synchronize()
    host = engine.host_cache
    sums = host.inner.sums if host is not None else None
    for module in engine.experts:
        cache = module.cache
        for expert, slot in cache.slot_of.items():
            got = checksum(cache.slots[slot])
            want = sums[module.layer][expert] if sums else checksum(engine.tier.records[module.layer][expert])
            assert got == want, f"device slot of layer {module.layer} expert {expert} is not its record"
    if host is not None:
        for (layer, expert), slot in host.table.slot_of.items():
            assert checksum(host.arena[slot]) == sums[layer][expert], \
                f"arena record of layer {layer} expert {expert} is not the store's"


# --- parity, counters, records: the exclusive hierarchy on the emulator -------------------------------------
@pytest.mark.parametrize("budget", ["none", "some", "all"])
@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("lateness", [0.7, 1.0])
def test_emulated_exclusive_levels_match_transformers(baby, stride, tmp_path, budget, prefetch, lateness):  # noqa: F811
    path, reference = baby
    slots = {"none": 0, "some": LAYERS + 2, "all": LAYERS * EXPERTS}[budget]
    dev = EmulatedDevice(seed=3, lateness=lateness)
    engine = _emulated(path, tmp_path, dev, slots, stride, cache_size=2, prefetch=prefetch)
    try:
        host = engine.host_cache
        assert host.exclusive == host.pinned == (slots > 0) and not host.shares_memory
        ids = torch.randint(0, engine.model.config.vocab_size, (2, 9))
        for _ in range(2):  # the second pass reads through a warm host cache (and its write-backs)
            with torch.no_grad():
                torch.testing.assert_close(engine.model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
        prompt = ids[:1]
        assert torch.equal(engine.model.generate(prompt, max_new_tokens=8, do_sample=False),
                           reference.generate(prompt, max_new_tokens=8, do_sample=False))
        _records_where_they_lie_are_the_stores(engine)
        if slots:
            assert sum(engine.counters().write_back_bytes) > 0
    finally:
        engine.close()


@pytest.mark.parametrize("slots", [LAYERS + 3, LAYERS * EXPERTS])
@pytest.mark.parametrize("cache_size", [1, 2])
def test_emulated_counters_match_the_simulator_and_write_backs_hold_the_evicted_record(baby, stride, tmp_path,  # noqa: F811
                                                                                       slots, cache_size):
    path, _ = baby
    engine = _emulated(path, tmp_path, EmulatedDevice(seed=cache_size), slots, stride, cache_size=cache_size,
                       prefetch=0, disk_prefetch_layers=0)
    host = engine.host_cache

    def exclusive_and_right():
        on_device = {(m.layer, e) for m in engine.experts for e in m.cache.resident()}
        assert not on_device & host.held()
        _records_where_they_lie_are_the_stores(engine)

    try:
        trace = _one_token_at_a_time(engine, 16, exclusive_and_right)
        c = engine.counters()
        sim = simulate_hierarchy(trace, cache_size, slots, stride, exclusive=True, host_policy=engine.config.host_policy)
        assert c.hits == sim.hits and c.misses == sim.misses
        assert c.host_hits == sim.host_hits and c.disk_reads == sim.disk_reads
        assert c.write_back_bytes == [w * stride for w in sim.write_backs] and sum(c.write_back_bytes) > 0
        assert sum(c.level_copy_bytes) == sum(c.misses) * engine.tier.nbytes
    finally:
        engine.close()


@pytest.mark.parametrize("offload", ["ram", "disk"])
def test_emulated_prefetch_and_ram_records_match_transformers(tiny_dir, tmp_path, offload):
    """The RAM tier's pinned records (or the arena) with speculative prefetch on the emulated worker."""
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    dev = EmulatedDevice(seed=5)
    engine = load(tiny_dir, OffloadConfig(device="cpu", offload=offload, cache_size=2, prefetch=2,
                                          store_dir=str(tmp_path)), device_ops=dev)
    try:
        ids = torch.randint(0, engine.model.config.vocab_size, (1, 11))
        out = engine.model.generate(ids, max_new_tokens=8, do_sample=False)
        assert torch.equal(out, reference.generate(ids, max_new_tokens=8, do_sample=False))
        c = engine.counters()
        assert sum(c.prefetch_issued) > 0 and sum(c.prefetch_used) > 0
        _records_where_they_lie_are_the_stores(engine)
    finally:
        engine.close()


@pytest.mark.parametrize("mode", ["once", "always", "demand"])
def test_emulated_disk_faults_poison_nothing(baby, stride, tmp_path, mode):  # noqa: F811
    path, reference = baby
    engine = _emulated(path, tmp_path, EmulatedDevice(seed=1), LAYERS + 3, stride, cache_size=2, prefetch=2)
    disk = FaultyTier(engine.host_cache.inner, mode)
    engine.host_cache.inner = disk
    try:
        calls_through_a_fault(engine, reference, disk, recover_first=True, tokens=7)
        engine.host_cache.inner = disk.inner
        _records_where_they_lie_are_the_stores(engine)
    finally:
        engine.host_cache.inner = disk.inner
        engine.close()


# --- an ordering bug is caught ---------------------------------------------------------------------------
def _drop_waits_of_the_write_back_stream(engine) -> None:
    """The device -> host copy of the write-back no longer waits for the spare to be filled (nor for
    its arena slot's previous copy): it may read the spare before the device -> device copy ran."""
    engine.host_cache.wb_stream.wait_event = lambda event: None


@pytest.mark.parametrize("fault", [None, _drop_waits_of_the_write_back_stream])
def test_emulated_write_back_without_one_event_wait_is_caught(baby, stride, tmp_path, fault):  # noqa: F811
    path, reference = baby
    ids = torch.randint(0, reference.config.vocab_size, (1, 6))
    with torch.no_grad():
        expected = reference(ids).logits
    right = []
    for seed in range(3):
        engine = _emulated(path, tmp_path, EmulatedDevice(seed=seed, lateness=1.0), LAYERS + 3, stride,
                           cache_size=1, prefetch=0, disk_prefetch_layers=0)
        if fault is not None:
            fault(engine)
        try:
            ok = True
            for _ in range(3):
                with torch.no_grad():
                    ok &= torch.allclose(engine.model(ids).logits, expected, atol=1e-4, rtol=1e-4)
            try:
                _records_where_they_lie_are_the_stores(engine)
            except AssertionError:
                ok = False
            right.append(ok)
        finally:
            engine.close()
    assert all(right) == (fault is None), right


@pytest.mark.parametrize("drop_wait", [False, True])
def test_emulated_a_reload_waits_for_its_write_back_to_land(baby, stride, tmp_path, drop_wait):  # noqa: F811
    """Expert 1 is written back to the arena while expert 2 loads into its device slot, then loaded again
    (a host hit) into another slot before anything else ran: the copy out of the arena must wait for
    the write-back into it. (In the engine a load that evicts waits for its spare's previous write-back
    anyway; a load into a free device slot, or on the other thread's spare, does not.) `drop_wait`
    removes that one wait: some order of the queued copies then hands the slot stale bytes."""
    path, _ = baby
    probe = _emulated(path, tmp_path, EmulatedDevice(), 0, stride)
    folder, nbytes = probe.store_path, probe.tier.nbytes
    probe.close()
    right = []
    for seed in range(48):  # one order in 7 or so overtakes the write-back: missed by all 48 with p < 1e-3
        dev = EmulatedDevice(seed=seed, lateness=1.0)
        disk = DiskTier(folder, EXPERTS, stride, nbytes, dev)
        host = HostCache(disk, LAYERS, 4, stride, LRU(), True, StatsCollector(LAYERS, EXPERTS, 2, 1, 0), dev=dev)
        host.arena.zero_()  # fresh pages (memory the last round freed may hold expert 1's record)
        if drop_wait:
            host._wait_device = lambda slot: None
        try:
            with device_guard(dev):
                side, slot, again = dev.new_stream(), dev.empty(stride), dev.empty(stride)
                with dev.stream(side):
                    disk.copy_to(0, 1, slot)  # expert 1 from disk into a device slot (not through the arena)
                    host.exchange(0, 2, 1, slot)  # expert 2 into that slot; 1 written back to the arena
                    host.copy_to(0, 1, again)  # expert 1 again: a host hit
                    loaded = dev.new_event()
                    loaded.record()
                dev.current_stream().wait_event(loaded)
                right.append(checksum(again) == disk.sums[0][1] and checksum(slot) == disk.sums[0][2])
        finally:
            host.close()
        assert dev.pinned_bytes() == 0
    assert all(right) == (not drop_wait), right


# --- pinned memory: exactly the plan, released on close ---------------------------------------------------
@pytest.mark.parametrize("offload", ["ram", "disk"])
def test_emulated_pinned_bytes_equal_the_plan_within_budget_and_close_releases_them(baby, stride, tmp_path,  # noqa: F811
                                                                                    offload):
    path, _ = baby
    dev = EmulatedDevice()
    engine = _emulated(path, tmp_path, dev, LAYERS + 3 if offload == "disk" else None, stride, offload=offload,
                       cache_size=2, prefetch=2)
    plan = engine.host_plan
    try:
        if offload == "disk":  # the arena (exclusive: at most L*(E-C)+1 records) and the staging buffers
            assert plan.host_slots == LAYERS + 3 and engine.host_cache.arena_bytes() == (LAYERS + 3) * stride
            assert plan.pinned_bytes == arena_pin_bytes(LAYERS + 3, stride) + STAGING_BUFFERS * pinned_size(stride)
        else:  # every record, one block of E per layer
            assert plan.pinned_bytes == LAYERS * pinned_size(EXPERTS * stride)
        assert dev.pinned_bytes() == plan.pinned_bytes <= plan.budget_bytes
        with torch.no_grad():
            engine.model(torch.randint(0, engine.model.config.vocab_size, (1, 8)))
        assert dev.pinned_bytes() == plan.pinned_bytes  # nothing pinned per load or per thread
        assert engine.describe()["levels"]["host"].get("pinned", True)
    finally:
        engine.close()
    assert dev.pinned_bytes() == 0 and dev.pinned_total == dev.unpinned_total == plan.pinned_bytes


# --- threads on the right device --------------------------------------------------------------------------
class _PlainExecutor(ThreadPoolExecutor):
    def __init__(self, dev, max_workers, thread_name_prefix):  # device_executor's signature, no binding
        super().__init__(max_workers, thread_name_prefix=thread_name_prefix)


@pytest.mark.parametrize("forget", [None, "prefetch worker", "model forward"])
def test_emulated_engine_on_device_1_binds_every_thread(tiny_dir, tmp_path, monkeypatch, forget):
    """On device 1 every thread that touches it binds itself: the prefetch worker, the host cache's
    I/O thread, the generate thread, and any thread that runs the model (its forward binds it). The
    calling thread stays on device 0. Forgetting one is a WrongDeviceError the test sees."""
    if forget == "prefetch worker":
        monkeypatch.setattr(moe_runtime.cache, "device_executor", _PlainExecutor)
    if forget == "model forward":
        monkeypatch.setattr(moe_runtime.engine, "bind_on_forward", lambda model, dev: None)
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    dev = EmulatedDevice(index=1, seed=2)
    engine = load(tiny_dir, OffloadConfig(device="cpu", offload="disk", cache_size=2, prefetch=2,
                                          store_dir=str(tmp_path)), device_ops=dev)
    failures, threads = [], set()
    real_run = engine.transfer._run

    def run(layer, expert, dst, ticket, *args, **kwargs):  # every load, in the thread that runs it
        threads.add(threading.current_thread().name)
        real_run(layer, expert, dst, ticket, *args, **kwargs)
        if isinstance(ticket.error, WrongDeviceError):
            failures.append(ticket.error)

    engine.transfer._run = run
    try:
        assert dev.current_index() == 0  # load() left the calling thread on its own device
        ids = torch.randint(0, engine.model.config.vocab_size, (1, 7))
        try:
            with torch.no_grad():  # the calling thread (device 0) runs the model
                torch.testing.assert_close(engine.model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
            *_, last = engine.stream(ids, GenerationSettings(max_new_tokens=6, temperature=0))  # the generate thread
            assert last.new_tokens == 6
        except Exception as err:  # noqa: BLE001 - the unbound thread's error, examined below
            failures.append(err)
        assert dev.current_index() == 0
        if not failures:  # loads ran in the calling thread, the generate thread and the prefetch worker
            assert {threading.current_thread().name, "generate"} <= threads
            assert any(t.startswith("expert-prefetch") for t in threads)
    finally:
        engine.close()
    caught = any("current device is 0" in str(err) for err in failures)
    assert caught == (forget is not None), failures
