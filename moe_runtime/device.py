"""Device-memory operations behind one small interface: real CUDA, and a CPU emulator of its semantics.

What the memory hierarchy does with a GPU (cache.py, host_cache.py, store, loading.py, engine.py):

    streams       a side copy stream (`Transfer`), `with stream:` around a load, the current stream
    events        recorded after a load / a slot's last use / a copy out of the host arena; waited on by
                  a stream (`wait_event`) or by the host (`synchronize`), asked (`query`)
    copies        `dst.copy_(src, non_blocking=True)` host -> device and device -> host (write-back)
    pinned memory the host arena, staging buffers and RAM records (today `pin_memory=True`, which the
                  caching host allocator rounds up to a power of two: issue 17 item 2)
    threads       the prefetch worker, the host cache's I/O thread, the generate thread: each must run
                  on the engine's device (`cuda:N`, N > 0)

`Device` (a Protocol) names these; `CudaDevice` is torch.cuda, `EmulatedDevice` runs on the CPU with the
semantics that make the real thing hard:

- the current stream of a thread is *eager* only for the main stream: work on it runs as the host issues
  it (CPU torch ops are the "kernels"), so a main-stream `wait_event` blocks the host until the event's
  work has run;
- work on a side stream is *deferred*: each stream is a FIFO queue, and queued work runs late, at a
  seeded random later device call, interleaved across streams in any order, unless something orders it
  (an event wait, `synchronize`, a blocking copy). A copy reads its source and writes its destination
  when it runs, so reading a slot before waiting on its load's event sees stale bytes;
- a non-blocking copy from memory that is not pinned is staged at once (CUDA does the same for pageable
  memory), from pinned memory it reads the source when it runs;
- pinned bytes are counted (`pinned_bytes`), and every call checks the calling thread's current device
  (a thread that never called `bind_thread` is on device 0, like CUDA): `WrongDeviceError`.

Not emulated (only a GPU shows it): kernels reading a slot while a side-stream copy overwrites it
(main-stream work is eager here, so an event recorded on it is complete at once), real timing and
overlap, the driver's registration limits, Triton compilation.
"""

from __future__ import annotations

import functools
import random
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Protocol

import torch

PAGE = 4096  # bytes; cudaHostRegister and O_DIRECT both work on whole pages
POISON = 0xA5  # what the emulator's fresh device memory holds


class WrongDeviceError(RuntimeError):
    """A thread touched a device while another device was its current one (it never bound itself)."""


