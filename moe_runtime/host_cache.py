"""The host level: a host-RAM expert cache between the device slots and the disk store.

Levels (L layers, E experts per layer, C device slots per layer, N host slots in all):

    device slots, C per layer (cache.py)  <-  HostCache: N records, one arena  <-  disk store (DiskTier)

`HostCache` is a slow tier (store.SlowTier) wrapping the disk tier, so the device cache, the
transcoding tier and the fault handling above it are unchanged. Its arena is one preallocated
uint8 [N, stride] buffer (pinned on CUDA), global across layers, keyed (layer, expert), with its own
eviction policy (policies.py). A record missing from the arena is read from disk with O_DIRECT
straight into an arena slot, then copied to the device slot.

- exclusive (CUDA, device slots holding records): an expert copied to the device leaves the arena
  (its slot is free again), and one evicted from the device is written back into the arena
  (`exchange`: a device -> host copy on the transfer stream, before the load that overwrites the
  device slot) instead of being read from disk again. A disk read passes through a free slot (or
  the disk tier's staging buffer) and evicts nothing.
- inclusive (CPU: device slots hold the compute form, kernels.forms): the arena keeps what it read,
  as compact records.

Prefetch by level: host -> device one layer ahead is the speculator's (experts.py); disk -> host
several layers ahead is `HostPrefetcher` (below), on this cache's own I/O thread, which reads only
while no load is using the tier: demand loads, then host -> device prefetches, then disk -> host
guesses, so a guess never delays a demand load (it may finish the one read it started).

sim/hierarchy.py replays the same rules on a routing trace; tests check both agree.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .policies import make_policy
from .stats import StatsCollector
from .store import aligned_empty, level_of

GB = 1e9
HOST_HEADROOM_GB = 2.0  # left free by host_cache_gb="auto": activations, tokenizer, Python's own growth


@dataclass(frozen=True)
class HostPlan:
    """How host RAM is used: `offload` resolved ("ram" or "disk") and, for "disk", the arena's slots."""

    offload: str
    host_slots: int
    budget_bytes: int  # what the setting allows (0: no host cache)
    needed_bytes: int  # every record that can be off the device at once
    exclusive: bool


def available_ram_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def plan_host_memory(offload: str, host_cache_gb, *, num_layers: int, num_experts: int, cache_size: int,
                     stride: int, exclusive: bool, transcodes: bool = False,
                     available: int | None = None) -> HostPlan:
    """Resolve the host-memory settings against this machine, or raise ValueError with the numbers.

    offload="ram" is the strict request (every record in RAM); "disk" keeps the store on disk with
    a host cache of `host_cache_gb` (a number of GB, or "auto" = available minus HOST_HEADROOM_GB);
    "auto" is "ram" when every record fits the budget, else "disk". `exclusive`: the levels can be
    exclusive (CUDA). `transcodes`: the device computes from another form than the record; then the
    levels are exclusive only when the budget cannot hold every record (slots then keep the record
    and the form is made per use, `TranscodeOnUse`), since converting on load is cheaper per use.
    """
    available = available_ram_bytes() if available is None else available
    every = num_layers * num_experts * stride
    needed = num_layers * (num_experts - cache_size) * stride if exclusive else every
    needed += stride if exclusive else 0  # exclusive: one slot stages a disk read on its way to the device
    headroom = int(HOST_HEADROOM_GB * GB)
    if host_cache_gb == "auto":
        budget = max(0, available - headroom)
    else:
        budget = int(host_cache_gb * GB)
        if budget > available:
            raise ValueError(f"host_cache_gb={host_cache_gb:g} is more than this machine has: "
                             f"{available / GB:.2f} GB of RAM available; use at most "
                             f"{max(0.0, (available - headroom) / GB):.2f} or \"auto\"")
        if 0 < budget < num_layers * stride:
            raise ValueError(f"host_cache_gb={host_cache_gb:g} is too small for one expert per layer: "
                             f"{num_layers} x {stride / 1e6:.1f} MB = {num_layers * stride / GB:.3f} GB; "
                             "use 0 (no host cache) or more")
    if offload == "ram" or (offload == "auto" and every <= budget):
        if every > max(0, available - headroom):
            suggest = max(0.0, (available - headroom) / GB)
            raise ValueError(f"offload=\"ram\" needs {every / GB:.2f} GB for every expert (+ {HOST_HEADROOM_GB:g} GB "
                             f"headroom), this machine has {available / GB:.2f} GB available: use offload=\"disk\" "
                             f"with host_cache_gb={suggest:.1f} (or \"auto\")")
        return HostPlan("ram", 0, budget, every, exclusive)
    if exclusive and transcodes and budget >= every:
        exclusive, needed = False, every  # every record fits: convert on load, keep the arena inclusive
    if host_cache_gb == "auto" and budget < num_layers * stride:
        budget = 0  # "auto" on a machine without room for one expert per layer: no host cache
    slots = min(budget, needed) // stride
    return HostPlan("disk", int(slots), budget, needed, exclusive and slots > 0)


