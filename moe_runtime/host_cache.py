"""The host level: a host-RAM expert cache between the device slots and the disk store.

Levels (L layers, E experts per layer, C device slots per layer, N host slots in all):

    device slots, C per layer (cache.py)  <-  HostCache: N records, one arena  <-  disk store (DiskTier)

`HostCache` is a slow tier (store.SlowTier) wrapping the disk tier. Its arena is one preallocated
uint8 [slots, stride] buffer (pinned on CUDA), global across layers, keyed (layer, expert), with its
own eviction policy (policies.py) and slot table (slots.py). Records are in the form the device
computes from (the store wrote them so), so every move is one contiguous copy and nothing is
converted. A record missing from the arena is read from disk with O_DIRECT straight into a slot.
Three ways to stack the levels:

- exclusive (CUDA; `exchanges`): an expert copied to the device leaves the arena (its slot is free
  again), and one evicted from the device is written back into the arena (`exchange`) instead of being
  read from disk again. The write-back does not serialize the miss: on the load stream the evicted
  slot is first copied device -> device into a spare device buffer (fast), then the load overwrites the
  slot; the spare's device -> host copy into the arena runs on the write-back stream meanwhile (PCIe
  copies both ways at once), ordered by events (below). A disk read passes through a free slot (or the
  disk tier's staging buffer) and evicts nothing.
- shared (CPU; `shares_memory`): the host arena is where experts compute. A layer's device slots are
  views of arena records (`attach` pins one; `detach` lets it go): a host hit costs no copy, a miss is
  one disk read into the arena. The host level (N records, its policy) keeps what it read, as the
  inclusive levels do; a record the device level still uses stays until it is detached. The arena has
  N + L*C slots (at most L*E): an expert held by both levels is one record.
- inclusive (separate device slots, not used by `load`): the arena keeps what it read; a device load
  copies the record.

Prefetch by level: host -> device one layer ahead is the speculator's (experts.py); disk -> host
several layers ahead is `speculation.DiskPrefetcher`, on this cache's own I/O thread, which reads only
while no load is using the tier: demand loads, then host -> device prefetches, then disk -> host
guesses, so a guess never delays a demand load (it may finish the one read it started).

sim/hierarchy.py replays the same rules on a routing trace (shared replays as inclusive: same
counts); tests check both agree.

Device memory (`device.Device`: CudaDevice on CUDA, an EmulatedDevice in tests; None on a CPU): the
arena is pinned by `dev.pin` at exactly its planned size and unpinned on `close`. Ordering of the
device copies that touch the arena, by events: `arena_events[slot]` is the latest device copy into or
out of an arena slot (each such copy waits on the one before, so it stands for all of them); a host
write into the slot (a disk read) synchronizes on it first, a device copy waits on it on its stream.
A spare goes back to its pool with the event after its device -> host copy; the next device -> device
copy into it waits on that.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .device import BufferPool, Device, Event, arena_pin_bytes, device_guard, device_thread, pinned_size, slots_within
from .policies import EvictionPolicy
from .slots import SlotTable
from .stats import StatsCollector
from .store import STAGING_BUFFERS, SlowTier, aligned_empty

IO_THREAD = "host-cache-io"  # name of the host cache's disk-read thread

GB = 1e9
HOST_HEADROOM_GB = 2.0  # left free by host_cache_gb="auto": activations, tokenizer, Python's own growth
WRITE_BACK_SPARES = 2  # spare device buffers of the write-back: one per thread that loads (demand, prefetch)


@dataclass(frozen=True)
class HostPlan:
    """How host RAM is used: `offload` resolved ("ram" or "disk") and, for "disk", the arena's slots."""

    offload: str
    host_slots: int
    budget_bytes: int  # what the setting allows (0: no host cache)
    needed_bytes: int  # every record that can be off the device at once
    exclusive: bool
    pinned_bytes: int = 0  # what is pinned for it (device.py's sizes): the arena and the disk tier's
    # staging buffers, or the RAM tier's blocks; 0 on a CPU, where nothing is pinned