# --- sizes: what is pinned for a plan ---------------------------------------------------------
def pinned_size(nbytes: int) -> int:
    """Bytes `Device.pin(nbytes)` pins: `nbytes` rounded up to a whole page, nothing more."""
    if nbytes < 0:
        raise ValueError(f"nbytes={nbytes} must be >= 0")
    return -(-nbytes // PAGE) * PAGE


def arena_pin_bytes(slots: int, stride: int) -> int:
    """Bytes to pin for a host arena of `slots` records of `stride` bytes (one block, no rounding
    beyond the last page: a store's stride is already a whole number of pages)."""
    if slots < 0 or stride <= 0:
        raise ValueError(f"slots={slots}, stride={stride}: need slots >= 0 and stride > 0")
    return pinned_size(slots * stride)


def slots_within(budget_bytes: int, stride: int) -> int:
    """The most arena slots of `stride` bytes whose pinned size stays within `budget_bytes`."""
    if stride <= 0:
        raise ValueError(f"stride={stride} must be > 0")
    slots = max(0, budget_bytes) // stride
    while slots and arena_pin_bytes(slots, stride) > budget_bytes:  # only when stride is not page-sized
        slots -= 1
    return slots


def caching_allocator_pin_bytes(nbytes: int) -> int:
    """What `torch.empty(nbytes, pin_memory=True)` pins: PyTorch's caching host allocator rounds every
    block up to a power of two (issue 17 item 2). For comparison only; the engine pins `pinned_size`."""
    return 1 << max(0, nbytes - 1).bit_length() if nbytes > 0 else 0


def _page_aligned(nbytes: int) -> torch.Tensor:
    """uint8 [pinned_size(nbytes)] host memory starting on a page boundary (not yet pinned)."""
    size = pinned_size(nbytes)
    raw = torch.empty(size + PAGE, dtype=torch.uint8)
    start = (-raw.data_ptr()) % PAGE
    return raw[start : start + size]


# --- the interface ----------------------------------------------------------------------------
class Stream(Protocol):
    def wait_event(self, event) -> None: ...  # later work on this stream waits for the event's work
    def synchronize(self) -> None: ...  # the host waits for everything queued on this stream
    def query(self) -> bool: ...  # everything queued has run


class Event(Protocol):
    def record(self, stream=None) -> None: ...  # marks the work queued so far on `stream` (default: current)
    def wait(self, stream=None) -> None: ...  # `stream` (default: current) waits for the marked work
    def synchronize(self) -> None: ...  # the host waits for the marked work
    def query(self) -> bool: ...  # the marked work has run (True for an event never recorded)


class Device(Protocol):
    """Device-memory operations; `index` is the device's number (cuda:N)."""

    index: int
    torch_device: torch.device  # where device tensors live (cpu for the emulator)

    def new_stream(self) -> Stream: ...
    def current_stream(self) -> Stream: ...
    def stream(self, stream: Stream): ...  # context manager: `stream` is the thread's current one inside
    def new_event(self) -> Event: ...
    def copy(self, dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = True) -> None: ...
    def record_stream(self, tensor: torch.Tensor, stream: Stream) -> None: ...
    def synchronize(self) -> None: ...
    def empty(self, nbytes: int) -> torch.Tensor: ...  # uint8 [nbytes] device memory
    def pin(self, nbytes: int) -> torch.Tensor: ...  # uint8 [nbytes] pinned host memory, page-aligned
    def unpin(self, buffer: torch.Tensor) -> None: ...
    def pinned_bytes(self) -> int: ...  # pinned by this device object and not yet released
    def is_pinned(self, tensor: torch.Tensor) -> bool: ...
    def bind_thread(self) -> None: ...  # make this device the calling thread's current device
    def bind_device_index(self, index: int) -> None: ...  # make device `index` current (restoring a guard)
    def current_index(self) -> int: ...  # the calling thread's current device


# --- threads on the right device (issue 17 item 5) ---------------------------------------------
@contextmanager
def device_guard(device: Device) -> Iterator[None]:
    """Inside, `device` is the calling thread's current device; the previous one is restored after."""
    previous = device.current_index()
    device.bind_thread()
    try:
        yield
    finally:
        if previous != device.index:
            device.bind_device_index(previous)


def on_device(device: Device) -> Callable:
    """Decorator for a thread's target (or any function a thread runs): binds the thread first."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def bound(*args, **kwargs):
            device.bind_thread()
            return fn(*args, **kwargs)

        return bound

    return wrap


def device_executor(device: Device, max_workers: int, thread_name_prefix: str) -> ThreadPoolExecutor:
    """A ThreadPoolExecutor whose threads bind themselves to `device` when they start."""
    return ThreadPoolExecutor(max_workers, thread_name_prefix=thread_name_prefix, initializer=device.bind_thread)


def device_thread(device: Device, target: Callable, *, name: str, args: tuple = (), daemon: bool = True
                  ) -> threading.Thread:
    """A threading.Thread (not started) whose target runs on `device`."""
    return threading.Thread(target=on_device(device)(target), args=args, name=name, daemon=daemon)


# --- buffers reused across loads ----------------------------------------------------------------
class BufferPool:
    """Buffers of one size, each lent to one user at a time: the disk tier's pinned staging buffers, the
    host cache's spare device buffers of the write-back. `take()` returns (buffer, event): the device is
    done with the buffer once `event` is (None: at once), so a user orders its first device work on it
    after that event; `give(buffer, event)` hands it back with the event after the user's last device
    work on it. At most `limit` exist (one per thread that loads: a take beyond that waits for a give);
    each is made on first need by `make()` and released by `release(buffer)` on `close()`."""

    def __init__(self, make: Callable[[], torch.Tensor], release: Callable[[torch.Tensor], None] | None,
                 limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit={limit} must be >= 1")
        self.make, self.release, self.limit = make, release, limit
        self.free: list[tuple[torch.Tensor, Event | None]] = []
        self.made: list[torch.Tensor] = []
        self._cond = threading.Condition()

    def take(self) -> tuple[torch.Tensor, Event | None]:
        with self._cond:
            while not self.free and len(self.made) >= self.limit:
                self._cond.wait()
            if self.free:
                return self.free.pop()
            buffer = self.make()
            self.made.append(buffer)
            return buffer, None

    def fill(self) -> None:
        """Make every buffer now (what is pinned is then the planned amount from the start)."""
        with self._cond:
            while len(self.made) < self.limit:
                buffer = self.make()
                self.made.append(buffer)
                self.free.append((buffer, None))

    def give(self, buffer: torch.Tensor, event: Event | None = None) -> None:
        with self._cond:
            self.free.append((buffer, event))
            self._cond.notify()

    def close(self) -> None:
        """Release every buffer (the caller has synchronized the device: none is in use)."""
        with self._cond:
            made, self.made, self.free = self.made, [], []
        if self.release is not None:
            for buffer in made:
                self.release(buffer)


# --- real CUDA -------------------------------------------------------------------------------------
class CudaDevice:
    """torch.cuda on `cuda:index`; pinned memory registered with cudaHostRegister at its exact size."""

    def __init__(self, index: int = 0) -> None:
        if not torch.cuda.is_available():
            raise ValueError("CudaDevice needs a CUDA GPU; use EmulatedDevice on a CPU")
        if not 0 <= index < torch.cuda.device_count():
            raise ValueError(f"cuda:{index} does not exist: {torch.cuda.device_count()} CUDA device(s)")
        self.index = index
        self.torch_device = torch.device("cuda", index)
        self._pinned: dict[int, int] = {}  # data_ptr -> registered bytes
        self._lock = threading.Lock()

    def new_stream(self):
        return torch.cuda.Stream(self.torch_device)

    def current_stream(self):
        return torch.cuda.current_stream(self.torch_device)

    def stream(self, stream):
        return torch.cuda.stream(stream)

    def new_event(self):
        return torch.cuda.Event()

    def copy(self, dst, src, non_blocking=True):
        dst.copy_(src, non_blocking=non_blocking)

    def record_stream(self, tensor, stream):
        tensor.record_stream(stream)

    def synchronize(self):
        torch.cuda.synchronize(self.torch_device)

    def empty(self, nbytes):
        return torch.empty(nbytes, dtype=torch.uint8, device=self.torch_device)

    def pin(self, nbytes):
        buffer = _page_aligned(nbytes)
        if buffer.numel():
            cudart = torch.cuda.cudart()
            # flags 0 (cudaHostRegisterDefault): page-locked and usable by the current context;
            # portable (1) is not needed: one process, one device per engine
            torch.cuda.check_error(cudart.cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0))
            with self._lock:
                self._pinned[buffer.data_ptr()] = buffer.numel()
        return buffer[:nbytes]

    def unpin(self, buffer):
        with self._lock:
            size = self._pinned.pop(buffer.data_ptr(), None)
        if size is None:
            raise ValueError("unpin: this buffer was not pinned by this device (or was released already)")
        self.synchronize()  # no copy from or into it may still be queued (released at close: cheap)
        torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr()))

    def pinned_bytes(self):
        with self._lock:
            return sum(self._pinned.values())

    def is_pinned(self, tensor):
        return tensor.is_pinned()

    def bind_thread(self):
        torch.cuda.set_device(self.index)

    def bind_device_index(self, index):
        torch.cuda.set_device(index)

    def current_index(self):
        return torch.cuda.current_device()


# --- the emulator ----------------------------------------------------------------------------------
class EmulatedStream:
    def __init__(self, device: EmulatedDevice, main: bool) -> None:
        self.device, self.main = device, main
        # pending work, in order: ("run", fn), ("wait", (event, record)), ("mark", (event, record))
        self.queue: deque = deque()

    def wait_event(self, event: EmulatedEvent) -> None:
        with self.device._lock:
            self.device._enqueue(self, ("wait", (event, event.recorded)))

    def synchronize(self) -> None:
        self.device._run_until(lambda: not self.queue)

    def query(self) -> bool:
        with self.device._lock:
            self.device._progress()
            return not self.queue


class EmulatedEvent:
    def __init__(self, device: EmulatedDevice) -> None:
        self.device = device
        self.recorded = 0  # records issued; a wait is for the latest record at the time of the wait
        self.completed = 0  # the latest record whose marked work has run

    @property
    def done(self) -> bool:  # an event never recorded counts as complete (as in CUDA)
        return self.completed >= self.recorded

    def record(self, stream: EmulatedStream | None = None) -> None:
        stream = stream if stream is not None else self.device.current_stream()
        with self.device._lock:
            self.recorded += 1
            self.device._enqueue(stream, ("mark", (self, self.recorded)))

    def wait(self, stream: EmulatedStream | None = None) -> None:
        (stream if stream is not None else self.device.current_stream()).wait_event(self)

    def synchronize(self) -> None:
        self.device._run_until(lambda: self.done)

    def query(self) -> bool:
        with self.device._lock:
            self.device._progress()
            return self.done


class EmulatedDevice:
    """A CPU emulator of the CUDA semantics above, with device number `index` (tensors stay on the CPU).

    `seed` fixes the order in which deferred work runs; `lateness` in [0, 1] is the chance that a device
    call stops running pending work (higher: work stays queued longer; 1: queued work runs only when
    something waits for it, the latest CUDA may run it). Device memory from `empty` starts filled with
    POISON (CUDA's holds whatever was there): a read that overtakes the write it should wait for then
    sees bytes that cannot pass for a record, not a lucky leftover."""

    def __init__(self, index: int = 0, seed: int = 0, lateness: float = 0.7) -> None:
        if index < 0:
            raise ValueError(f"index={index} must be >= 0")
        if not 0 <= lateness <= 1:
            raise ValueError(f"lateness={lateness} must be in [0, 1]")
        self.index = index
        self.torch_device = torch.device("cpu")
        self.lateness = lateness
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        self._main = EmulatedStream(self, main=True)
        self._side: list[EmulatedStream] = []
        self._local = threading.local()  # .stack of current streams
        self._pinned: dict[int, int] = {}  # data_ptr -> pinned bytes
        self._pinned_ranges: list[tuple[int, int]] = []
        self._device_ranges: list[tuple[int, int]] = []  # memory from empty(): read when a copy runs
        self._recorded: dict[int, list[EmulatedStream]] = {}  # data_ptr -> streams that use the buffer
        self.pinned_total = 0  # ever pinned
        self.unpinned_total = 0  # ever released

    # --- threads: which device is current (thread-local, device 0 until bound, like CUDA) ----------
    def bind_thread(self) -> None:
        _EMULATED_CURRENT.index = self.index

    def bind_device_index(self, index: int) -> None:
        _EMULATED_CURRENT.index = index

    def current_index(self) -> int:
        return getattr(_EMULATED_CURRENT, "index", 0)

    def _check_thread(self) -> None:
        current = self.current_index()
        if current != self.index:
            raise WrongDeviceError(f"thread {threading.current_thread().name!r} uses device {self.index} while "
                                   f"its current device is {current}: call bind_thread() (or device_guard / "
                                   "device_executor) when the thread starts")

    # --- streams and events ------------------------------------------------------------------
    def new_stream(self) -> EmulatedStream:
        self._check_thread()
        stream = EmulatedStream(self, main=False)
        with self._lock:
            self._side.append(stream)
        return stream

    def current_stream(self) -> EmulatedStream:
        stack = getattr(self._local, "stack", None)
        return stack[-1] if stack else self._main

    @contextmanager
    def stream(self, stream: EmulatedStream) -> Iterator[EmulatedStream]:
        self._check_thread()
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        self._local.stack.append(stream)
        try:
            yield stream
        finally:
            self._local.stack.pop()

    def new_event(self) -> EmulatedEvent:
        return EmulatedEvent(self)

    # --- copies --------------------------------------------------------------------------------
    def copy(self, dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = True) -> None:
        """dst <- src on the current stream. From device or pinned memory the bytes are read when the
        copy runs; from pageable host memory they are staged now, and a copy into pageable host memory
        returns when it has run (CUDA's rules for pageable memory)."""
        if dst.shape != src.shape:
            raise ValueError(f"copy: dst shape {tuple(dst.shape)} != src shape {tuple(src.shape)}")
        stream = self.current_stream()
        source = src if self._late(src) else src.clone()
        self._enqueue(stream, ("run", lambda: _raw_copy(dst, source)))
        if not non_blocking or not self._late(dst):
            stream.synchronize()

    def record_stream(self, tensor: torch.Tensor, stream: EmulatedStream) -> None:
        """`tensor`'s memory is used by work on `stream`: releasing it (`unpin`) waits for that work."""
        with self._lock:
            self._recorded.setdefault(tensor.data_ptr(), []).append(stream)

    def synchronize(self) -> None:
        """The host waits for all queued work on every stream."""
        self._run_until(lambda: not any(s.queue for s in self._side))

    def pending(self) -> int:
        """Queued work items not yet run (tests)."""
        with self._lock:
            return sum(len(s.queue) for s in self._side)

    # --- memory --------------------------------------------------------------------------------
    def empty(self, nbytes: int) -> torch.Tensor:
        self._check_thread()
        buffer = torch.full((nbytes,), POISON, dtype=torch.uint8)
        with self._lock:
            self._device_ranges.append((buffer.data_ptr(), buffer.data_ptr() + nbytes))
        return buffer

    def pin(self, nbytes: int) -> torch.Tensor:
        """Page-aligned host memory of `pinned_size(nbytes)` bytes, counted as pinned (its pages are not
        touched here: a large plan costs no RAM until written)."""
        self._check_thread()
        buffer = _page_aligned(nbytes)
        with self._lock:
            self._pinned[buffer.data_ptr()] = buffer.numel()
            self._pinned_ranges.append((buffer.data_ptr(), buffer.data_ptr() + buffer.numel()))
            self.pinned_total += buffer.numel()
        return buffer[:nbytes]

    def unpin(self, buffer: torch.Tensor) -> None:
        ptr = buffer.data_ptr()
        with self._lock:
            streams = self._recorded.pop(ptr, [])
        for stream in streams:  # work queued on the buffer runs before its memory is released
            stream.synchronize()
        with self._lock:
            size = self._pinned.pop(ptr, None)
            if size is None:
                raise ValueError("unpin: this buffer was not pinned by this device (or was released already)")
            self._pinned_ranges.remove((ptr, ptr + size))
            self.unpinned_total += size

    def pinned_bytes(self) -> int:
        with self._lock:
            return sum(self._pinned.values())

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return self._in(self._pinned_ranges, tensor)

    def _late(self, tensor: torch.Tensor) -> bool:
        """Pinned or device memory: a copy touches it when the copy runs, not when it is issued."""
        return self.is_pinned(tensor) or self._in(self._device_ranges, tensor)

    def _in(self, ranges: list[tuple[int, int]], tensor: torch.Tensor) -> bool:
        ptr = tensor.data_ptr()
        with self._lock:
            return any(lo <= ptr < hi for lo, hi in ranges)

    # --- the scheduler: FIFO per stream, any order across streams -------------------------------
    def _enqueue(self, stream: EmulatedStream, item: tuple) -> None:
        self._check_thread()
        with self._lock:
            if stream.main:  # eager: runs now, after what it must wait for
                kind, arg = item
                if kind == "wait":
                    self._run_until(lambda: _waited(arg))
                else:
                    _execute(kind, arg)
                return
            stream.queue.append(item)
            self._progress()

    def _ready(self) -> list[EmulatedStream]:
        return [s for s in self._side if s.queue and (s.queue[0][0] != "wait" or _waited(s.queue[0][1]))]

    def _step(self, stream: EmulatedStream) -> None:
        _execute(*stream.queue.popleft())

    def _progress(self) -> None:
        """Maybe run some ready work (seeded): late, and across streams in any order."""
        while self._rng.random() >= self.lateness:
            ready = self._ready()
            if not ready:
                return
            self._step(self._rng.choice(ready))

    def _run_until(self, condition: Callable[[], bool]) -> None:
        with self._lock:
            while not condition():
                ready = self._ready()
                if not ready:
                    # cannot happen while waits capture the latest record (as CUDA's do); kept so
                    # an emulator bug ends in an error, not a hang
                    raise RuntimeError("emulated device: the host waits for work that can never run")
                self._step(self._rng.choice(ready))


def _raw_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """A copy as the device runs it: whichever thread runs it, in no autograd mode (inference mode: a
    slot view taken under inference mode may be written by work another thread runs later)."""
    with torch.inference_mode():
        dst.copy_(src)


def _waited(arg: tuple[EmulatedEvent, int]) -> bool:
    event, record = arg
    return event.completed >= record


def _execute(kind: str, arg) -> None:
    if kind == "run":
        arg()
    elif kind == "mark":
        event, record = arg
        event.completed = max(event.completed, record)


_EMULATED_CURRENT = threading.local()  # the emulator's per-thread current device (shared by all instances)


def make_device(device: torch.device, emulate: bool = False) -> Device:
    """The `Device` for a torch device: CudaDevice for cuda:N, EmulatedDevice(N) when `emulate`."""
    index = device.index or 0
    if emulate:
        return EmulatedDevice(index)
    if device.type != "cuda":
        raise ValueError(f"make_device: {device} is not a CUDA device; pass emulate=True for the CPU emulator")
    return CudaDevice(index)