class HostCache:
    """A slow tier over `inner` (the disk tier): at most `slots` records kept in one host arena."""

    def __init__(self, inner, num_layers: int, slots: int, stride: int, policy: str, exclusive: bool,
                 pin: bool, stats: StatsCollector) -> None:
        self.inner, self.stride, self.exclusive, self.stats = inner, stride, exclusive, stats
        self.nbytes = inner.nbytes
        self.arena = aligned_empty(slots * stride, torch.device("cpu"), pin=pin).view(slots, stride)
        self.policy = make_policy(policy)
        self.slot_of: dict[tuple[int, int], int] = {}  # (layer, expert) -> arena slot
        self.owner: list[tuple[int, int] | None] = [None] * slots
        self.pins = [0] * slots  # copies in flight from or into the slot
        self.reading: dict[tuple[int, int], threading.Event] = {}  # disk reads into the arena in flight
        self.copied: list[torch.cuda.Event | None] = [None] * slots  # CUDA: last async copy out of the slot
        self.active = 0  # copy_to / exchange calls running (the I/O thread waits for 0)
        self.on_device: Callable[[tuple[int, int]], bool] | None = None  # exclusive: is (layer, expert) in a slot?
        self._cond = threading.Condition()
        self._local = threading.local()
        self._io = _IoThread(self)

    @property
    def direct_io(self) -> bool | None:
        return getattr(self.inner, "direct_io", None)

    @property
    def slots(self) -> int:
        return len(self.owner)

    def held(self) -> set[tuple[int, int]]:
        with self._cond:
            return {k for k in self.slot_of if k not in self.reading}

    def held_bytes(self) -> int:
        return len(self.held()) * self.stride

    # --- slots (caller holds the lock) ----------------------------------------------------------
    def _free_slot(self) -> int | None:
        for slot, owner in enumerate(self.owner):
            if owner is None and self.pins[slot] == 0:
                return slot
        return None

    def _free_or_victim(self, protect=frozenset()) -> int | None:
        slot = self._free_slot()
        if slot is not None:
            return slot
        evictable = [k for k, s in self.slot_of.items() if self.pins[s] == 0 and k not in protect]
        if not evictable:
            return None
        victim = self.policy.victim(evictable)
        slot = self.slot_of.pop(victim)
        self.owner[slot] = None
        self.policy.evict(victim)
        return slot

    def _map(self, slot: int, key: tuple[int, int]) -> None:
        self.owner[slot] = key
        self.slot_of[key] = slot
        self.policy.insert(key)

    def _unmap(self, slot: int) -> None:
        key = self.owner[slot]
        if key is not None:
            del self.slot_of[key]
            self.owner[slot] = None
            self.policy.evict(key)

    def _wait_copied(self, slot: int) -> None:
        event = self.copied[slot]
        if event is not None:  # the slot's previous record may still be on its way to the device
            event.synchronize()
            self.copied[slot] = None

    # --- the slow-tier interface ----------------------------------------------------------------
    def level_of(self, layer: int, expert: int) -> str:
        """ "host" for a record in the arena, else the inner tier's level (a read in flight is still disk)."""
        key = (layer, expert)
        with self._cond:
            held = key in self.slot_of and key not in self.reading
        return "host" if held else level_of(self.inner, layer, expert)

    def copy_to(self, layer: int, expert: int, dst: torch.Tensor) -> None:
        """Fill `dst` with the record: from the arena (a host hit) or from disk (a disk read, kept
        in the arena when a slot is free or evictable)."""
        key = (layer, expert)
        with self._cond:
            self.active += 1
        try:
            self._copy_to(key, dst)
        finally:
            with self._cond:
                self.active -= 1
                self._cond.notify_all()

    def _copy_to(self, key: tuple[int, int], dst: torch.Tensor) -> None:
        layer, expert = key
        with self._cond:
            while key in self.reading:  # the I/O thread is reading it: wait rather than read it twice
                self._cond.wait()
            slot = self.slot_of.get(key)
            hit = slot is not None
            if hit:
                self.pins[slot] += 1
                self.policy.access(key)
            else:  # exclusive: a disk read passes through a free slot only, evicting nothing
                slot = self._free_slot() if self.exclusive else self._free_or_victim()
                if slot is not None:
                    self._map(slot, key)
                    self.pins[slot] += 1
                    self.reading[key] = threading.Event()
        if slot is None:  # no room (no arena, or every slot busy): straight from disk
            self.inner.copy_to(layer, expert, dst)
            self.stats.record_disk_read(layer, self.nbytes)
            return
        ok = False
        try:
            if not hit:
                self._wait_copied(slot)
                self.inner.copy_to(layer, expert, self.arena[slot])  # O_DIRECT into the arena
                self.stats.record_disk_read(layer, self.nbytes)
            else:
                self.stats.record_host_hit(layer)
            dst.copy_(self.arena[slot, : dst.numel()], non_blocking=True)
            if dst.device.type == "cuda":
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(dst.device))
                self.copied[slot] = event
            ok = True
        finally:
            with self._cond:
                self.pins[slot] -= 1
                done = self.reading.pop(key, None)
                if not ok or self.exclusive:  # failed: nothing half-read stays; exclusive: now on the device
                    if self.owner[slot] == key:
                        self._unmap(slot)
                if done is not None:
                    done.set()
                self._cond.notify_all()

    def exchange(self, layer: int, expert: int, evicted: int, dst: torch.Tensor) -> None:
        """Exclusive levels: load (layer, expert) into the device slot `dst`, whose expert `evicted`
        goes back to the arena (a device -> host copy) instead of being dropped.

        In the same order as sim/hierarchy.py: the load first (a host hit frees its arena slot),
        then the evicted record takes a free slot, or the policy's victim. Its bytes are copied out
        of `dst` before the load overwrites it: into a free arena slot, or a staging buffer."""
        if not self.exclusive or not self.slots:
            self.copy_to(layer, expert, dst)
            return
        back = (layer, evicted)
        with self._cond:
            self.active += 1
            reserved = self._free_slot()
            if reserved is not None:
                self.pins[reserved] += 1
        try:
            if reserved is not None:
                self._wait_copied(reserved)
                saved = self.arena[reserved]
            else:
                saved = self._staging()
            saved[: dst.numel()].copy_(dst)  # device -> host, finished before the load below starts
            self._copy_to((layer, expert), dst)
            staged = reserved is None  # the record waits in the staging buffer for a slot
            with self._cond:
                if back in self.slot_of:  # cannot happen while levels are exclusive; keep one copy
                    return
                slot = reserved
                if staged:
                    slot = self._free_or_victim()
                    if slot is None:
                        return  # every slot busy: it comes from disk next time
                    self.pins[slot] += 1
            if staged:
                self._wait_copied(slot)
                self.arena[slot].copy_(saved)
            with self._cond:
                self._map(slot, back)
                if staged:
                    self.pins[slot] -= 1
            self.stats.record_write_back(layer, dst.numel())
        finally:
            with self._cond:
                if reserved is not None:
                    self.pins[reserved] -= 1
                self.active -= 1
                self._cond.notify_all()

    def _staging(self) -> torch.Tensor:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = aligned_empty(self.stride, torch.device("cpu"), pin=self.arena.is_pinned())
            self._local.buf = buf
        return buf

    # --- disk -> host prefetch --------------------------------------------------------------------
    def prefetch(self, keys: list[tuple[int, int]]) -> None:
        """Read these records into the arena on the I/O thread, in order, when the tier is idle.
        A newer call replaces the guesses not started yet."""
        self._io.submit(keys)

    def _prefetch_one(self, key: tuple[int, int], protect: set) -> bool:
        with self._cond:
            while self.active:  # demand and host -> device loads first
                self._cond.wait()
            if key in self.slot_of or key in self.reading:
                return True
            slot = self._free_or_victim(protect)
            if slot is None:
                return False
            if self.exclusive and self.on_device is not None and self.on_device(key):
                return True  # on the device already: a copy here would hold it twice
            self._map(slot, key)
            self.pins[slot] += 1
            self.reading[key] = threading.Event()  # from here a device load of it waits for this read
        ok = False
        try:
            self._wait_copied(slot)
            self.inner.copy_to(key[0], key[1], self.arena[slot])
            self.stats.record_disk_read(key[0], self.nbytes, prefetch=True)
            ok = True
        except Exception:  # noqa: BLE001 - a failed guess is dropped; the demand path reads it again
            pass
        finally:
            with self._cond:
                self.pins[slot] -= 1
                if not ok and self.owner[slot] == key:
                    self._unmap(slot)
                self.reading.pop(key).set()
                self._cond.notify_all()
        return True

    def drain(self) -> None:
        """Wait until the I/O thread is idle (tests and benchmarks)."""
        self._io.drain()

    def close(self) -> None:
        self._io.close()
        self.inner.close()


