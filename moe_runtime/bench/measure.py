"""Measuring one benchmark job: the job's description, timed decode steps, counters over a window.

Imported by the runners and the report; imports neither the command line nor the model part.
"""

from __future__ import annotations

import os
import re
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..stats import Counters


@dataclass
class Job:
    """One variant of one part, everything a worker process needs."""

    part: str
    variant: str
    warmup: int
    tokens: int
    cache_size: int = 4
    prefetch: int = 2
    device: str = "cpu"
    threads: int = 1
    store_dir: str = "expert-store/bench"
    model: str = ""
    prompt_tokens: int = 32
    expert_bits: int | None = None
    trace: str = ""
    spec: dict = field(default_factory=dict)
    shape: str = ""  # the shape part: a name of bench/hub_shapes.py
    max_rss_gb: float | None = None  # the shape part: refuse a variant predicted to need more RAM
    routing: str = "model"  # the shape part: the random model's routers, or "uniform" draws (bench/shape.py)
    attn_bits: int | None = None  # the shape part: HQQ attention as load() quantizes it (None: the dense dtype)


# --- counters of a window -----------------------------------------------------------------------
def loader_counters(loader) -> Counters:
    """accelerate's loader as one-layer counters: every load is a demand load (a miss)."""
    return Counters.of(1, misses=[loader.loads], bytes_moved=[loader.nbytes], stall_seconds=[loader.seconds])


def no_counters() -> Counters:
    """A variant that moves nothing (every weight in memory)."""
    return Counters.zeros(1)


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    try:
        return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(job: Job, step, counters: Callable[[], Counters], before_step=None) -> dict:
    """Untimed warm-up steps, then `job.tokens` timed steps; `window` = counters over the timed ones.
    Peak memory and wall time are measured from here: building stores and loading the model, done
    before, are not part of decoding (and happen only on a first run)."""
    peak_reset = _reset_peak_memory(job)
    started = t0 = time.perf_counter()
    for i in range(job.warmup):
        if before_step:
            before_step()
        step(i)
    warmup_seconds = time.perf_counter() - t0
    start = counters()
    times, cpu = [], 0.0
    for i in tqdm(range(job.warmup, job.warmup + job.tokens), desc=f"{job.part} {job.variant}", unit="tok",
                  leave=False):
        if before_step:
            before_step()
        t0, c0 = time.perf_counter(), time.process_time()
        step(i)
        times.append(time.perf_counter() - t0)
        cpu += time.process_time() - c0
    end = counters()
    return {"times": times, "cpu_seconds": cpu, "window": end - start, "total": end, "warmup_seconds": warmup_seconds,
            "peak_rss_isolated": peak_reset, "wall_seconds": time.perf_counter() - started}


def _reset_peak_memory(job: Job) -> bool:
    """Reset the peak RSS (and the CUDA peak on a CUDA device); whether the RSS peak could be reset."""
    if job.device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()
    return _reset_peak_rss()



def engine_knobs(job: Job, experts: int) -> tuple[int, int]:
    """(cache_size, prefetch) of an engine variant."""
    return {"no-cache": (1, 0), "lru": (job.cache_size, 0), "lru+prefetch": (job.cache_size, job.prefetch),
            "lru+host": (job.cache_size, job.prefetch), "lru+host-half": (job.cache_size, job.prefetch),
            "resident": (experts, 0)}[job.variant]




def failed(job: Job, message: str) -> dict:
    """The result row of a job that failed: the other variants still run and are reported."""
    return {"part": job.part, "variant": job.variant, "job": asdict(job), "error": message}


def summarize(job: Job, measured: dict, facts: dict, cuda_peak_bytes: int | None, load_before: float) -> dict:
    """One result row: times per token, the counters' window and totals, memory."""
    times = measured["times"]
    window: Counters = measured["window"]
    w = window.totals()
    n, seconds = len(times), sum(times)
    result = {
        "part": job.part, "variant": job.variant, "job": asdict(job), **facts,
        "tokens": n, "seconds": seconds,
        "tokens_per_second": n / seconds if seconds > 0 else 0.0,
        "ms_per_token": 1000 * seconds / n if n else 0.0,
        "ms_per_token_median": 1000 * sorted(times)[n // 2] if n else 0.0,
        # CPU time of the whole process (all threads) per token: unlike wall time, not inflated when
        # other jobs on a shared machine take the CPU away
        "cpu_ms_per_token": 1000 * measured["cpu_seconds"] / n if n else 0.0,
        "times": times,
        "stall_ms_per_token": 1000 * w["stall_seconds"] / n if n else 0.0,
        "bytes_per_token": w["bytes_moved"] / n if n else 0.0,
        # the bytes that move are the bytes that compute: converted (goal 0) and copied between memory levels
        # (0 on a CPU, where experts compute in the host arena)
        "converted_bytes_per_token": w.get("converted_bytes", 0) / n if n else 0.0,
        "level_copy_bytes_per_token": w.get("level_copy_bytes", 0) / n if n else 0.0,
        # read from disk (host cache variants: only first uses); None where no host level counts them
        "disk_bytes_per_token": (w["disk_bytes"] / n if n else 0.0) if facts.get("host_slots") is not None
        or facts.get("engine") else None,
        "window": w, "total": measured["total"].totals(), "warmup_seconds": measured["warmup_seconds"],
        "peak_rss_bytes": _peak_rss(), "peak_rss_isolated": measured["peak_rss_isolated"],
        "cuda_peak_bytes": cuda_peak_bytes,
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "wall_seconds": measured["wall_seconds"],
    }
    if w["selections"]:
        result.update(hit_rate=w["hit_rate"], prefetch_recall=w["prefetch_recall"],
                      prefetch_precision=w["prefetch_precision"])
    return result
