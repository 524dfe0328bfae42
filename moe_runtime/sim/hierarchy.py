"""Three-level replay: device slots per layer <- host-RAM expert cache <- disk store.

The device level is replay.py's per-layer cache, unchanged (same hits, misses and prefetch loads as
`simulate`). Every expert it loads comes from the host cache when held there (a host hit), otherwise
from disk (a disk read). The host cache is one pool of `host_slots` records, global across layers,
keyed (layer, expert), with its own eviction policy (policies.HOST_POLICIES, or "belady"); it mirrors
moe_runtime/host_cache.py. Three arrangements (`LEVELS`):

- exclusive (the engine on CUDA): an expert copied host -> device leaves the host cache (its slot
  is free again); an expert evicted from the device is written back into the host cache (a
  device -> host copy, no disk read when it is needed again); a disk read passes through one
  staging record of the arena on its way to the device and is not kept.
- inclusive (device slots over a host cache that keeps what it sends): a disk read is kept in the
  host cache; device evictions write nothing back.
- single (the engine on a CPU-only machine): no device slots; the host arena is the one RAM level
  and experts compute in place from it. Every use of an expert is a host access: a hit when held,
  else a disk read into the arena (the token's experts of the layer are pinned while they run).
  Here `hits` = `host_hits` and `misses` = `disk_reads`.

The device level does not depend on the host level, so a replay records the host level's requests
first (`host_requests`), then plays them against the host policy; Belady's MIN for the host level
("belady": evict the held record whose next request is farthest) reads the same request list.

Peak host memory is the most records held at once plus the one staging record, times the record
size (the arena is sized to that at most). Disk -> host prefetch is not modelled here.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from ..policies import HOST_POLICIES, EvictionPolicy, RankedPolicy, make_host_policy, make_policy
from ..stats import RoutingTrace
from .replay import _LayerCache, check_trace

LEVELS = ("exclusive", "inclusive", "single")
HOST_SIM_POLICIES = (*HOST_POLICIES, "belady")
LOAD, WRITE_BACK, USE = "load", "write_back", "use"


@dataclass
class HostRequests:
    """What the host level is asked, in order: (op, layer, expert) with op LOAD (the device loads
    it), WRITE_BACK (the device evicted it; exclusive only) or USE (single level: a token's layer
    computes with it; `pinned[i]` are the keys that may not be evicted for request i)."""

    level: str
    num_layers: int
    num_experts: int
    requests: list[tuple[str, int, int]]
    pinned: list[frozenset] = field(default_factory=list)
    half: int = 0  # index of the first request of the trace's second half (steady state)
    device: tuple | None = None  # (hits, misses, prefetch_loads) per layer of the device level

    def next_request_positions(self) -> dict[tuple[int, int], list[int]]:
        """Per key, the sorted indices of the requests that need it (loads and uses)."""
        positions: dict[tuple[int, int], list[int]] = {}
        for i, (op, layer, expert) in enumerate(self.requests):
            if op != WRITE_BACK:
                positions.setdefault((layer, expert), []).append(i)
        return positions


class HostBelady(RankedPolicy):
    """MIN for the host level: evict the key whose next request is farthest (never again: first).
    `now` is the index of the request being served. With forced insertions (every write-back is
    kept) and pins it is a strong reference, not a proven bound."""

    def __init__(self, positions: dict[tuple[int, int], list[int]]) -> None:
        super().__init__()
        self.positions, self.now = positions, 0

    def _access(self, key) -> None:
        pass

    def _forget(self, key) -> None:
        pass

    def _rank(self, key):
        uses = self.positions.get(key, [])
        i = bisect.bisect_right(uses, self.now)
        return -(uses[i] if i < len(uses) else math.inf)


class HostCacheSim:
    """The host level: at most `slots` records, keyed (layer, expert), evicted by `policy`."""

    def __init__(self, slots: int, policy: EvictionPolicy, num_layers: int, level: str) -> None:
        self.slots, self.level, self.policy = slots, level, policy
        self.held: set[tuple[int, int]] = set()
        self.ever_read: set[tuple[int, int]] = set()
        self.host_hits = [0] * num_layers
        self.disk_reads = [0] * num_layers
        self.disk_rereads = [0] * num_layers  # disk reads of a record read from disk before
        self.write_backs = [0] * num_layers
        self.peak_held = 0

    def _insert(self, key: tuple[int, int], pinned=frozenset()) -> None:
        if self.slots == 0:
            return
        if len(self.held) >= self.slots:
            candidates = sorted(self.held - pinned)
            if not candidates:
                return  # every record is in use: this one is computed from the staging record
            victim = self.policy.victim(candidates)
            self.policy.evict(victim)
            self.held.discard(victim)
        self.held.add(key)
        self.policy.insert(key)
        self.peak_held = max(self.peak_held, len(self.held))

    def _disk_read(self, key: tuple[int, int]) -> None:
        self.disk_reads[key[0]] += 1
        if key in self.ever_read:
            self.disk_rereads[key[0]] += 1
        self.ever_read.add(key)

    def load(self, layer: int, expert: int, pinned=frozenset(), reserved: bool = False) -> None:
        """The device level loads (layer, expert), or (single level) a token's layer uses it. `reserved`:
        the load comes with a write-back, for which HostCache.exchange holds a free slot during the load."""
        key = (layer, expert)
        if key in self.held:
            self.host_hits[layer] += 1
            self.policy.access(key)  # as host_cache.HostCache: the hit is a use, then (exclusive) it leaves
            if self.level == "exclusive":
                self.held.discard(key)
                self.policy.evict(key)
            return
        self._disk_read(key)
        if self.level != "exclusive":
            self._insert(key, pinned)  # as HostCache: the insertion is the record's first use
        elif len(self.held) + reserved < self.slots:  # as HostCache: staged through a free slot, then on the device
            self.policy.insert(key)
            self.policy.evict(key)

    def write_back(self, layer: int, expert: int) -> None:
        """The device level evicted (layer, expert)."""
        if self.level == "exclusive" and self.slots:
            self.write_backs[layer] += 1
            self._insert((layer, expert))


class _RecordingLayerCache(_LayerCache):
    """A device layer that writes its host requests into `requests`."""

    def __init__(self, policy, size: int, layer: int, requests: list, exclusive: bool) -> None:
        super().__init__(policy, size)
        self.layer, self.requests, self.exclusive = layer, requests, exclusive

    def _load(self, key: int, candidates: set[int]) -> bool:
        before = set(self.resident)
        if not super()._load(key, candidates):
            return False
        self.requests.append((LOAD, self.layer, key))  # first: an exclusive host hit frees the slot the write-back takes
        if self.exclusive:
            self.requests.extend((WRITE_BACK, self.layer, victim) for victim in sorted(before - self.resident))
        return True


def host_requests(trace: RoutingTrace, level: str, cache_size: int = 0, *, policy: str = "lru",
                  prefetch: int = 0) -> HostRequests:
    """Replay the device level (none for `level="single"`) token by token, layer by layer (the
    engine's order) and list what it asks of the host level."""
    check_trace(trace)
    if level not in LEVELS:
        raise ValueError(f"level={level!r} is not allowed: use one of {', '.join(LEVELS)}")
    requests: list[tuple[str, int, int]] = []
    half = trace.num_tokens // 2
    if level == "single":
        pinned, first_of_half = [], 0
        for t in range(trace.num_tokens):
            if t == half:
                first_of_half = len(requests)
            for layer in range(trace.num_layers):
                needed = sorted(trace.selected[layer][t])
                requests.extend((USE, layer, e) for e in needed)
                pinned.extend([frozenset((layer, e) for e in needed)] * len(needed))
        return HostRequests(level, trace.num_layers, trace.num_experts, requests, pinned, first_of_half)
    layers = [_RecordingLayerCache(make_policy(policy), cache_size, layer, requests, level == "exclusive")
              for layer in range(trace.num_layers)]
    first_of_half = 0
    for t in range(trace.num_tokens):
        if t == half:
            first_of_half = len(requests)
        for layer, cache in enumerate(layers):
            guess = trace.guess[layer]
            guessed = list(dict.fromkeys(guess[t]))[:prefetch] if prefetch and guess else []
            if guessed:
                cache.prefetch(guessed)
            cache.run(trace.selected[layer][t])
    device = ([c.hits for c in layers], [c.misses for c in layers], [c.prefetch_loads for c in layers])
    return HostRequests(level, trace.num_layers, trace.num_experts, requests, [], first_of_half, device)


def replay_host(requests: HostRequests, slots: int, host_policy="lru") -> tuple[HostCacheSim, int]:
    """Play the host level's requests against `slots` records and `host_policy` (a HOST_POLICIES
    name, "belady", or a factory(num_layers, num_experts, slots) -> EvictionPolicy); returns the host
    level and its disk reads in the trace's second half."""
    if callable(host_policy):
        policy: EvictionPolicy = host_policy(requests.num_layers, requests.num_experts, slots)
    elif host_policy == "belady":
        policy = HostBelady(requests.next_request_positions())
    else:
        policy = make_host_policy(host_policy, num_layers=requests.num_layers, num_experts=requests.num_experts,
                                  slots=slots)
    host = HostCacheSim(slots, policy, requests.num_layers, requests.level)
    late = 0
    for i, (op, layer, expert) in enumerate(requests.requests):
        if i == requests.half:
            late = -sum(host.disk_reads)
        if isinstance(policy, HostBelady):
            policy.now = i
        if op == WRITE_BACK:
            host.write_back(layer, expert)
        else:
            reserved = i + 1 < len(requests.requests) and requests.requests[i + 1][0] == WRITE_BACK
            host.load(layer, expert, requests.pinned[i] if requests.pinned else frozenset(), reserved)
    if requests.half >= len(requests.requests):
        late = -sum(host.disk_reads)
    return host, late + sum(host.disk_reads)


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
    level: str = "exclusive"
    host_policy: str = "lru"
    notes: list[str] = field(default_factory=list)

    def per_token(self, counts: list[int]) -> float:
        return sum(counts) / self.num_tokens if self.num_tokens else 0.0

    @property
    def host_hit_rate(self) -> float:
        """Host hits over host requests (loads from the device level, or uses on a single level)."""
        asked = sum(self.host_hits) + sum(self.disk_reads)
        return sum(self.host_hits) / asked if asked else 0.0

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
                       exclusive: bool | None = None, level: str | None = None, policy: str = "lru",
                       host_policy: str = "lru", prefetch: int = 0) -> HierarchyResult:
    """Replay `trace` token by token, layer by layer (the engine's order) through the levels.
    `level` is one of LEVELS; `exclusive=True/False` is kept as a shorthand for "exclusive" /
    "inclusive". For level "single", cache_size must be 0 (there are no device slots)."""
    if level is None:
        level = "inclusive" if exclusive is False else "exclusive"
    elif exclusive is not None and exclusive != (level == "exclusive"):
        raise ValueError(f"exclusive={exclusive!r} contradicts level={level!r}")
    check_trace(trace)
    low_cache = 0 if level == "single" else 1
    for name, value, low in (("cache_size", cache_size, low_cache), ("host_slots", host_slots, 0),
                             ("record_bytes", record_bytes, 1), ("prefetch", prefetch, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} is not allowed: use an integer >= {low}")
    if level == "single" and (cache_size or prefetch):
        raise ValueError(f"cache_size={cache_size}, prefetch={prefetch} are not allowed with level='single' "
                         "(no device slots): use 0")
    if cache_size > trace.num_experts:
        raise ValueError(f"cache_size={cache_size} is not allowed: use 1..{trace.num_experts}")
    if host_policy not in HOST_SIM_POLICIES:
        raise ValueError(f"host_policy={host_policy!r} is not allowed: use one of {', '.join(HOST_SIM_POLICIES)}")
    requests = host_requests(trace, level, cache_size, policy=policy, prefetch=prefetch)
    host, late = replay_host(requests, host_slots, host_policy)
    if requests.device is not None:
        hits, misses, prefetch_loads = requests.device
    else:
        hits, misses, prefetch_loads = host.host_hits, host.disk_reads, [0] * trace.num_layers
    distinct = len({(layer, e) for layer, rows in enumerate(trace.selected) for row in rows for e in row})
    return HierarchyResult(
        cache_size, host_slots, level == "exclusive", record_bytes, trace.num_tokens,
        hits=list(hits), misses=list(misses), prefetch_loads=list(prefetch_loads), host_hits=host.host_hits,
        disk_reads=host.disk_reads, disk_rereads=host.disk_rereads, write_backs=host.write_backs,
        peak_host_records=host.peak_held, distinct_experts=distinct, late_disk_reads=late, level=level,
        host_policy=host_policy)


@dataclass(frozen=True)
class HostPolicyRow:
    """One host replay of a sweep: a level, a budget, a policy, and what the host level did."""

    level: str
    budget: float  # share of all L x E experts the host level holds
    slots: int
    host_policy: str
    host_hits: int
    disk_reads: int
    late_disk_reads: int  # in the trace's second half (steady state)
    num_tokens: int

    @property
    def hit_rate(self) -> float:
        asked = self.host_hits + self.disk_reads
        return self.host_hits / asked if asked else 0.0


def host_policy_sweep(trace: RoutingTrace, budgets, host_policies, *, levels=LEVELS, cache_size: int = 4,
                      policy: str = "lru", extra_policies: dict | None = None) -> list[HostPolicyRow]:
    """Host hit rates per level (device slots of `cache_size` per layer under "exclusive" and
    "inclusive"), budget (a share of the L x E experts, 0 < b <= 1) and host policy. `extra_policies`
    maps more names to factories(num_layers, num_experts, slots), for ablations."""
    for name in host_policies:
        if name not in HOST_SIM_POLICIES and name not in (extra_policies or {}):
            raise ValueError(f"host policy {name!r} is not allowed: use one of {', '.join(HOST_SIM_POLICIES)}")
    for budget in budgets:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
            raise ValueError(f"budget={budget!r} is not allowed: use a share of the experts in (0, 1]")
    total = trace.num_layers * trace.num_experts
    rows = []
    for level in levels:
        requests = host_requests(trace, level, 0 if level == "single" else cache_size, policy=policy)
        late_tokens = trace.num_tokens - trace.num_tokens // 2
        for budget in budgets:
            slots = int(round(budget * total))
            for name in host_policies:
                host, late = replay_host(requests, slots, (extra_policies or {}).get(name, name))
                rows.append(HostPolicyRow(level, budget, slots, name, sum(host.host_hits), sum(host.disk_reads),
                                          late, late_tokens))
    return rows