class _IoThread:
    """The host cache's own I/O thread: works through the newest list of disk -> host guesses."""

    def __init__(self, cache: HostCache) -> None:
        self.cache = cache
        self.pending: list[tuple[int, int]] = []
        self.busy = False
        self.closed = False
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None

    def submit(self, keys: list[tuple[int, int]]) -> None:
        with self.cond:
            if self.closed:
                return
            self.pending = list(keys)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="host-cache-io", daemon=True)
                self.thread.start()
            self.cond.notify_all()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                key = self.pending.pop(0)
                protect = set(self.pending) | {key}
                self.busy = True
            try:
                if not self.cache._prefetch_one(key, protect):
                    with self.cond:
                        self.pending = []  # no evictable slot: the rest would not fit either
            finally:
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()

    def drain(self) -> None:
        with self.cond:
            while (self.pending or self.busy) and not self.closed:
                self.cond.wait()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.pending = []
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join()


class HostPrefetcher:
    """At layer L, guesses the experts of layers L+1..L+n and hands the ones not on the device to the
    host cache's I/O thread, nearest layer first, then most often ranked first.

    `far`: (layer j, a speculator guessing layer j from L's MoE input: experts.Speculator with
    prefetch 0, the same fold of norms and router as the one-layer-ahead guess)."""

    def __init__(self, far: list, host: HostCache, per_layer: int) -> None:
        self.far, self.host, self.per_layer = far, host, per_layer
        self.last_guess = None  # not the device speculator: the next layer records nothing from it

    def __call__(self, hidden_states: torch.Tensor) -> None:
        keys = []
        for target, speculator in self.far:
            speculator(hidden_states)  # ranking per token; last_resident: the target's device experts
            votes: dict[int, int] = {}
            for ranking in speculator.last_guess:  # [T] rankings: count each token's top per_layer
                for e in ranking[: self.per_layer]:
                    votes[e] = votes.get(e, 0) + 1
            ranked = sorted(votes, key=lambda e: -votes[e])[: self.per_layer]
            keys += [(target, e) for e in ranked if e not in speculator.last_resident]
        self.host.prefetch(keys)


