"""The per-layer expert cache: LRU order, no double loads, bounded residency, consistent counters."""

import random
import threading
import time

import pytest
import torch

from moe_runtime.cache import ExpertCache, Transfer
from moe_runtime.policies import LFRU, LFU, LRU
from moe_runtime.stats import StatsCollector
from moe_runtime.store import RamTier, SlowTier

NUM_EXPERTS, STRIDE = 6, 64


class CountingTier(SlowTier):
    """A RAM tier that counts copies per expert (optionally slow, to test overlap)."""

    kind = "ram"

    def __init__(self, delay: float = 0.0) -> None:
        records = [torch.arange(NUM_EXPERTS * STRIDE, dtype=torch.int32).to(torch.uint8).view(NUM_EXPERTS, STRIDE)]
        self.inner = RamTier(records, STRIDE)
        self.delay = delay
        self.copies: list[tuple[int, int, str, float]] = []
        self.lock = threading.Lock()

    def copy_to(self, layer, expert, dst):
        with self.lock:
            self.copies.append((layer, expert, threading.current_thread().name, time.perf_counter()))
        if self.delay:
            time.sleep(self.delay)
        self.inner.copy_to(layer, expert, dst)


def make_cache(size, policy=None, delay=0.0):
    tier = CountingTier(delay)
    stats = StatsCollector(1, NUM_EXPERTS, 2, size, 0)
    transfer = Transfer(tier, torch.device("cpu"))
    slots = torch.zeros(size, STRIDE, dtype=torch.uint8)
    return ExpertCache(0, slots, STRIDE, policy or LRU(), transfer, stats), tier, stats


def use(cache, expert):
    data = cache.acquire(expert)
    assert torch.equal(data, cache.transfer.tier.inner.records[0][expert])  # the slot holds that expert
    cache.release(expert)


def test_lru_evicts_least_recently_used():
    cache, tier, stats = make_cache(2)
    for expert in (0, 1, 0, 2):  # 1 is least recent when 2 arrives
        use(cache, expert)
    assert cache.resident() == {0, 2}
    use(cache, 1)  # now 0 is least recent
    assert cache.resident() == {2, 1}
    s = stats.snapshot()
    assert (s.hits[0], s.misses[0]) == (1, 4)


def test_no_double_loads_and_bounded_residency():
    rng = random.Random(0)
    for size in (1, 2, 3, 5):
        cache, tier, stats = make_cache(size)
        sequence = [rng.randrange(NUM_EXPERTS) for _ in range(300)]
        for expert in sequence:
            use(cache, expert)
            assert len(cache.resident()) <= size
        s = stats.snapshot()
        assert s.hits[0] + s.misses[0] == s.selections[0] == len(sequence)
        assert len(tier.copies) == s.misses[0]  # every load was a miss; no resident expert was reloaded
        assert s.bytes_moved[0] == STRIDE * s.misses[0]


def test_prefetched_expert_is_not_loaded_again_and_counts_as_used():
    cache, tier, stats = make_cache(3)
    assert cache.prefetch([4, 5]) == 2
    use(cache, 4)
    use(cache, 4)
    cache.drain()
    assert [e for _, e, _, _ in tier.copies] == [4, 5]
    s = stats.snapshot()
    assert (s.hits[0], s.misses[0], s.prefetch_issued[0], s.prefetch_used[0]) == (2, 0, 2, 1)


def test_prefetch_never_evicts_a_pinned_expert():
    cache, tier, stats = make_cache(1)
    cache.acquire(0)  # pinned while computing
    assert cache.prefetch([3]) == 0
    assert cache.resident() == {0}
    cache.release(0)
    assert cache.prefetch([3]) == 1
    cache.drain()
    assert cache.resident() == {3}


def test_demand_load_waits_for_an_in_flight_prefetch_instead_of_reloading():
    cache, tier, stats = make_cache(2, delay=0.05)
    cache.prefetch([2])
    use(cache, 2)  # arrives while the prefetch copy is still running
    assert [e for _, e, _, _ in tier.copies] == [2]
    assert stats.snapshot().hits[0] == 1


@pytest.mark.parametrize("policy", [LRU, LFU, LFRU])
def test_policies_pick_an_unpinned_resident_victim(policy):
    p = policy()
    for key in (1, 2, 3, 1, 1, 2):
        p.access(key)
    assert p.victim([1, 2, 3]) in (2, 3)
    assert p.victim([1]) == 1


