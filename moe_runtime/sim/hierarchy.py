"""Three-level replay: device slots per layer <- host-RAM expert cache <- disk store.

The device level is replay.py's per-layer cache, unchanged (same hits, misses and prefetch loads as
`simulate`). Every expert it loads comes from the host cache when held there (a host hit), otherwise
from disk (a disk read). The host cache is one pool of `host_slots` records, global across layers,
keyed (layer, expert), with its own eviction policy; it mirrors moe_runtime/host_cache.py:

- exclusive (the engine on CUDA): an expert copied host -> device leaves the host cache (its slot
  is free again); an expert evicted from the device is written back into the host cache (a
  device -> host copy, no disk read when it is needed again); a disk read passes through one
  staging record of the arena on its way to the device and is not kept.
- inclusive (the engine on CPU, where the device level computes from the host arena's records, the
  counts of its "shared" levels): a disk read is kept in the host cache; device evictions write nothing back.

Peak host memory is the most records held at once plus the one staging record, times the record
size (the arena is sized to that at most). Disk -> host prefetch is not modelled here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..policies import make_policy
from ..stats import RoutingTrace
from .replay import _LayerCache, check_trace


class HostCacheSim:
    """The host level: at most `slots` records, keyed (layer, expert), evicted by `policy`."""

    def __init__(self, slots: int, policy: str, num_layers: int, exclusive: bool) -> None:
        self.slots, self.exclusive = slots, exclusive
        self.policy = make_policy(policy)
        self.held: set[tuple[int, int]] = set()
        self.ever_read: set[tuple[int, int]] = set()
        self.host_hits = [0] * num_layers
        self.disk_reads = [0] * num_layers
        self.disk_rereads = [0] * num_layers  # disk reads of a record read from disk before
        self.write_backs = [0] * num_layers
        self.peak_held = 0

    def _insert(self, key: tuple[int, int]) -> None:
        if self.slots == 0:
            return
        if len(self.held) >= self.slots:
            victim = self.policy.victim(sorted(self.held))
            self.policy.evict(victim)
            self.held.discard(victim)
        self.held.add(key)
        self.policy.insert(key)
        self.peak_held = max(self.peak_held, len(self.held))

    def load(self, layer: int, expert: int) -> None:
        """The device level loads (layer, expert)."""
        key = (layer, expert)
        if key in self.held:
            self.host_hits[layer] += 1
            if self.exclusive:
                self.held.discard(key)
                self.policy.evict(key)
            else:
                self.policy.access(key)
            return
        self.disk_reads[layer] += 1
        if key in self.ever_read:
            self.disk_rereads[layer] += 1
        self.ever_read.add(key)
        if not self.exclusive:
            self._insert(key)

    def write_back(self, layer: int, expert: int) -> None:
        """The device level evicted (layer, expert)."""
        if self.exclusive and self.slots:
            self.write_backs[layer] += 1
            self._insert((layer, expert))


class _TieredLayerCache(_LayerCache):
    def __init__(self, policy, size: int, layer: int, host: HostCacheSim) -> None:
        super().__init__(policy, size)
        self.layer, self.host = layer, host

    def _load(self, key: int, candidates: set[int]) -> bool:
        before = set(self.resident)
        if not super()._load(key, candidates):
            return False
        self.host.load(self.layer, key)  # first: an exclusive host hit frees the slot the write-back takes
        for victim in before - self.resident:
            self.host.write_back(self.layer, victim)
        return True


@dataclass
class HierarchyResult:
    """Per-layer counters of a three-level replay (lists indexed by layer), and the sizes behind them."""

    cache_size: int
    host_slots: int
    exclusive: bool
    record_bytes: int
    num_tokens: int
    hits: list[int]
    misses: list[int]
    prefetch_loads: list[int]
    host_hits: list[int]
    disk_reads: list[int]
    disk_rereads: list[int]
    write_backs: list[int]
    peak_host_records: int
    distinct_experts: int
    late_disk_reads: int = 0  # disk reads in the second half of the trace (steady state)
    notes: list[str] = field(default_factory=list)

    def per_token(self, counts: list[int]) -> float:
        return sum(counts) / self.num_tokens if self.num_tokens else 0.0

    @property
    def peak_host_bytes(self) -> int:
        """Records held at peak plus one staging record (a disk read on its way to the device)."""
        return (self.peak_host_records + 1) * self.record_bytes

    @property
    def disk_bytes_per_token(self) -> float:
        return self.per_token(self.disk_reads) * self.record_bytes

    @property
    def write_back_bytes_per_token(self) -> float:
        return self.per_token(self.write_backs) * self.record_bytes


def simulate_hierarchy(trace: RoutingTrace, cache_size: int, host_slots: int, record_bytes: int, *,
                       exclusive: bool, policy: str = "lru", host_policy: str = "lru",
                       prefetch: int = 0) -> HierarchyResult:
    """Replay `trace` token by token, layer by layer (the engine's order) through the three levels."""
    check_trace(trace)
    for name, value, low in (("cache_size", cache_size, 1), ("host_slots", host_slots, 0),
                             ("record_bytes", record_bytes, 1), ("prefetch", prefetch, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} is not allowed: use an integer >= {low}")
    if cache_size > trace.num_experts:
        raise ValueError(f"cache_size={cache_size} is not allowed: use 1..{trace.num_experts}")
    host = HostCacheSim(host_slots, host_policy, trace.num_layers, exclusive)
    layers = [_TieredLayerCache(make_policy(policy), cache_size, layer, host) for layer in range(trace.num_layers)]
    half = trace.num_tokens // 2
    late = 0
    for t in range(trace.num_tokens):
        if t == half:
            late = -sum(host.disk_reads)
        for layer, cache in enumerate(layers):
            guess = trace.guess[layer]
            guessed = list(dict.fromkeys(guess[t]))[:prefetch] if prefetch and guess else []
            if guessed:
                cache.prefetch(guessed)
            cache.run(trace.selected[layer][t])
    late += sum(host.disk_reads)
    distinct = len({(layer, e) for layer, rows in enumerate(trace.selected) for row in rows for e in row})
    return HierarchyResult(
        cache_size, host_slots, exclusive, record_bytes, trace.num_tokens,
        hits=[c.hits for c in layers], misses=[c.misses for c in layers],
        prefetch_loads=[c.prefetch_loads for c in layers], host_hits=host.host_hits,
        disk_reads=host.disk_reads, disk_rereads=host.disk_rereads, write_backs=host.write_backs,
        peak_host_records=host.peak_held, distinct_experts=distinct, late_disk_reads=late)