class Speculators:
    """Several speculators called in turn at one layer; `last_guess` is the first one's (the device
    speculator's), which the next layer records."""

    def __init__(self, *speculators) -> None:
        self.speculators = speculators

    @property
    def last_guess(self):
        return self.speculators[0].last_guess

    @property
    def last_resident(self):
        return getattr(self.speculators[0], "last_resident", None)

    def __call__(self, hidden_states: torch.Tensor) -> None:
        for speculator in self.speculators:
            speculator(hidden_states)


class TranscodeOnUse:
    """A compute form for exclusive levels when the device computes from a converted form (e.g. the
    Triton HQQ layout): slots keep the record itself, so an evicted expert can be written back to
    the host arena, and the compute form is made on each use into one scratch buffer shared by all
    layers (layers and their experts run one after another on one stream, so one is enough)."""

    transcodes = False

    def __init__(self, form, codec, device: torch.device) -> None:
        self.form, self.codec, self.nbytes = form, codec, codec.nbytes
        self.scratch = aligned_empty(form.nbytes, device)

    def load(self, record: torch.Tensor, slot: torch.Tensor) -> None:
        slot[: self.nbytes].copy_(record[: self.nbytes])

    def weights(self, slot: torch.Tensor) -> tuple:
        self.form.load(slot, self.scratch)
        return self.form.weights(self.scratch)