def test_lfu_keeps_the_frequent_expert_that_lru_would_evict():
    lru, lfu = LRU(), LFU()
    for p in (lru, lfu):
        for key in (0, 0, 0, 1, 2):
            p.access(key)
    assert lru.victim([0, 2]) == 0
    assert lfu.victim([0, 2]) == 2


def test_prefetch_does_not_evict_another_expert_of_the_same_guess():
    cache, tier, stats = make_cache(2)
    use(cache, 0)
    use(cache, 1)
    use(cache, 0)  # 1 is now least recently used
    assert cache.prefetch([1, 3]) == 1  # 1 is resident and guessed: 0 is evicted for 3, not 1
    cache.drain()
    assert cache.resident() == {1, 3}


def test_clear_empties_the_cache_but_keeps_pinned_experts():
    cache, tier, stats = make_cache(3)
    for expert in (0, 1, 2):
        use(cache, expert)
    cache.acquire(1)
    cache.clear()
    assert cache.resident() == {1}
    cache.release(1)
    use(cache, 0)
    assert stats.snapshot().misses[0] == 4


def test_drain_returns_with_prefetched_slots_unpinned():
    cache, tier, stats = make_cache(2, delay=0.02)
    cache.prefetch([3, 4])
    cache.drain()
    assert cache.pins == [0, 0]  # evictable as soon as drain returns: replays stay deterministic
    cache.prefetch([1])
    cache.clear()  # waits for the prefetch of 1 before evicting
    assert cache.resident() == set() and cache.pins == [0, 0]


def test_capabilities_are_declared_and_checked_where_the_plan_needs_them():
    """A tier's capabilities are declared on it (SlowTier) and checked when the levels are put together:
    a layer cache without slots needs a tier sharing its memory, and one sharing it takes no slots."""
    records = [torch.zeros(NUM_EXPERTS, STRIDE, dtype=torch.uint8)]
    copying, sharing = RamTier(records, STRIDE), RamTier(records, STRIDE, shares_memory=True)
    assert not copying.exchanges and not copying.shares_memory and sharing.shares_memory
    stats = StatsCollector(1, NUM_EXPERTS, 2, 2, 0)
    with pytest.raises(ValueError, match="a layer cache without device slots needs a slow tier that shares memory"):
        ExpertCache(0, None, STRIDE, LRU(), Transfer(copying, torch.device("cpu")), stats, cache_size=2)
    with pytest.raises(ValueError, match="takes no device slots"):
        ExpertCache(0, torch.zeros(2, STRIDE, dtype=torch.uint8), STRIDE, LRU(), Transfer(sharing, torch.device("cpu")),
                    stats)
    with pytest.raises(ValueError, match=r"cache_size=None is not allowed: a layer cache needs cache_size >= 1"):
        ExpertCache(0, None, STRIDE, LRU(), Transfer(sharing, torch.device("cpu")), stats)
    with pytest.raises(ValueError, match=r"cache_size=3 is not allowed.*equal to the slots given \(2\)"):
        ExpertCache(0, torch.zeros(2, STRIDE, dtype=torch.uint8), STRIDE, LRU(), Transfer(copying, torch.device("cpu")),
                    stats, cache_size=3)
    with pytest.raises(ValueError, match="needs a CPU device"):
        Transfer(sharing, torch.device("cuda"))
    with pytest.raises(NotImplementedError, match="does not take evicted experts back"):
        copying.exchange(0, 1, 2, torch.zeros(STRIDE, dtype=torch.uint8))


def test_a_shared_cache_computes_from_the_records_themselves():
    """Shared memory: acquire hands back the tier's own record (no copy), and eviction lets it go."""
    records = [torch.arange(NUM_EXPERTS * STRIDE, dtype=torch.int32).to(torch.uint8).view(NUM_EXPERTS, STRIDE)]
    tier = RamTier(records, STRIDE, shares_memory=True)
    stats = StatsCollector(1, NUM_EXPERTS, 2, 2, 0)
    cache = ExpertCache(0, None, STRIDE, LRU(), Transfer(tier, torch.device("cpu"), stats), stats, cache_size=2)
    for expert in (0, 1, 2, 0):
        view = cache.acquire(expert)
        assert view.data_ptr() == records[0][expert].data_ptr()
        cache.release(expert)
    assert cache.resident() == {0, 2} and sum(stats.counters().level_copy_bytes) == 0
