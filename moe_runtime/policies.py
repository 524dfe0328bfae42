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