def available_ram_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def plan_host_memory(offload: str, host_cache_gb, *, num_layers: int, num_experts: int, cache_size: int,
                     stride: int, exclusive: bool, available: int | None = None, pinned: bool = False) -> HostPlan:
    """Resolve the host-memory settings against this machine, or raise ValueError with the numbers.

    offload="ram" is the strict request (every record in RAM); "disk" keeps the store on disk with
    a host cache of `host_cache_gb` (a number of GB, or "auto" = available minus HOST_HEADROOM_GB);
    "auto" is "ram" when every record fits the budget, else "disk". `exclusive`: the levels can be
    exclusive (CUDA). Records are in the device's compute form, so there is no conversion to plan for.
    `pinned`: host memory is pinned (a GPU): the plan counts what `Device.pin` really pins (whole pages, no
    power-of-two rounding), and the disk tier's `STAGING_BUFFERS` staging buffers come out of the budget.
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
        ram_pinned = num_layers * pinned_size(num_experts * stride) if pinned else 0  # RamTier: a block per layer
        return HostPlan("ram", 0, budget, every, exclusive, ram_pinned)
    if host_cache_gb == "auto" and budget < num_layers * stride:
        budget = 0  # "auto" on a machine without room for one expert per layer: no host cache
    staging = STAGING_BUFFERS * pinned_size(stride) if pinned else 0
    slots = slots_within(min(max(0, budget - staging), needed), stride)
    arena = arena_pin_bytes(slots, stride) if pinned else 0
    return HostPlan("disk", int(slots), budget, needed, exclusive and slots > 0, arena + staging)


class _Unranked:
    """The policy of a shared arena's physical slots: never asked for a victim (the host level's own
    policy ranks the records it holds)."""

    def access(self, key) -> None:
        pass

    def insert(self, key) -> None:
        pass

    def evict(self, key) -> None:
        pass

    def victim(self, candidates):
        raise RuntimeError("a shared arena frees slots by its host policy, never by a physical victim")


class HostCache(SlowTier):
    """A slow tier over `inner` (the disk tier): at most `slots` records kept by the host level, in one
    host arena. `policy`: the host level's eviction policy over (layer, expert) keys. `shared`: the device
    computes from the arena (CPU), whose extra `device_slots` (L*C) hold what the device level uses.
    `dev`: the Device of the separate device slots (None on a CPU): it pins the arena and runs the copies."""

    def __init__(self, inner: SlowTier, num_layers: int, slots: int, stride: int, policy: EvictionPolicy,
                 exclusive: bool, stats: StatsCollector, shared: bool = False, device_slots: int = 0,
                 max_records: int | None = None, dev: Device | None = None) -> None:
        if exclusive and shared:
            raise ValueError("a host cache is exclusive with separate device slots or shared with the device, "
                             "not both")
        if shared and dev is not None:
            raise ValueError("a host cache shared with the device computes in host RAM: it takes no Device")
        self.inner, self.stride, self.exclusive, self.stats = inner, stride, exclusive, stats
        self.shares_memory, self.exchanges = shared, exclusive
        self.nbytes = inner.nbytes
        self.capacity = slots  # records the host level keeps (its budget)
        physical = slots + (device_slots if shared else 0)
        physical = min(physical, max_records) if max_records is not None else physical
        self.dev = dev
        self.wb_stream = None  # the write-back's device -> host copies
        self.spares: BufferPool | None = None  # spare device buffers the evicted slot is copied to first
        if dev is None or not physical:  # (an empty arena pins nothing)
            self.arena = aligned_empty(physical * stride, torch.device("cpu")).view(physical, stride)
        else:
            with device_guard(dev):
                self.arena = dev.pin(physical * stride).view(physical, stride)  # exactly the plan, page-aligned
                if exclusive and physical:
                    self.wb_stream = dev.new_stream()
                    self.spares = BufferPool(lambda: dev.empty(stride), None, WRITE_BACK_SPARES)
        self.policy = policy
        # exclusive / inclusive: the arena's slots are the host level's (the table ranks them by `policy`);
        # shared: they hold the host level's records and the device level's, the host's ranked apart
        self.table = SlotTable(physical, _Unranked() if shared else policy)
        self.kept: set[tuple[int, int]] = set()  # shared: the records the host level keeps (<= capacity)
        self.attached: set[tuple[int, int]] = set()  # shared: records the device level computes from
        self.reading: dict[tuple[int, int], threading.Event] = {}  # disk reads into the arena in flight
        self.arena_events: list[Event | None] = [None] * physical  # the latest device copy into or out of the slot
        self.active = 0  # device loads running (the I/O thread waits for 0)
        self._cond = threading.Condition()
        self._io = _IoThread(self)

    @property
    def direct_io(self) -> bool | None:
        return self.inner.direct_io

    @property
    def slots(self) -> int:
        """Records the host level keeps at most (its budget, in records)."""
        return self.capacity

    def held(self) -> set[tuple[int, int]]:
        """The records the host level holds now (reads in flight excluded)."""
        with self._cond:
            keys = self.kept if self.shares_memory else self.table.keys()
            return {k for k in keys if k not in self.reading}

    def held_bytes(self) -> int:
        return len(self.held()) * self.stride

    def arena_bytes(self) -> int:
        return self.arena.numel() if self.arena is not None else 0

    @property
    def pinned(self) -> bool:
        return self.dev is not None and self.arena is not None and self.dev.is_pinned(self.arena)

    def describe(self) -> dict:
        """This level now: bytes held, its budget (bytes and records), its arena, whether it is
        exclusive with the device level, whether its arena is pinned."""
        with self._cond:
            return {"held_bytes": self.held_bytes(), "budget_bytes": self.slots * self.stride, "slots": self.slots,
                    "arena_bytes": self.arena_bytes(), "exclusive": self.exclusive, "pinned": self.pinned}

    def _wait_copied(self, slot: int) -> None:
        """Before the host writes into `slot`: every device copy into or out of it has run."""
        event = self.arena_events[slot]
        if event is not None:  # the slot's previous record may still be on its way to or from the device
            event.synchronize()
            self.arena_events[slot] = None

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, stream=None) -> Event | None:
        """dst <- src on `stream` (default: the current one) after the device is done with the arena
        slots they name (`arena_events`); returns the event after it (None on a CPU: a plain copy)."""
        if self.dev is None:
            dst.copy_(src)
            return None
        stream = stream if stream is not None else self.dev.current_stream()
        with self.dev.stream(stream):
            self.dev.copy(dst, src, non_blocking=True)
            event = self.dev.new_event()
            event.record(stream)
        return event

    def _begin(self) -> None:
        with self._cond:
            self.active += 1

    def _end(self) -> None:
        with self._cond:
            self.active -= 1
            self._cond.notify_all()

    # --- the slow-tier interface ----------------------------------------------------------------
    def level_of(self, layer: int, expert: int) -> str:
        """ "host" for a record in the arena, else the inner tier's level (a read in flight is still disk)."""
        key = (layer, expert)
        with self._cond:
            held = key in self.table and key not in self.reading
        return "host" if held else self.inner.level_of(layer, expert)

    def copy_to(self, layer: int, expert: int, dst: torch.Tensor) -> None:
        """Fill `dst` with the record: from the arena (a host hit) or from disk (a disk read, kept
        in the arena when a slot is free or evictable)."""
        self._begin()
        try:
            self._copy_to((layer, expert), dst)
        finally:
            self._end()

    def _copy_to(self, key: tuple[int, int], dst: torch.Tensor) -> None:
        layer, expert = key
        with self._cond:
            while key in self.reading:  # the I/O thread is reading it: wait rather than read it twice
                self._cond.wait()
            slot = self.table.slot_of.get(key)
            hit = slot is not None
            if hit:
                self.table.pins[slot] += 1
                self.policy.access(key)
            else:  # exclusive: a disk read passes through a free slot only, evicting nothing
                slot = self.table.free_slot() if self.exclusive else self.table.free_or_victim()[0]
                if slot is not None:
                    self.table.map(slot, key)
                    self.table.pins[slot] += 1
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
            self._wait_device(slot)  # a write-back into the slot has landed
            self.arena_events[slot] = self._copy(dst, self.arena[slot, : dst.numel()])
            ok = True
        finally:
            with self._cond:
                self.table.pins[slot] -= 1
                done = self.reading.pop(key, None)
                if not ok or self.exclusive:  # failed: nothing half-read stays; exclusive: now on the device
                    if self.table.owner[slot] == key:
                        self.table.unmap(slot)
                if done is not None:
                    done.set()
                self._cond.notify_all()

    # --- shared memory: the device computes from the arena (CPU) ----------------------------------
    def attach(self, layer: int, expert: int) -> torch.Tensor:
        """The record of (layer, expert) where it lies in the arena, pinned until `detach`: a host hit
        (no copy), or a disk read into a free slot, kept by the host level as its policy says."""
        key = (layer, expert)
        self._begin()
        try:
            with self._cond:
                while key in self.reading:
                    self._cond.wait()
                slot = self.table.slot_of.get(key)
                if slot is not None:  # a host hit: compute from it in place
                    self.table.pins[slot] += 1
                    self.attached.add(key)
                    if key in self.kept:
                        self.policy.access(key)
                    self.stats.record_host_hit(layer)
                    return self.arena[slot]
                self._keep(key)
                slot = self.table.free_slot()
                if slot is None:  # cannot happen while the device level uses at most its L*C slots
                    self._forget(key)
                    raise RuntimeError(f"host arena: no free slot for layer {layer} expert {expert} "
                                       f"({len(self.attached)} records attached, {len(self.kept)} kept)")
                self.table.map(slot, key)
                self.table.pins[slot] += 1
                self.reading[key] = threading.Event()
            ok = False
            try:
                self.inner.copy_to(layer, expert, self.arena[slot])  # O_DIRECT into the arena
                self.stats.record_disk_read(layer, self.nbytes)
                ok = True
            finally:
                with self._cond:
                    self.reading.pop(key).set()
                    if ok:
                        self.attached.add(key)
                    else:
                        self.table.pins[slot] -= 1
                        self._forget(key)
                    self._cond.notify_all()
            return self.arena[slot]
        finally:
            self._end()

    def detach(self, layer: int, expert: int) -> None:
        """The device level no longer uses (layer, expert): its slot is freed unless the host keeps it."""
        key = (layer, expert)
        with self._cond:
            if key not in self.attached:
                return
            self.attached.discard(key)
            slot = self.table.slot_of[key]
            self.table.pins[slot] -= 1
            if key not in self.kept and self.table.pins[slot] == 0:
                self.table.unmap(slot)
            self._cond.notify_all()

    def _keep(self, key, protect=frozenset()) -> bool:
        """Shared: the host level keeps `key` (its policy evicts a record when full; an evicted record
        the device still uses stays until detached). False when it cannot (no budget, all busy)."""
        if self.capacity == 0:
            return False
        if len(self.kept) >= self.capacity:
            candidates = [k for k in self.kept if k not in self.reading and k not in protect]
            if not candidates:
                return False
            victim = self.policy.victim(candidates)
            self._forget(victim)
        self.kept.add(key)
        self.policy.insert(key)
        return True

    def _forget(self, key) -> None:
        """Shared: the host level lets go of `key`; its slot is freed once nobody pins it."""
        if key in self.kept:
            self.kept.discard(key)
            self.policy.evict(key)
        slot = self.table.slot_of.get(key)
        if slot is not None and self.table.pins[slot] == 0 and key not in self.attached:
            self.table.unmap(slot)

    # --- exclusive levels: write-back ---------------------------------------------------------------
    def exchange(self, layer: int, expert: int, evicted: int, dst: torch.Tensor) -> None:
        """Exclusive levels: load (layer, expert) into the device slot `dst`, whose expert `evicted`
        goes back to the arena (a device -> host copy) instead of being dropped.

        In the same order as sim/hierarchy.py: a free slot, if any, is reserved for the evicted record
        during the load; the load (a host hit frees its arena slot); then, without a reserved slot, the
        evicted record takes a free slot or the policy's victim (none: every slot is busy, and it comes
        from disk next time). Its bytes leave `dst` before the load overwrites it: with a Device,
        device -> device into a spare on the load stream (the current one), and the spare's device ->
        host copy into the arena runs on the write-back stream, so the load does not wait for it; on a
        CPU, into a host buffer at once."""
        if not self.exclusive or not self.slots:
            self.copy_to(layer, expert, dst)
            return
        back = (layer, evicted)
        n = dst.numel()
        with self._cond:
            self.active += 1
            slot = self.table.free_slot()  # reserved (pinned: the load's disk read passes elsewhere)
            if slot is not None:
                self.table.pins[slot] += 1
        spare = spare_free = None
        try:
            if self.dev is None:  # into the reserved slot at once, or a host copy until a slot is found
                saved = self.arena[slot, :n].copy_(dst) if slot is not None else dst.clone()
            else:
                spare, spare_free = self.spares.take()
                if spare_free is not None:  # its previous device -> host copy has read it
                    self.dev.current_stream().wait_event(spare_free)
                saved = spare[:n]
                spare_free = spared = self._copy(saved, dst)  # fast; the load below queues after it
            self._copy_to((layer, expert), dst)
            with self._cond:
                if back in self.table:  # cannot happen while levels are exclusive; keep one copy
                    return
                if slot is None:
                    slot = self.table.free_or_victim()[0]
                    if slot is None:
                        return  # every slot busy: it comes from disk next time
                    self.table.pins[slot] += 1
            if self.dev is None:
                if saved.data_ptr() != self.arena[slot].data_ptr():
                    self.arena[slot, :n].copy_(saved)
            else:
                self.wb_stream.wait_event(spared)  # the spare holds the evicted record
                if self.arena_events[slot] is not None:  # the slot's previous record has left
                    self.wb_stream.wait_event(self.arena_events[slot])
                landed = self._copy(self.arena[slot, :n], saved, self.wb_stream)
                self.arena_events[slot] = spare_free = landed  # a load of it waits for this
            with self._cond:
                self.table.map(slot, back)
            self.stats.record_write_back(layer, n)
        finally:
            if spare is not None:
                self.spares.give(spare, spare_free)
            with self._cond:
                if slot is not None:
                    self.table.pins[slot] -= 1
                self.active -= 1
                self._cond.notify_all()

    def _wait_device(self, slot: int) -> None:
        """The current stream's next copy out of `slot` runs after the device's last copy into it."""
        event = self.arena_events[slot]
        if event is not None and self.dev is not None:
            self.dev.current_stream().wait_event(event)

    # --- disk -> host prefetch --------------------------------------------------------------------
    def prefetch(self, keys: list[tuple[int, int]], on_device: Callable[[tuple[int, int]], bool]) -> None:
        """Read these records into the arena on the I/O thread, in order, when the tier is idle.
        A newer call replaces the guesses not started yet. `on_device(key)`: whether the device level
        holds the record now (exclusive levels then skip it)."""
        self._io.submit(keys, on_device)

    def _prefetch_one(self, key: tuple[int, int], protect: set, on_device: Callable[[tuple[int, int]], bool]) -> bool:
        with self._cond:
            while self.active:  # demand and host -> device loads first
                self._cond.wait()
            if key in self.table or key in self.reading:
                return True
            if self.shares_memory:
                if not self._keep(key, protect):
                    return False
                slot = self.table.free_slot()
                if slot is None:
                    self._forget(key)
                    return False
            else:
                slot = self.table.free_slot()
                if slot is None:
                    victim = self.table.victim(protect)
                    if victim is None:
                        return False
                    slot = self.table.slot_of[victim]
                    self.table.unmap(slot)
            if self.exclusive and on_device(key):
                return True  # on the device already: a copy here would hold it twice
            self.table.map(slot, key)
            self.table.pins[slot] += 1
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
                self.table.pins[slot] -= 1
                if not ok and self.table.owner[slot] == key:
                    if self.shares_memory:
                        self._forget(key)
                    else:
                        self.table.unmap(slot)
                self.reading.pop(key).set()
                self._cond.notify_all()
        return True

    def drain(self) -> None:
        """Wait until the I/O thread is idle (tests and benchmarks)."""
        self._io.drain()

    def close(self) -> None:
        """Stop the I/O thread; release the arena (unpinned), the spares and the inner tier's buffers."""
        self._io.close()
        if self.dev is not None and self.arena is not None:
            self.dev.synchronize()  # no copy into or out of the arena or a spare is still queued
            if self.spares is not None:
                self.spares.close()
            if self.arena.numel():
                self.dev.unpin(self.arena.view(-1))
            self.arena = None
        self.inner.close()


class _IoThread:
    """The host cache's own I/O thread: works through the newest list of disk -> host guesses."""

    def __init__(self, cache: HostCache) -> None:
        self.cache = cache
        self.pending: list[tuple[int, int]] = []
        self.on_device: Callable[[tuple[int, int]], bool] = lambda key: False  # the newest submit's
        self.busy = False
        self.closed = False
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None

    def submit(self, keys: list[tuple[int, int]], on_device: Callable[[tuple[int, int]], bool]) -> None:
        with self.cond:
            if self.closed:
                return
            self.pending, self.on_device = list(keys), on_device
            if self.thread is None:
                dev = self.cache.dev
                self.thread = (threading.Thread(target=self._run, name=IO_THREAD, daemon=True) if dev is None
                               else device_thread(dev, self._run, name=IO_THREAD))  # binds itself to dev
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
                on_device = self.on_device
                self.busy = True
            try:
                if not self.cache._prefetch_one(key, protect, on_device):
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
