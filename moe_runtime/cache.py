"""The fast tier: per MoE layer, a fixed pool of `cache_size` expert slots on the compute device.

Slots are preallocated once (no allocation per token). Which expert sits in which slot is decided
here under one lock per layer; *which* expert to evict is the policy's call (policies.py). An
expert is pinned while it is being loaded or computed with, so neither a prefetch nor another load
can overwrite it. Loads go through `Transfer`: demand loads run in the caller's thread, prefetch
loads on a background worker; on CUDA both copy on a side stream and hand back an event, so the
compute stream waits on the GPU, not the host.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from .policies import EvictionPolicy
from .stats import StatsCollector


class LoadTicket:
    """Completion of one load: a host-side flag, plus a CUDA event when the copy is asynchronous."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.done = threading.Event()
        self.cuda_event: torch.cuda.Event | None = None
        self.error: BaseException | None = None

    def wait(self) -> None:
        self.done.wait()
        if self.error is not None:
            raise RuntimeError(f"loading an expert failed: {self.error}") from self.error
        if self.cuda_event is not None:
            torch.cuda.current_stream(self.device).wait_event(self.cuda_event)


class Transfer:
    """Moves expert records from the slow tier into device slots."""

    def __init__(self, tier, device: torch.device) -> None:
        self.tier = tier
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expert-prefetch")

    def _run(self, layer: int, expert: int, dst: torch.Tensor, ticket: LoadTicket,
             wait_for: torch.cuda.Event | None, on_done: Callable[[], None] | None) -> None:
        try:
            if self.stream is not None:
                with torch.cuda.stream(self.stream):
                    if wait_for is not None:
                        self.stream.wait_event(wait_for)  # the slot's previous expert is done with
                    self.tier.copy_to(layer, expert, dst)
                    event = torch.cuda.Event()
                    event.record(self.stream)
                    ticket.cuda_event = event
            else:
                self.tier.copy_to(layer, expert, dst)
        except BaseException as err:  # surfaced to whoever waits on the ticket
            ticket.error = err
        finally:
            if on_done is not None:  # bookkeeping first: whoever waits on the ticket sees it settled
                on_done()
            ticket.done.set()

    def load_now(self, layer, expert, dst, ticket, wait_for=None) -> None:
        self._run(layer, expert, dst, ticket, wait_for, None)

    def load_async(self, layer, expert, dst, ticket, wait_for=None, on_done=None) -> None:
        self.worker.submit(self._run, layer, expert, dst, ticket, wait_for, on_done)

    def close(self) -> None:
        self.worker.shutdown(wait=True)


