"""The slot table every level of the hierarchy keeps: which key sits in which slot, who pins it.

A level (a layer's device slots, cache.py; the host arena, host_cache.py) owns a fixed number of
slots. `SlotTable` is its bookkeeping, apart from the moving: `slot_of[key]`, `owner[slot]`,
`pins[slot]` (users: a copy in flight, a layer computing), the level's eviction policy told of every
map and unmap, and `free_or_victim` (a free unpinned slot, else the policy's victim among unpinned
keys). The level holds its own lock around every call; the table never blocks.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

from .policies import EvictionPolicy


class SlotTable:
    def __init__(self, size: int, policy: EvictionPolicy) -> None:
        self.policy = policy
        self.slot_of: dict[Hashable, int] = {}  # key -> its slot
        self.owner: list[Hashable | None] = [None] * size  # [S] slot -> key in it (None: free)
        self.pins = [0] * size  # [S] users of the slot

    def __len__(self) -> int:
        return len(self.owner)

    def __contains__(self, key) -> bool:
        return key in self.slot_of

    def keys(self) -> set:
        return set(self.slot_of)

    def free_slot(self) -> int | None:
        """An unmapped slot nobody pins (an unmapped slot may still be pinned by a waiter that has not
        yet seen its load fail), or None."""
        for slot, owner in enumerate(self.owner):
            if owner is None and self.pins[slot] == 0:
                return slot
        return None

    def victim(self, protect: Iterable = frozenset()):
        """The policy's pick among mapped keys that are unpinned and not in `protect` (None: none)."""
        protect = set(protect)
        evictable = [k for k, s in self.slot_of.items() if self.pins[s] == 0 and k not in protect]
        return self.policy.victim(evictable) if evictable else None

    def free_or_victim(self, protect: Iterable = frozenset()) -> tuple[int | None, Hashable | None]:
        """(slot, evicted key): a free slot (evicted None), else the victim's slot, unmapped; (None, None)
        when every slot is pinned or protected."""
        slot = self.free_slot()
        if slot is not None:
            return slot, None
        victim = self.victim(protect)
        if victim is None:
            return None, None
        slot = self.slot_of[victim]
        self.unmap(slot)
        return slot, victim

    def map(self, slot: int, key) -> None:
        self.owner[slot] = key
        self.slot_of[key] = slot
        self.policy.insert(key)

    def unmap(self, slot: int):
        """Free `slot` (its pins stay); returns the key it held, or None."""
        key = self.owner[slot]
        if key is not None:
            del self.slot_of[key]
            self.owner[slot] = None
            self.policy.evict(key)
        return key
