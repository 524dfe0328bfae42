"""Eviction policies of the per-layer expert cache, shared by the engine and the simulator.

A policy only ranks keys (expert ids of one layer); the cache decides when to evict and which keys
may be evicted at all (experts in use are pinned). Adding a policy = one small class + `POLICIES`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol


class EvictionPolicy(Protocol):
    """What a cache needs of a policy. Keys are expert ids of one layer; the cache calls `insert` when
    an expert becomes resident, `access` on every use, `evict` when it leaves, and asks `victim` to pick
    among the experts it may evict (never a pinned one)."""

    def access(self, key: int) -> None: ...

    def insert(self, key: int) -> None: ...

    def evict(self, key: int) -> None: ...

    def victim(self, candidates: Iterable[int]) -> int: ...


class RankedPolicy:
    """A policy that ranks keys by a score (`_rank`); the victim is the lowest-ranked candidate.
    Every event advances `clock`, the policy's notion of time."""

    def __init__(self) -> None:
        self.clock = 0

    def access(self, key: int) -> None:
        """A resident (or just loaded) key was used."""
        self.clock += 1
        self._access(key)

    def insert(self, key: int) -> None:
        """A key became resident (loaded on demand or by prefetch)."""
        self.clock += 1
        self._insert(key)

    def evict(self, key: int) -> None:
        self._forget(key)

    def victim(self, candidates: Iterable[int]) -> int:
        return min(candidates, key=self._rank)

    def _access(self, key: int) -> None:
        raise NotImplementedError

    def _insert(self, key: int) -> None:
        self._access(key)

    def _forget(self, key: int) -> None:
        raise NotImplementedError

    def _rank(self, key: int):
        raise NotImplementedError


class LRU(RankedPolicy):
    """Evict the key whose last use is oldest (the paper's choice)."""

    def __init__(self) -> None:
        super().__init__()
        self.last_use: dict[int, int] = {}

    def _access(self, key: int) -> None:
        self.last_use[key] = self.clock

    def _forget(self, key: int) -> None:
        self.last_use.pop(key, None)

    def _rank(self, key: int):
        return self.last_use.get(key, -1)


class LFU(RankedPolicy):
    """Evict the least frequently used key; counts persist across evictions; ties go to LRU."""

    def __init__(self) -> None:
        super().__init__()
        self.count: dict[int, int] = {}
        self.last_use: dict[int, int] = {}

    def _access(self, key: int) -> None:
        self.count[key] = self.count.get(key, 0) + 1
        self.last_use[key] = self.clock

    def _insert(self, key: int) -> None:
        self.last_use[key] = self.clock

    def _forget(self, key: int) -> None:
        pass

    def _rank(self, key: int):
        return (self.count.get(key, 0), self.last_use.get(key, -1))


class LFRU(RankedPolicy):
    """Frequency with exponential decay: a key's score halves every `half_life` accesses.

    Recency and frequency in one number: recently hot experts outrank once-popular ones.
    """

    def __init__(self, half_life: float = 8.0) -> None:
        super().__init__()
        self.decay = 0.5 ** (1.0 / half_life)
        self.score: dict[int, float] = {}
        self.stamp: dict[int, int] = {}

    def _current(self, key: int) -> float:
        return self.score.get(key, 0.0) * self.decay ** (self.clock - self.stamp.get(key, self.clock))

    def _access(self, key: int) -> None:
        self.score[key] = self._current(key) + 1.0
        self.stamp[key] = self.clock

    def _insert(self, key: int) -> None:
        self.score[key] = self._current(key)
        self.stamp[key] = self.clock

    def _forget(self, key: int) -> None:
        pass

    def _rank(self, key: int):
        return self._current(key)


POLICIES: dict[str, type[RankedPolicy]] = {"lru": LRU, "lfu": LFU, "lfru": LFRU}


def make_policy(name: str) -> EvictionPolicy:
    if name not in POLICIES:
        raise ValueError(f"policy={name!r} is not allowed: use one of {', '.join(POLICIES)}")
    return POLICIES[name]()


# --- the host level ------------------------------------------------------------------------------
# The host cache is one pool global across layers, keyed (layer, expert), and the engine visits it
# layer by layer, token after token: a cyclic pattern. When the budget is below the working set a
# global LRU evicts exactly the experts the next tokens need first (each returns one cycle later),
# and the pool thrashes. The host policies below compare experts of different layers fairly.

HostKey = tuple[int, int]  # (layer, expert)


