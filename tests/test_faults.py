"""Fault injection: a slow tier whose reads fail never poisons the cache, never hangs, and the
next call after the fault is the same model as transformers' own."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_runtime import OffloadConfig, load
from moe_runtime.cache import PREFETCH_THREAD, ExpertCache, ExpertLoadError, Transfer
from moe_runtime.policies import LRU
from moe_runtime.stats import StatsCollector
from moe_runtime.store import RamTier, SlowTier

TIME_LIMIT_S = 60  # a call that has not ended by then hangs


class FaultyTier(SlowTier):
    """Wraps a tier; reads fail as `mode` says while `broken` is set:
    once (the first read only), always, prefetch (reads on the prefetch worker), demand (the others)."""

    def __init__(self, inner, mode: str) -> None:
        self.inner, self.mode = inner, mode
        self.nbytes = inner.nbytes
        self.shares_memory = inner.shares_memory  # a CPU engine's tier: reads are attaches
        self.broken = True
        self.failures = 0

    def _fails(self) -> bool:
        if not self.broken:
            return False
        on_worker = threading.current_thread().name.startswith(PREFETCH_THREAD)
        if self.mode == "once":
            self.broken = False
            return True
        return {"always": True, "prefetch": on_worker, "demand": not on_worker}[self.mode]

    def copy_to(self, layer, expert, dst):
        if self._fails():
            self.failures += 1
            raise OSError(5, "Input/output error (injected)")
        self.inner.copy_to(layer, expert, dst)

    def attach(self, layer, expert):
        if self._fails():
            self.failures += 1
            raise OSError(5, "Input/output error (injected)")
        return self.inner.attach(layer, expert)

    def detach(self, layer, expert):
        self.inner.detach(layer, expert)

    def close(self):
        self.inner.close()


def calls_through_a_fault(engine, reference, tier, recover_first: bool, tokens: int, calls: int = 3) -> list:
    """Run the engine's model `calls` times on the same random tokens, each within the time limit: every call
    ends in the `reference` model's logits or in an ExpertLoadError carrying the injected cause; with
    `recover_first` the tier recovers after the first call; the last call must work. Returns each call's
    error (None: it worked)."""
    ids = torch.randint(0, engine.model.config.vocab_size, (1, tokens))
    with torch.no_grad():
        expected = reference(ids).logits

    def forward():
        with torch.no_grad():
            return engine.model(ids).logits

    errors = []
    for call in range(calls):
        logits, error = within_limit(forward)
        if error is None:
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
        else:
            assert isinstance(error, ExpertLoadError) and "injected" in str(error), repr(error)
        if recover_first and call == 0:
            tier.broken = False
        errors.append(error)
    assert errors[-1] is None, f"the engine stayed broken after the fault: {errors[-1]}"
    assert tier.failures >= 1
    return errors


def within_limit(fn):
    """fn() in a thread: (result, error); fails the test if it has not ended within TIME_LIMIT_S."""
    box = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the test
            box["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(TIME_LIMIT_S)
    assert not thread.is_alive(), f"the call hung (still running after {TIME_LIMIT_S} s)"
    return box.get("result"), box.get("error")


@pytest.fixture(scope="module")
def reference(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("mode", ["once", "always", "prefetch", "demand"])
@pytest.mark.parametrize("cache_size", [1, 2, 3, 4])
@pytest.mark.parametrize("offload", ["ram", "disk"])
def test_failed_reads_end_in_the_right_logits_or_a_clear_error(tiny_dir, reference, mode, cache_size, offload,
                                                               tmp_path):
    engine = load(tiny_dir, OffloadConfig(device="cpu", offload=offload, cache_size=cache_size, prefetch=2,
                                          store_dir=str(tmp_path)))
    tier = FaultyTier(engine.transfer.tier, mode)
    engine.transfer.tier = tier
    try:
        # layer 0's loads are demand loads: with "always" and "demand" the first call fails, then the disk recovers
        errors = calls_through_a_fault(engine, reference, tier, recover_first=mode in ("always", "demand"), tokens=11)
        if mode == "prefetch":
            assert errors == [None] * 3, f"a failed prefetch must not fail the call: {errors}"
        if mode in ("always", "demand"):
            assert errors[0] is not None
        for error in filter(None, errors):
            assert f"layer {error.layer}, expert {error.expert}" in str(error)
            assert "Input/output error (injected)" in str(error)
        stats = engine.stats()
        assert all(h + m == s for h, m, s in zip(stats.hits, stats.misses, stats.selections))
    finally:
        engine.close()


def _ram_cache(size: int, tier=None):
    records = [torch.arange(4 * 64, dtype=torch.int32).to(torch.uint8).view(4, 64)]
    transfer = Transfer(tier or RamTier(records, 64), torch.device("cpu"))
    stats = StatsCollector(1, 4, 1, size, 0)
    return ExpertCache(0, torch.zeros(size, 64, dtype=torch.uint8), 64, LRU(), transfer, stats), records


def test_waiting_for_a_slot_is_bounded_with_a_clear_error():
    cache, _ = _ram_cache(1)
    cache.wait_timeout_s = 0.5
    cache.acquire(0)  # the only slot stays pinned
    _, error = within_limit(lambda: cache.acquire(1))
    assert isinstance(error, ExpertLoadError) and "no slot became free" in str(error), repr(error)
    assert "layer 0, expert 1" in str(error)
    cache.release(0)
    assert torch.equal(cache.acquire(1), cache.transfer.tier.records[0][1])  # free again: it loads


def test_failed_prefetch_wakes_a_waiter_and_leaves_nothing_pinned():
    gate = threading.Event()
    records = [torch.arange(4 * 64, dtype=torch.int32).to(torch.uint8).view(4, 64)]

    class BlockedFailingPrefetch(RamTier):
        def copy_to(self, layer, expert, dst):
            if threading.current_thread().name.startswith(PREFETCH_THREAD):
                gate.wait(10)
                raise OSError("injected")
            super().copy_to(layer, expert, dst)

    cache, _ = _ram_cache(1, BlockedFailingPrefetch(records, 64))
    assert cache.prefetch([2]) == 1  # takes the one slot, then fails
    threading.Timer(0.2, gate.set).start()
    data, error = within_limit(lambda: cache.acquire(2))  # waits on the prefetch, then loads 2 itself
    assert error is None, repr(error)
    assert torch.equal(data, records[0][2])
    cache.release(2)
    data, error = within_limit(lambda: cache.acquire(3))  # the slot is free again
    assert error is None and torch.equal(data, records[0][3])
    cache.release(3)
    cache.transfer.close()