class ExpertCache:
    """The resident experts of one MoE layer."""

    def __init__(self, layer: int, slots: torch.Tensor, record_nbytes: int, policy: EvictionPolicy,
                 transfer: Transfer, stats: StatsCollector) -> None:
        self.layer = layer
        self.slots = slots  # uint8 [C, stride] on the compute device: slot s holds one expert's record
        self.record_nbytes = record_nbytes  # bytes moved per load
        self.policy = policy
        self.transfer = transfer
        self.stats = stats
        size = slots.shape[0]
        self.slot_of: dict[int, int] = {}  # expert -> its slot
        self.owner: list[int | None] = [None] * size  # [C] slot -> expert in it (None: free)
        self.pins = [0] * size  # [C] users of the slot: a load in flight, or a layer computing with it
        self.tickets: list[LoadTicket | None] = [None] * size  # [C] the slot's latest load
        # [C] CUDA: recorded on the compute stream when the slot was last released; a new load into the
        # slot waits on it so it never overwrites an expert a queued kernel still reads
        self.slot_free_events: list[torch.cuda.Event | None] = [None] * size
        self.prefetched: set[int] = set()  # experts loaded by prefetch and not used yet
        self._cond = threading.Condition()

    @property
    def cache_size(self) -> int:
        return len(self.owner)

    def resident(self) -> set[int]:
        with self._cond:
            return set(self.slot_of)

    # --- slot bookkeeping (caller holds the lock) ---------------------------------------------
    def _free_or_victim(self, protect: set[int] = frozenset()) -> int | None:
        for slot, owner in enumerate(self.owner):
            if owner is None:
                return slot
        evictable = [e for e, s in self.slot_of.items() if self.pins[s] == 0 and e not in protect]
        if not evictable:
            return None
        victim = self.policy.victim(evictable)
        slot = self.slot_of.pop(victim)
        self.owner[slot] = None
        self.policy.evict(victim)
        self.prefetched.discard(victim)
        return slot

    def _assign(self, slot: int, expert: int) -> LoadTicket:
        self.owner[slot] = expert
        self.slot_of[expert] = slot
        self.pins[slot] += 1
        ticket = LoadTicket(self.slots.device)
        self.tickets[slot] = ticket
        self.policy.insert(expert)
        return ticket

    # --- demand path --------------------------------------------------------------------------
    def acquire(self, expert: int) -> torch.Tensor:
        """Pin `expert` in a slot, loading it if needed; returns the slot's bytes once ready."""
        start = time.perf_counter()
        with self._cond:
            slot = self.slot_of.get(expert)
            hit = slot is not None
            if hit:
                self.pins[slot] += 1
                ticket = self.tickets[slot]
                if expert in self.prefetched:
                    self.prefetched.discard(expert)
                    self.stats.record_prefetch_used(self.layer)
            else:
                slot = self._free_or_victim()
                while slot is None:  # every slot is pinned by an in-flight load: wait for one
                    self._cond.wait()
                    slot = self._free_or_victim()
                ticket = self._assign(slot, expert)
            self.policy.access(expert)
            wait_for = self.slot_free_events[slot]
        self.stats.record_access(self.layer, hit)
        if not hit:
            self.stats.record_load(self.layer, self.record_nbytes, prefetch=False)
            self.transfer.load_now(self.layer, expert, self.slots[slot], ticket, wait_for)
        ticket.wait()
        stalled = time.perf_counter() - start
        if not hit or stalled > 1e-4:
            self.stats.record_stall(self.layer, stalled)
        return self.slots[slot]

    def release(self, expert: int) -> None:
        with self._cond:
            slot = self.slot_of[expert]
            self.pins[slot] -= 1
            if self.slots.device.type == "cuda":
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(self.slots.device))
                self.slot_free_events[slot] = event
            self._cond.notify_all()

    # --- speculative path ---------------------------------------------------------------------
    def prefetch(self, experts: list[int]) -> int:
        """Start loading the guessed experts that are not resident; never waits for a slot, and
        never evicts another expert of the same guess."""
        issued = 0
        guessed = set(experts)
        for expert in experts:
            with self._cond:
                if expert in self.slot_of:
                    continue
                slot = self._free_or_victim(protect=guessed)
                if slot is None:
                    break
                ticket = self._assign(slot, expert)
                self.prefetched.add(expert)
                wait_for = self.slot_free_events[slot]
            self.stats.record_load(self.layer, self.record_nbytes, prefetch=True)
            self.transfer.load_async(self.layer, expert, self.slots[slot], ticket, wait_for,
                                     on_done=lambda s=slot: self._unpin(s))
            issued += 1
        return issued

    def _unpin(self, slot: int) -> None:
        with self._cond:
            self.pins[slot] -= 1
            self._cond.notify_all()

    def clear(self) -> None:
        """Evict every expert that is not pinned (a cold cache, e.g. for a no-cache benchmark),
        after the loads in flight have landed."""
        self.drain()
        with self._cond:
            for expert, slot in list(self.slot_of.items()):
                if self.pins[slot] == 0:
                    del self.slot_of[expert]
                    self.owner[slot] = None
                    self.policy.evict(expert)
                    self.prefetched.discard(expert)
            self._cond.notify_all()

    def drain(self) -> None:
        """Wait for every in-flight load of this layer (tests and shutdown)."""
        for ticket in list(self.tickets):
            if ticket is not None:
                ticket.done.wait()
