"""Running one benchmark job in this process: the model part or the Mixtral-shaped workload."""

from __future__ import annotations

import os
from pathlib import Path

from ..stats import RoutingTrace
from . import accelerate
from . import workload as wl
from .measure import Job, engine_knobs, loader_counters, summarize, timed
from .model import run_model
from .shape import run_shape


def run_job(job: Job) -> dict:
    """Measure one variant in this process."""
    import torch

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(job.threads)
    try:
        return _measure(job)
    finally:
        torch.set_num_threads(threads)


def _measure(job: Job) -> dict:
    import torch

    cuda = job.device.startswith("cuda")
    load_before = os.getloadavg()[0]
    with torch.inference_mode():
        run = {"model": run_model, "shape": run_shape}.get(job.part, run_workload)
        measured, facts = run(job)
    return summarize(job, measured, facts, torch.cuda.max_memory_allocated() if cuda else None, load_before)


def run_workload(job: Job):
    """The Mixtral-shaped stack of one variant over the replayed trace: (measured, facts)."""
    import torch

    device = torch.device(job.device)
    spec = wl.spec_for(device, **job.spec, records_for=job.device)
    replay = wl.map_trace(RoutingTrace.load(job.trace), spec.layers)
    facts = {"workload": wl.describe(spec, replay, packed=not job.variant.startswith("accelerate"))}
    if job.variant.startswith("accelerate"):
        granularity = "fused" if job.variant == "accelerate" else "per-expert"
        folder = accelerate.build_offload_folder(spec, Path(job.store_dir), granularity)
        stack = accelerate.AccelerateStack(spec, replay, folder, device, granularity)
        # the page cache is dropped before each step, untimed, as the engine variants' before_step
        return timed(job, stack.step, lambda: loader_counters(stack.loader),
                     lambda: accelerate.drop_page_cache(folder)), facts
    cache_size, prefetch = engine_knobs(job, spec.experts)
    every = spec.layers * spec.experts
    host_slots = {"lru+host": every, "lru+host-half": every // 2}.get(job.variant, 0)  # records the budget holds
    stack = wl.OffloadedStack(spec, replay, wl.build_store(spec, job.store_dir), cache_size, prefetch, device,
                              host_slots=host_slots)
    facts.update(cache_size=cache_size, prefetch=prefetch, direct_io=stack.direct_io, host_slots=host_slots)
    if job.variant.startswith("resident"):
        stack.warm_all()
    before = stack.drop_resident if job.variant == "no-cache" else None
    try:
        return timed(job, stack.step, stack.stats.counters, before), facts
    finally:
        stack.close()
