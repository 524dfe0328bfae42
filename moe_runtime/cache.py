"""The fast tier: per MoE layer, `cache_size` expert slots on the compute device.

On CUDA the slots are a pool preallocated once on the GPU (no allocation per token) and a load copies
a record into one. On a CPU the device is the host RAM the slow tier already holds the records in
(`SlowTier.shares_memory`): a slot is then a pinned view of the record where it lies (the host arena,
or the RAM tier), and a load is `tier.attach` (a disk read into the arena on a host miss, nothing on
a hit); no second copy exists. Which expert sits in which slot is decided
here under one lock per layer; *which* expert to evict is the policy's call (policies.py). An
expert is pinned while it is being loaded or computed with, so neither a prefetch nor another load
can overwrite it. Loads go through `Transfer`: demand loads run in the caller's thread, prefetch
loads on a background worker (bound to the engine's device); on CUDA both copy on a side stream and
hand back an event, so the compute stream waits on the GPU, not the host. Every stream, event, copy
and device buffer goes through the engine's `device.Device` (CudaDevice on CUDA; an EmulatedDevice
runs the same path on CPU tensors with CUDA's ordering rules, for tests); on a CPU there is none.

Failures poison nothing: a load that raises leaves its slot unmapped and every pin it took
released, and whoever waits on it is woken. A demand load that fails raises `ExpertLoadError`
(layer, expert, cause) and the next use of that expert loads it again; a use that finds a failed
prefetch loads the expert itself. Waiting for a slot or for another thread's load is bounded
(`wait_timeout_s`), so a wedged tier ends in an error, not a hang.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from .device import Device, Event, device_executor, device_guard
from .policies import EvictionPolicy
from .slots import SlotTable
from .stats import StatsCollector
from .store import SlowTier

PREFETCH_THREAD = "expert-prefetch"  # name (prefix) of a layer cache's prefetch worker thread
WAIT_TIMEOUT_S = 120.0  # a slot or another thread's load; far above any sane single expert load


class ExpertLoadError(RuntimeError):
    """A load of one expert failed (the slow tier raised) or could not start (no slot in time)."""

    def __init__(self, layer: int, expert: int, why: str) -> None:
        super().__init__(f"layer {layer}, expert {expert}: {why}")
        self.layer, self.expert = layer, expert


class LoadTicket:
    """Completion of one load: a host-side flag (the copy was issued, or failed), plus the device's
    event after the copy when it is asynchronous (`dev`)."""

    def __init__(self, dev: Device | None = None) -> None:
        self.dev = dev
        self.done = threading.Event()
        self.event: Event | None = None
        self.error: BaseException | None = None
        self.view: torch.Tensor | None = None  # shared memory: the record where it lies (tier.attach)

    def wait(self, timeout: float | None = None) -> None:
        """Returns once the load landed; raises the load's own exception if it failed, and
        TimeoutError if it has not ended within `timeout` seconds."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"the load did not end within {timeout:g} s")
        if self.error is not None:
            raise self.error
        if self.event is not None:  # the compute stream waits for the copy on the device, not the host
            self.dev.current_stream().wait_event(self.event)