class LayerClockFrequency(RankedPolicy):
    """Decayed use frequency, with time counted per layer (inside the quota-lfru host policies).

    A key's score is the sum of its past uses, each weighted by decay ** (the events of ITS OWN
    layer since that use), with decay = 0.5 ** (1 / half_life). It estimates how likely the key is
    to be needed at its layer's next visit from its long-run use. Counting time per layer removes the
    cyclic bias of one global clock: on a layer-by-layer walk the layer just visited always looks
    most recent, though it is the one needed last. `insert_weight` is what an insertion adds (a
    record read from disk is about to be used; a write-back into an exclusive host level is a use
    just finished on the device). With `recent_bonus` b, a key used at its layer's latest visit (a
    run of consecutive events of that layer) ranks as score x (1 + b): the router's stay
    probability. Ties go to the older key (LRU)."""

    def __init__(self, num_layers: int, half_life: float, insert_weight: float = 0.0,
                 recent_bonus: float = 0.0) -> None:
        super().__init__()
        if half_life <= 0:
            raise ValueError(f"half_life={half_life!r} is not allowed: use a number of events > 0")
        self.decay = 0.5 ** (1.0 / half_life)
        self.insert_weight, self.recent_bonus = insert_weight, recent_bonus
        self.layer_clock = [0] * num_layers
        self.layer_visit = [0] * num_layers
        self.visiting: int | None = None  # the layer of the latest event
        self.score: dict[HostKey, float] = {}
        self.stamp: dict[HostKey, int] = {}
        self.visit_of: dict[HostKey, int] = {}
        self.last_use: dict[HostKey, int] = {}

    def _current(self, key: HostKey) -> float:
        age = self.layer_clock[key[0]] - self.stamp.get(key, 0)
        return self.score.get(key, 0.0) * self.decay ** age

    def _add(self, key: HostKey, weight: float) -> None:
        layer = key[0]
        if layer != self.visiting:
            self.layer_visit[layer] += 1
            self.visiting = layer
        self.layer_clock[layer] += 1
        self.score[key] = self._current(key) + weight
        self.stamp[key] = self.layer_clock[layer]
        self.visit_of[key] = self.layer_visit[layer]
        self.last_use[key] = self.clock

    def _access(self, key: HostKey) -> None:
        self._add(key, 1.0)

    def _insert(self, key: HostKey) -> None:
        self._add(key, self.insert_weight)

    def _forget(self, key: HostKey) -> None:
        pass  # scores persist across evictions: a key read again keeps its history

    def _rank(self, key: HostKey):
        recent = self.visit_of.get(key) == self.layer_visit[key[0]]
        return (self._current(key) * (1.0 + self.recent_bonus * recent), self.last_use.get(key, -1))


class LayerQuota(RankedPolicy):
    """Per-layer quotas: every layer has slots // num_layers keys of the pool (the remainder to the
    first layers); a layer may hold more while others hold less, but the victim is always taken from
    a layer furthest over its quota — among those, the layer seen last (on a layer-by-layer walk, the
    one needed last) — and within that layer by the inner policy's rank (`inner`: a RankedPolicy over
    the same keys). This keeps every layer's share of the pool until its next visit, where one global
    ranking evicts the layers visited longest ago: the ones needed next."""

    def __init__(self, num_layers: int, slots: int, inner: RankedPolicy) -> None:
        super().__init__()
        self.inner = inner
        base, extra = divmod(slots, num_layers)
        self.quota = [base + (layer < extra) for layer in range(num_layers)]
        self.held = [0] * num_layers
        self.layer_seen = [0] * num_layers  # clock of the layer's last event

    def access(self, key: HostKey) -> None:
        self._seen(key)
        self.inner.access(key)

    def insert(self, key: HostKey) -> None:
        self._seen(key)
        self.held[key[0]] += 1
        self.inner.insert(key)

    def evict(self, key: HostKey) -> None:
        self.held[key[0]] = max(0, self.held[key[0]] - 1)
        self.inner.evict(key)

    def _seen(self, key: HostKey) -> None:
        self.clock += 1
        self.layer_seen[key[0]] = self.clock

    def victim(self, candidates: Iterable[HostKey]) -> HostKey:
        candidates = list(candidates)
        layer = max({k[0] for k in candidates},
                    key=lambda layer: (self.held[layer] - self.quota[layer], self.layer_seen[layer]))
        return self.inner.victim([k for k in candidates if k[0] == layer])


# Half-life of the host level's decayed frequency, in events of the key's own layer (about 128 tokens
# of Mixtral's top-2 on a single RAM level). Chosen by measurement: `python -m moe_runtime.sim
# host-policy --half-lives 16,64` (docs/results.md): 256 did better than 64 and 16 at all budgets but one.
HOST_HALF_LIFE_EVENTS = 256.0


def _quota_lfru(num_layers: int, num_experts: int, slots: int) -> EvictionPolicy:
    return LayerQuota(num_layers, slots, LayerClockFrequency(num_layers, HOST_HALF_LIFE_EVENTS, insert_weight=1.0))


def _quota_lfru_stay(num_layers: int, num_experts: int, slots: int) -> EvictionPolicy:
    return LayerQuota(num_layers, slots, LayerClockFrequency(num_layers, HOST_HALF_LIFE_EVENTS, insert_weight=1.0,
                                                             recent_bonus=1.0))


# name -> factory(num_layers, num_experts, slots); the first is the default (OffloadConfig.host_policy).
HOST_POLICIES = {
    "quota-lfru": _quota_lfru,
    "quota-lfru-stay": _quota_lfru_stay,
    "lru": lambda num_layers, num_experts, slots: LRU(),
    "lfu": lambda num_layers, num_experts, slots: LFU(),
    "quota-lru": lambda num_layers, num_experts, slots: LayerQuota(num_layers, slots, LRU()),
}


def make_host_policy(name: str, *, num_layers: int, num_experts: int, slots: int) -> EvictionPolicy:
    """The host level's policy `name` (one of HOST_POLICIES) over keys (layer, expert), for a pool of
    `slots` records of a model with `num_layers` MoE layers of `num_experts` experts."""
    if name not in HOST_POLICIES:
        raise ValueError(f"host_policy={name!r} is not allowed: use one of {', '.join(HOST_POLICIES)}")
    for what, value, low in (("num_layers", num_layers, 1), ("num_experts", num_experts, 1), ("slots", slots, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{what}={value!r} is not allowed: use an integer >= {low}")
    return HOST_POLICIES[name](num_layers, num_experts, slots)
