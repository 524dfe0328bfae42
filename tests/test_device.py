"""moe_runtime/device.py on the CPU: the emulator's CUDA semantics (deferred copies, event ordering,
pinned bytes, the thread's current device), and that it catches an ordering bug.

Every test here has "emulated" in its name: `python -m pytest -k emulated` selects them.
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from moe_runtime.device import (
    PAGE,
    EmulatedDevice,
    WrongDeviceError,
    arena_pin_bytes,
    caching_allocator_pin_bytes,
    device_executor,
    device_guard,
    device_thread,
    make_device,
    pinned_size,
    slots_within,
)

SEEDS = range(8)


# --- the emulator's semantics ----------------------------------------------------------------------
def _load(dev, stream, slot, src):
    """A load as Transfer does it: the copy on the side stream, an event recorded after it."""
    with dev.stream(stream):
        dev.copy(slot, src, non_blocking=True)
        event = dev.new_event()
        event.record()
    return event


def test_emulated_copy_is_stale_until_its_event_is_waited_on():
    dev = EmulatedDevice(lateness=1.0)  # queued work runs only when something waits for it
    side = dev.new_stream()
    src = dev.pin(16)
    src.copy_(torch.arange(16, dtype=torch.uint8))
    slot = dev.empty(16).zero_()
    event = _load(dev, side, slot, src)
    assert not event.query() and torch.equal(slot, torch.zeros(16, dtype=torch.uint8))  # stale
    event.wait()  # the main (current) stream waits: the host's next op sees the copy
    assert event.query() and torch.equal(slot, torch.arange(16, dtype=torch.uint8))


@pytest.mark.parametrize("seed", SEEDS)
def test_emulated_waited_copy_is_always_new_whatever_the_seed(seed):
    dev = EmulatedDevice(seed=seed)
    side = dev.new_stream()
    src, slot = dev.pin(64), dev.empty(64).zero_()
    src.fill_(7)
    event = _load(dev, side, slot, src)
    for _ in range(5):  # unrelated device calls let queued work run, or not
        dev.new_event().record()
    dev.current_stream().wait_event(event)
    assert torch.equal(slot, torch.full((64,), 7, dtype=torch.uint8))


def test_emulated_pinned_source_is_read_when_the_copy_runs_pageable_when_issued():
    """CUDA reads a pinned source when the copy runs (rewriting it too early corrupts the copy) and
    stages a pageable one at once."""
    dev = EmulatedDevice(lateness=1.0)
    side = dev.new_stream()
    pinned, pageable = dev.pin(8), torch.ones(8, dtype=torch.uint8)
    pinned.fill_(1)
    to_pinned_slot, to_pageable_slot = dev.empty(8).zero_(), dev.empty(8).zero_()
    first = _load(dev, side, to_pinned_slot, pinned)
    second = _load(dev, side, to_pageable_slot, pageable)
    pinned.fill_(9)
    pageable.fill_(9)
    dev.synchronize()
    assert first.query() and second.query()
    assert to_pinned_slot.tolist() == [9] * 8 and to_pageable_slot.tolist() == [1] * 8


def test_emulated_copy_into_pageable_memory_returns_when_done():
    """A device -> pageable host copy is synchronous in CUDA, even when asked non-blocking."""
    dev = EmulatedDevice(lateness=1.0)
    side = dev.new_stream()
    slot = dev.empty(8).fill_(4)
    pageable, pinned = torch.zeros(8, dtype=torch.uint8), dev.pin(8).zero_()
    with dev.stream(side):
        dev.copy(pageable, slot, non_blocking=True)
        dev.copy(pinned, slot, non_blocking=True)
    assert pageable.tolist() == [4] * 8 and pinned.tolist() == [0] * 8  # the pinned one is still queued
    side.synchronize()
    assert pinned.tolist() == [4] * 8 and side.query()


def test_emulated_streams_run_in_any_order_unless_an_event_orders_them():
    def final(seed: int, ordered: bool) -> int:
        dev = EmulatedDevice(seed=seed, lateness=0.5)
        a, b = dev.new_stream(), dev.new_stream()
        ones, twos = dev.pin(4).fill_(1), dev.pin(4).fill_(2)
        slot = dev.empty(4).zero_()
        first = _load(dev, a, slot, ones)
        if ordered:
            b.wait_event(first)
        _load(dev, b, slot, twos)
        dev.synchronize()
        assert dev.pending() == 0
        return int(slot[0])

    assert {final(seed, ordered=False) for seed in range(32)} == {1, 2}  # either stream may run last
    assert {final(seed, ordered=True) for seed in range(32)} == {2}


def test_emulated_fifo_within_a_stream_and_rerecorded_event():
    dev = EmulatedDevice(seed=3, lateness=0.3)
    side = dev.new_stream()
    slot = dev.empty(1).zero_()
    event = dev.new_event()
    assert event.query()  # never recorded: complete, as in CUDA
    for value in range(1, 30):
        with dev.stream(side):
            dev.copy(slot, dev.pin(1).fill_(value))
            event.record()
    event.synchronize()
    assert int(slot) == 29  # the last copy queued on one stream is the last one run


# --- a two-stage pipeline: load on a side stream, compute on the main stream -----------------------
def _pipeline(dev: EmulatedDevice, chunks: list[torch.Tensor], skip: str | None) -> list[torch.Tensor]:
    """Chunks pass through one pinned staging buffer, then one of two device slots; each is computed
    with (x * 3 + 1) on the main stream while the next one loads. `skip` removes one wait:
    "load" (compute without waiting for its load) or "staging" (refill the staging buffer while the
    previous copy out of it may not have run)."""
    side = dev.new_stream()
    staging = dev.pin(chunks[0].numel())
    slots = [dev.empty(chunks[0].numel()), dev.empty(chunks[0].numel())]
    staged: list = [None]  # the event after the last copy out of `staging`
    loaded: list = [None, None]  # per slot: the event after its latest load
    freed: list = [None, None]  # per slot: the event after the compute that last read it

    def load(i: int) -> None:
        if skip != "staging" and staged[0] is not None:
            staged[0].synchronize()  # the host may not rewrite staging before the copy out of it ran
        staging.copy_(chunks[i])  # disk -> pinned staging (host work)
        slot = i % 2
        with dev.stream(side):
            if freed[slot] is not None:
                side.wait_event(freed[slot])  # the slot's previous chunk is computed
            dev.copy(slots[slot], staging, non_blocking=True)
            loaded[slot] = dev.new_event()
            loaded[slot].record()
        staged[0] = loaded[slot]

    out = []
    load(0)
    for i in range(len(chunks)):
        if i + 1 < len(chunks):
            load(i + 1)  # the next chunk loads while this one is computed
        slot = i % 2
        if skip != "load":
            dev.current_stream().wait_event(loaded[slot])
        out.append(slots[slot].to(torch.int32) * 3 + 1)  # compute on the main stream
        freed[slot] = dev.new_event()
        freed[slot].record()
    dev.synchronize()
    return out


def _chunks(n: int = 6, size: int = 32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 200, (size,), dtype=torch.uint8, generator=gen) for _ in range(n)]


@pytest.mark.parametrize("skip", [None, "load", "staging"])
def test_emulated_pipeline_is_right_with_every_wait_and_wrong_without_one(skip):
    chunks = _chunks()
    reference = [c.to(torch.int32) * 3 + 1 for c in chunks]
    right = []
    for seed in SEEDS:
        out = _pipeline(EmulatedDevice(seed=seed), chunks, skip)
        right.append(all(torch.equal(o, r) for o, r in zip(out, reference)))
    late = _pipeline(EmulatedDevice(lateness=1.0), chunks, skip)  # the latest order CUDA allows
    right_late = all(torch.equal(o, r) for o, r in zip(late, reference))
    if skip is None:
        assert all(right) and right_late  # every seed, and the latest order
    else:  # the emulator catches the missing wait: some order, and the latest one, give wrong results
        assert not all(right) and not right_late


# --- pinned memory of exactly the planned size (issue 17 item 2) -----------------------------------
MIXTRAL_2BIT_RECORD = 55_400_000  # bytes per 2-bit Mixtral expert record at group 32 (issue 17)


def test_emulated_arena_pins_exactly_the_plan_not_the_allocators_power_of_two():
    dev = EmulatedDevice()
    stride = pinned_size(MIXTRAL_2BIT_RECORD)  # a store's stride is a whole number of pages
    budget = int(7.2e9)  # e.g. what plan_host_memory allows on a 12.7 GB Colab after headroom
    plan = arena_pin_bytes(129, stride)
    assert 7.14e9 < plan <= budget
    arena = dev.pin(plan)  # untouched pages: no RAM is used by this test
    try:
        assert arena.numel() == plan and arena.data_ptr() % PAGE == 0
        assert dev.pinned_bytes() == plan <= budget
        assert caching_allocator_pin_bytes(plan) == 2**33 > budget  # 8.59 GB: what pin_memory=True would pin
    finally:
        dev.unpin(arena)
    assert dev.pinned_bytes() == 0 and dev.pinned_total == dev.unpinned_total == plan


def test_emulated_planner_helpers_round_to_pages_only():
    assert pinned_size(0) == 0 and pinned_size(1) == PAGE and pinned_size(PAGE) == PAGE
    assert arena_pin_bytes(3, 5 * PAGE) == 15 * PAGE
    assert arena_pin_bytes(3, 1000) == pinned_size(3000)
    assert slots_within(10 * PAGE, 3 * PAGE) == 3 and slots_within(0, PAGE) == 0
    assert slots_within(PAGE, 1000) == 4  # 4000 bytes pin one page; 5000 would pin two
    assert caching_allocator_pin_bytes(3 * PAGE) == 4 * PAGE and caching_allocator_pin_bytes(0) == 0
    with pytest.raises(ValueError, match="stride"):
        arena_pin_bytes(2, 0)
    with pytest.raises(ValueError, match="nbytes"):
        pinned_size(-1)


def test_emulated_unpin_waits_for_recorded_stream_work_and_refuses_unknown_buffers():
    dev = EmulatedDevice(lateness=1.0)
    side = dev.new_stream()
    src, slot = dev.pin(8).fill_(5), dev.empty(8).zero_()
    _load(dev, side, slot, src)
    dev.record_stream(src, side)
    dev.unpin(src)  # the copy out of it runs before its memory is released
    assert slot.tolist() == [5] * 8 and dev.pinned_bytes() == 0
    with pytest.raises(ValueError, match="not pinned by this device"):
        dev.unpin(torch.empty(8, dtype=torch.uint8))


# --- threads on the right device (issue 17 item 5) -------------------------------------------------
def test_emulated_worker_threads_use_device_1_through_the_guard():
    dev = EmulatedDevice(index=1, lateness=1.0)
    with device_guard(dev):
        side = dev.new_stream()
        src, slot = dev.pin(4).fill_(3), dev.empty(4).zero_()

    def work():
        assert dev.current_index() == 1
        event = _load(dev, side, slot, src)
        event.synchronize()
        return slot.tolist()

    with device_executor(dev, 1, "emulated-prefetch") as pool:
        assert pool.submit(work).result() == [3] * 4
    seen = []
    thread = device_thread(dev, lambda: seen.append(dev.current_index()), name="emulated-generate")
    thread.start()
    thread.join()
    assert seen == [1]


def test_emulated_thread_that_forgot_its_device_is_caught():
    dev = EmulatedDevice(index=1)
    with device_guard(dev):
        side = dev.new_stream()
    assert dev.current_index() == 0  # the guard restored this thread's device
    with ThreadPoolExecutor(1) as pool:  # a plain executor: its thread is on device 0
        future = pool.submit(lambda: _load(dev, side, dev.empty(4), torch.zeros(4, dtype=torch.uint8)))
        with pytest.raises(WrongDeviceError, match="current device is 0"):
            future.result()
    errors = []

    def unbound():
        try:
            dev.new_stream()
        except WrongDeviceError as err:
            errors.append(err)

    thread = threading.Thread(target=unbound)
    thread.start()
    thread.join()
    assert len(errors) == 1


@pytest.mark.parametrize("wait_event", [True, False])
def test_emulated_prefetch_worker_on_device_1_hands_back_an_event_the_compute_must_wait_on(wait_event):
    """Transfer's shape: a worker thread (bound through device_executor) loads on the side stream and
    sets a host flag once the copy is *issued*; the host flag alone does not mean the bytes landed."""
    dev = EmulatedDevice(index=1, lateness=1.0)
    chunks = _chunks(4, 16)
    with device_guard(dev):
        side = dev.new_stream()
        sources = [dev.pin(16).copy_(c) for c in chunks]
        slots = [dev.empty(16).zero_() for _ in chunks]
        with device_executor(dev, 1, "emulated-prefetch") as pool:
            futures = [pool.submit(_load, dev, side, slot, src) for slot, src in zip(slots, sources)]
            out = []
            for slot, future in zip(slots, futures):
                event = future.result()  # the host-side ticket: the copy was issued
                if wait_event:
                    dev.current_stream().wait_event(event)
                out.append(slot.clone())
        dev.synchronize()
    assert all(torch.equal(o, c) for o, c in zip(out, chunks)) == wait_event


def test_emulated_make_device_and_bad_arguments():
    dev = make_device(torch.device("cuda", 2), emulate=True)
    assert isinstance(dev, EmulatedDevice) and dev.index == 2
    with pytest.raises(ValueError, match="not a CUDA device"):
        make_device(torch.device("cpu"))
    with pytest.raises(ValueError, match="lateness"):
        EmulatedDevice(lateness=1.5)
    with pytest.raises(ValueError, match="shape"):
        EmulatedDevice().copy(torch.zeros(2), torch.zeros(3))