class Transfer:
    """Moves expert records from the slow tier into device slots. `dev`: the Device the copies go
    through (a side stream, an event per load, the prefetch worker bound to it); None on a CPU."""

    def __init__(self, tier: SlowTier, device: torch.device, stats: StatsCollector | None = None,
                 dev: Device | None = None) -> None:
        if tier.shares_memory and (device.type != "cpu" or dev is not None):
            raise ValueError(f"a slow tier that shares its memory with the device needs a CPU device without "
                             f"device operations, not {device}" + (f" with {type(dev).__name__}" if dev else ""))
        if device.type == "cuda" and dev is None:
            raise ValueError(f"{device} needs a Device for its copies (moe_runtime.device.CudaDevice)")
        self.tier = tier
        self.device = device
        self.dev = dev
        self.stats = stats  # gets a "demand"/"prefetch" span of the timeline per load
        self.stream = None
        if dev is not None:
            with device_guard(dev):
                self.stream = dev.new_stream()
            self.worker = device_executor(dev, 1, PREFETCH_THREAD)  # its thread binds itself to dev
        else:
            self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=PREFETCH_THREAD)

    def _copy(self, layer: int, expert: int, dst: torch.Tensor | None, write_back: int | None,
              ticket: LoadTicket) -> None:
        """Shared memory: the slot becomes a view of the record (no copy). Otherwise one copy of the
        record into `dst`; a tier that takes evicted experts back (`exchanges`: host_cache.py, exclusive
        levels) gets the slot's previous expert `write_back` with the load that overwrites it."""
        if self.tier.shares_memory:
            ticket.view = self.tier.attach(layer, expert)
            return
        if write_back is not None and self.tier.exchanges:
            self.tier.exchange(layer, expert, write_back, dst)
        else:
            self.tier.copy_to(layer, expert, dst)
        if self.stats is not None:
            self.stats.record_level_copy(layer, self.tier.nbytes)

    def _run(self, layer: int, expert: int, dst: torch.Tensor | None, ticket: LoadTicket,
             wait_for: Event | None, on_done: Callable[[], None] | None,
             write_back: int | None = None, kind: str = "demand") -> None:
        start, level = time.perf_counter(), ""
        try:
            if self.stats is not None:
                level = self.tier.level_of(layer, expert)  # asked before the copy moves the expert
            # inference mode: a slot view taken under inference_mode (the bench's prefetches) is an
            # inference tensor, which this worker thread, outside that thread-local mode, may not update
            if self.dev is not None:
                with torch.inference_mode(), self.dev.stream(self.stream):
                    if wait_for is not None:
                        self.stream.wait_event(wait_for)  # the slot's previous expert is done with
                    self._copy(layer, expert, dst, write_back, ticket)
                    event = self.dev.new_event()
                    event.record(self.stream)
                    ticket.event = event
            else:
                with torch.inference_mode():
                    self._copy(layer, expert, dst, write_back, ticket)
        except BaseException as err:  # surfaced to whoever waits on the ticket
            ticket.error = err
        finally:
            if self.stats is not None:
                self.stats.record_span(kind, layer, expert, start, time.perf_counter(), level)
            try:
                if on_done is not None:  # bookkeeping first: whoever waits on the ticket sees it settled
                    on_done()
            finally:
                ticket.done.set()

    def load_now(self, layer, expert, dst, ticket, wait_for=None, write_back=None) -> None:
        self._run(layer, expert, dst, ticket, wait_for, None, write_back)

    def load_async(self, layer, expert, dst, ticket, wait_for=None, on_done=None, write_back=None) -> None:
        self.worker.submit(self._run, layer, expert, dst, ticket, wait_for, on_done, write_back, "prefetch")

    def close(self) -> None:
        self.worker.shutdown(wait=True)
        if self.dev is not None:
            self.dev.synchronize()  # every copy queued by a load has run: its buffers may be released


class ExpertCache:
    """The resident experts of one MoE layer. `slots`: uint8 [C, stride] on the compute device, or None
    where the tier shares its memory with the device (then `cache_size` slots are views of records)."""

    def __init__(self, layer: int, slots: torch.Tensor | None, record_nbytes: int, policy: EvictionPolicy,
                 transfer: Transfer, stats: StatsCollector, cache_size: int | None = None) -> None:
        self.layer = layer
        self.shared = slots is None
        if self.shared:  # slots are views of records where the tier holds them
            transfer.tier.require("shares_memory", "a layer cache without device slots")
        elif transfer.tier.shares_memory:
            raise ValueError("the slow tier shares its memory with the device: a layer cache takes no device slots")
        self.slots = slots  # slot s holds one expert's record (None: shared memory, a view per slot)
        self.record_nbytes = record_nbytes  # bytes brought to the device level per load
        self.policy = policy
        self.transfer = transfer
        self.stats = stats
        size = slots.shape[0] if slots is not None else cache_size
        if not isinstance(size, int) or size < 1 or cache_size not in (None, size):
            raise ValueError(f"cache_size={cache_size!r} is not allowed: a layer cache needs cache_size >= 1, "
                             f"equal to the slots given ({None if slots is None else slots.shape[0]})")
        self.table = SlotTable(size, policy)  # expert -> slot, slot -> expert, pins (a load, a layer computing)
        self.tickets: list[LoadTicket | None] = [None] * size  # [C] the slot's latest load
        # [C] with a Device: recorded on the compute stream when the slot was last released; a new load
        # into the slot waits on it so it never overwrites an expert a queued kernel still reads
        self.slot_free_events: list[Event | None] = [None] * size
        self.prefetched: set[int] = set()  # experts loaded by prefetch and not used yet
        self.evicted: dict[int, int] = {}  # slot -> the expert just evicted from it (for a write-back)
        self.wait_timeout_s = WAIT_TIMEOUT_S
        self._cond = threading.Condition()

    @property
    def slot_of(self) -> dict:
        return self.table.slot_of

    @property
    def pins(self) -> list[int]:
        return self.table.pins

    @property
    def cache_size(self) -> int:
        return len(self.table)

    def resident(self) -> set[int]:
        with self._cond:
            return self.table.keys()

    def describe(self) -> dict:
        """This layer's device level now: records held and its slots (cache_size)."""
        with self._cond:
            return {"held": len(self.table.keys()), "slots": self.cache_size}

    def states(self) -> dict[int, str]:
        """expert -> "device" (in a slot, ready) or "loading (demand)" / "loading (prefetch)", for the
        experts of this layer that have a slot (the others are only in the slow tier)."""
        with self._cond:
            return {e: "device" if (t := self.tickets[s]) is None or t.done.is_set()
                    else "loading (prefetch)" if e in self.prefetched else "loading (demand)"
                    for e, s in self.table.slot_of.items()}

    def _slot_bytes(self, slot: int) -> torch.Tensor:
        """What slot `slot` holds: its buffer, or (shared memory) the view its load attached."""
        return self.tickets[slot].view if self.shared else self.slots[slot]

    # --- slot bookkeeping (caller holds the lock) ---------------------------------------------
    def _free_or_victim(self, protect: set[int] = frozenset()) -> int | None:
        slot, victim = self.table.free_or_victim(protect)
        if victim is not None:
            self._left(victim)
            self.evicted[slot] = victim
        return slot

    def _unmap(self, slot: int) -> None:
        expert = self.table.unmap(slot)
        if expert is not None:
            self._left(expert)

    def _left(self, expert: int) -> None:
        """`expert` left the device level: a shared-memory slot lets go of the record it viewed."""
        self.prefetched.discard(expert)
        if self.shared:
            self.transfer.tier.detach(self.layer, expert)

    def _assign(self, slot: int, expert: int) -> LoadTicket:
        self.table.map(slot, expert)
        self.table.pins[slot] += 1
        ticket = LoadTicket(self.transfer.dev)
        self.tickets[slot] = ticket
        return ticket

    def _wait_for_slot(self, expert: int, deadline: float) -> int:
        slot = self._free_or_victim()
        while slot is None:  # every slot is pinned by an in-flight load or a computing caller
            left = deadline - time.perf_counter()
            if left <= 0:
                raise ExpertLoadError(
                    self.layer, expert, f"no slot became free within {self.wait_timeout_s:g} s: all "
                    f"{self.cache_size} slots of the layer stay pinned (pins {self.table.pins})")
            self._cond.wait(left)
            slot = self._free_or_victim()
        return slot

    def _settle(self, slot: int, ticket: LoadTicket | None) -> None:
        """Drop one pin of `slot`; if `ticket`'s load failed, unmap the expert it was loading."""
        with self._cond:
            self.table.pins[slot] -= 1
            if ticket is not None and ticket.error is not None and self.tickets[slot] is ticket:
                self._unmap(slot)
            self._cond.notify_all()

    # --- demand path --------------------------------------------------------------------------
    def acquire(self, expert: int) -> torch.Tensor:
        """Pin `expert` in a slot, loading it if needed; returns the slot's bytes once ready.

        Raises `ExpertLoadError` when the load fails (nothing stays pinned or mapped: the next
        call loads it again) or when no slot frees up within `wait_timeout_s`."""
        start = time.perf_counter()
        deadline = start + self.wait_timeout_s
        hit = False
        try:
            for attempt in range(2):
                with self._cond:
                    slot = self.table.slot_of.get(expert)
                    hit = slot is not None
                    if hit:
                        self.table.pins[slot] += 1
                        ticket = self.tickets[slot]
                    else:
                        slot = self._wait_for_slot(expert, deadline)
                        ticket = self._assign(slot, expert)
                    self.policy.access(expert)
                    wait_for = self.slot_free_events[slot]
                    write_back = self.evicted.pop(slot, None)
                if not hit:
                    self.stats.record_load(self.layer, self.record_nbytes, prefetch=False)
                    self.transfer.load_now(self.layer, expert, self._dst(slot), ticket, wait_for, write_back)
                try:
                    ticket.wait(max(deadline - time.perf_counter(), 0.0))
                    break
                except TimeoutError as err:  # another thread's load is wedged: it keeps its own pin
                    self._settle(slot, None)
                    raise ExpertLoadError(self.layer, expert, f"waiting for its load: {err}") from None
                except BaseException as err:
                    self._settle(slot, ticket)
                    if hit and attempt == 0:  # a prefetch of it failed: load it here, once
                        hit = False
                        continue
                    raise ExpertLoadError(self.layer, expert,
                                          f"loading it from the slow tier failed: {type(err).__name__}: {err}"
                                          ) from err
            with self._cond:
                if hit and expert in self.prefetched:
                    self.prefetched.discard(expert)
                    self.stats.record_prefetch_used(self.layer)
        finally:
            self.stats.record_access(self.layer, hit, expert)  # once per use, whatever happened
        stalled = time.perf_counter() - start
        if not hit or stalled > 1e-4:
            self.stats.record_stall(self.layer, stalled, expert)
        return self._slot_bytes(slot)

    def _dst(self, slot: int) -> torch.Tensor | None:
        """Where a load into `slot` copies to (None: shared memory, the load attaches a view)."""
        return None if self.shared else self.slots[slot]

    def release(self, expert: int) -> None:
        with self._cond:
            slot = self.table.slot_of[expert]
            self.table.pins[slot] -= 1
            dev = self.transfer.dev
            if dev is not None and not self.shared:
                event = dev.new_event()
                event.record(dev.current_stream())
                self.slot_free_events[slot] = event
            self._cond.notify_all()

    # --- speculative path ---------------------------------------------------------------------
    def prefetch(self, experts: list[int]) -> int:
        """Start loading the guessed experts that are not resident; never waits for a slot, and
        never evicts another expert of the same guess. A failed prefetch unmaps itself (the
        demand path then loads the expert)."""
        issued = 0
        guessed = set(experts)
        for expert in experts:
            with self._cond:
                if expert in self.table:
                    continue
                slot = self._free_or_victim(protect=guessed)
                if slot is None:
                    break
                ticket = self._assign(slot, expert)
                self.prefetched.add(expert)
                wait_for = self.slot_free_events[slot]
                write_back = self.evicted.pop(slot, None)
            self.stats.record_load(self.layer, self.record_nbytes, prefetch=True)
            self.transfer.load_async(self.layer, expert, self._dst(slot), ticket, wait_for,
                                     on_done=lambda s=slot, t=ticket: self._settle(s, t), write_back=write_back)
            issued += 1
        return issued

    def clear(self) -> None:
        """Evict every expert that is not pinned (a cold cache, e.g. for a no-cache benchmark),
        after the loads in flight have landed."""
        self.drain()
        with self._cond:
            for slot in list(self.table.slot_of.values()):
                if self.table.pins[slot] == 0:
                    self._unmap(slot)
            self._cond.notify_all()

    def drain(self) -> None:
        """Wait for every in-flight load of this layer (tests and shutdown)."""
        for ticket in list(self.tickets):
            if ticket is not None:
                ticket.done.wait()
