"""Decode-speed benchmark: accelerate's offloading vs. the engine without cache, with an LRU cache,
with cache + speculative prefetch, and with every expert resident.

    python -m moe_runtime.bench [--quick] [--out bench-results] [--parts model,workload-2bit,workload-16bit]
    python -m moe_runtime.bench --record-trace assets/traces/tiny-mixtral.json [--model assets/tiny-mixtral]

Parts (each a table in bench.md, a group of rows in bench.json, a panel in bench.html):
  model            a real checkpoint (default assets/tiny-mixtral). Every variant decodes the same
                   tokens: teacher-forced, each step feeds the next token of a fixed text, so the
                   routing is the same for all of them.
  workload-2bit    the Mixtral-8x7B-shaped stack of workload.py (2-bit experts, group 16, 8-bit meta),
  workload-16bit   and the same with 16-bit experts, replaying a recorded routing trace.

A "token" is one decode step; tokens/s counts the timed steps that follow a few untimed warm-up
steps. Each variant runs in a subprocess of its own in full mode, so its peak RSS is its own; --quick
runs them in-process and resets the peak (Linux clear_refs) between variants. Engine variants read
the disk tier with O_DIRECT; accelerate reads memory-mapped files, whose page cache is dropped
before every token so that it reads the disk too. Every variant runs with `--threads` torch threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "assets" / "tiny-mixtral"
DEFAULT_TRACE = REPO / "assets" / "traces" / "tiny-mixtral.json"
MIXTRAL_DIMS = {"hidden": 4096, "intermediate": 14336}
QUICK_DIMS = {"hidden": 256, "intermediate": 512}

VARIANTS = {
    "accelerate": "accelerate's disk offloading of transformers' Mixtral experts (16-bit; moves all E "
                  "experts of a layer, which are one parameter)",
    "accelerate-per-expert": "accelerate's disk offloading, one module per expert (moves only the routed experts)",
    "no-cache": "ours, every selected expert read from disk on every use (cache emptied before each token)",
    "lru": "ours, LRU cache of C experts per layer",
    "lru+prefetch": "ours, LRU cache + speculative prefetch of P experts one layer ahead",
    "resident": "ours, cache of all E experts, loaded before timing (the limit)",
    "lru+prefetch-decoded": "2-bit only: lru+prefetch with a cache of dequantized experts (dequantized once per load)",
    "resident-decoded": "2-bit only: resident with a cache of dequantized experts",
    "transformers": "plain transformers model, every weight in memory",
}
ENGINE_VARIANTS = ("no-cache", "lru", "lru+prefetch", "resident")
DECODED_VARIANTS = ("lru+prefetch-decoded", "resident-decoded")


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


# --- measuring one job --------------------------------------------------------------------------
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


def engine_counters(stats) -> dict:
    """The engine's counters that a window of tokens is measured by (differences of two snapshots)."""
    return {"hits": sum(stats.hits), "misses": sum(stats.misses), "selections": sum(stats.selections),
            "guess_hits": sum(stats.guess_hits), "guess_total": sum(stats.guess_total),
            "prefetch_issued": sum(stats.prefetch_issued), "prefetch_used": sum(stats.prefetch_used),
            "bytes_moved": stats.total_bytes_moved, "stall_seconds": stats.total_stall_seconds}


def loader_counters(loader) -> dict:
    return {"bytes_moved": loader.nbytes, "stall_seconds": loader.seconds, "loads": loader.loads}


def timed(job: Job, step, counters, before_step=None) -> dict:
    """Untimed warm-up steps, then `job.tokens` timed steps; counters are diffed over the timed ones.
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
    window = {k: end[k] - start[k] for k in end}
    return {"times": times, "cpu_seconds": cpu, "window": window, "total": end, "warmup_seconds": warmup_seconds,
            "peak_rss_isolated": peak_reset, "wall_seconds": time.perf_counter() - started}


def _reset_peak_memory(job: Job) -> bool:
    """Reset the peak RSS (and the CUDA peak on a CUDA device); whether the RSS peak could be reset."""
    if job.device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()
    return _reset_peak_rss()


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
        if job.part == "model":
            from .bench_model import run_model

            measured, facts = run_model(job)
        else:
            measured, facts = _run_workload(job)
    times = measured["times"]
    w = measured["window"]
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
        "window": w, "total": measured["total"], "warmup_seconds": measured["warmup_seconds"],
        "peak_rss_bytes": _peak_rss(), "peak_rss_isolated": measured["peak_rss_isolated"],
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "wall_seconds": measured["wall_seconds"],
    }
    if "selections" in w:
        result["hit_rate"] = w["hits"] / w["selections"] if w["selections"] else 0.0
        result["prefetch_recall"] = w["guess_hits"] / w["guess_total"] if w["guess_total"] else None
        issued = w["prefetch_issued"]
        result["prefetch_precision"] = w["prefetch_used"] / issued if issued else None
    return result


def engine_knobs(job: Job, experts: int) -> tuple[int, int]:
    """(cache_size, prefetch) of an engine variant."""
    return {"no-cache": (1, 0), "lru": (job.cache_size, 0), "lru+prefetch": (job.cache_size, job.prefetch),
            "resident": (experts, 0)}[job.variant.removesuffix("-decoded")]


def _run_workload(job: Job):
    import torch

    from . import baseline
    from . import workload as wl
    from .stats import RoutingTrace

    spec = wl.WorkloadSpec(**job.spec)
    replay = wl.map_trace(RoutingTrace.load(job.trace), spec.layers)
    device = torch.device(job.device)
    facts = {"workload": wl.describe(spec, replay, packed=not job.variant.startswith("accelerate"))}
    if job.variant.startswith("accelerate"):
        granularity = "fused" if job.variant == "accelerate" else "per-expert"
        folder = baseline.build_offload_folder(spec, Path(job.store_dir), granularity)
        stack = baseline.AccelerateStack(spec, replay, folder, device, granularity)
        # the page cache is dropped before each step, untimed, as the engine variants' before_step
        return timed(job, stack.step, lambda: loader_counters(stack.loader),
                     lambda: baseline.drop_page_cache(folder)), facts
    cache_size, prefetch = engine_knobs(job, spec.experts)
    decoded = job.variant.endswith("-decoded")
    stack = wl.OffloadedStack(spec, replay, wl.build_store(spec, job.store_dir), cache_size, prefetch, device,
                              decoded=decoded)
    facts.update(cache_size=cache_size, prefetch=prefetch, direct_io=stack.direct_io, decoded_cache=decoded)
    if job.variant.startswith("resident"):
        stack.warm_all()
    before = stack.drop_resident if job.variant == "no-cache" else None
    try:
        return timed(job, stack.step, lambda: engine_counters(stack.stats.snapshot()), before), facts
    finally:
        stack.close()


# --- planning and running -----------------------------------------------------------------------
@dataclass
class Plan:
    parts: list[str]
    quick: bool
    model: str
    trace: str
    layers: int
    cache_size: int
    prefetch: int
    store_dir: str
    device: str
    threads: int

    def jobs(self) -> list[Job]:
        jobs = []
        common = dict(cache_size=self.cache_size, prefetch=self.prefetch, store_dir=self.store_dir, device=self.device,
                      threads=self.threads)
        if "model" in self.parts:
            prompt, warm, tokens = (8, 2, 4) if self.quick else (32, 16, 192)
            positions = json.loads((Path(self.model) / "config.json").read_text()).get("max_position_embeddings")
            if positions:  # the fixed text must fit the model's context
                tokens = max(1, min(tokens, positions - prompt - warm - 1))
            for v in ("accelerate", *ENGINE_VARIANTS, "transformers"):
                jobs.append(Job("model", v, warm, tokens, model=self.model, prompt_tokens=prompt, **common))
        dims = QUICK_DIMS if self.quick else MIXTRAL_DIMS
        for part, bits in (("workload-16bit", None), ("workload-2bit", 2)):
            if part not in self.parts:
                continue
            spec = {**dims, "layers": self.layers, "bits": bits, **self._trace_shape()}
            variants = list(ENGINE_VARIANTS) + (list(DECODED_VARIANTS) if bits else [])
            if bits is None or "workload-16bit" not in self.parts:  # accelerate moves 16-bit weights either way
                variants = ["accelerate", "accelerate-per-expert", *variants]
            for v in variants:
                w, t = (2, 6) if self.quick else self._full_tokens(v, bits)
                job_spec = {**spec, "bits": None} if v.startswith("accelerate") else spec
                jobs.append(Job(part, v, w, t, trace=self.trace, spec=job_spec, **common))
        return jobs

    @staticmethod
    def _full_tokens(variant: str, bits: int | None) -> tuple[int, int]:
        """(warm-up, timed) decode steps, sized so the full run fits ~15 minutes on 2 CPU cores:
        accelerate reads 2-8 experts per layer for every token (3-10 s/token here) and the 2-bit
        variants that dequantize per use are compute-bound (5-8 s/token), so they get few tokens
        (their per-token time barely varies); cache hit rates come from the longer runs."""
        if variant == "accelerate":
            return 1, 4
        if variant == "accelerate-per-expert":
            return 1, 6
        if bits and not variant.endswith("-decoded"):
            return 1, 4
        if variant in ("no-cache", "lru+prefetch-decoded"):
            return 2, 12
        return 8, 48

    def _trace_shape(self) -> dict:
        from .stats import RoutingTrace

        trace = RoutingTrace.load(self.trace)
        return {"experts": trace.num_experts, "top_k": trace.top_k}


def run_isolated(job: Job) -> dict:
    """Run `job` in a fresh Python process, so its peak RSS is its own."""
    with tempfile.TemporaryDirectory() as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps(asdict(job)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([sys.executable, "-m", "moe_runtime.bench", "--worker", str(job_file),
                               "--result", str(result_file)], env=env, stdout=subprocess.PIPE, text=True)
        # stderr (progress bars) stays on the terminal: the worker writes its own error, traceback
        # included, into the result file; only a worker that died without one lands here
        if result_file.exists():
            return json.loads(result_file.read_text())
        return _failed(job, f"worker exited with {proc.returncode} and no result: {proc.stdout[-2000:]}")


def _failed(job: Job, message: str) -> dict:
    """The result row of a job that failed: the other variants still run and are reported."""
    return {"part": job.part, "variant": job.variant, "job": asdict(job), "error": message}


def run_plan(plan: Plan, isolate: bool) -> list[dict]:
    results = []
    for job in tqdm(plan.jobs(), desc="variants", unit="variant"):
        if isolate:
            results.append(run_isolated(job))
            continue
        try:
            results.append(run_job(job))
        except Exception:  # one failing variant is reported, the others still run
            results.append(_failed(job, traceback.format_exc()))
    return results


def machine() -> dict:
    import psutil
    import torch

    cpu = platform.processor() or ""
    try:
        found = re.search(r"Model name:\s*(.+)", subprocess.run(["lscpu"], capture_output=True, text=True).stdout)
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total, "gpu": gpu,
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def _shown(path: Path) -> str:
    """A default path as the user would type it: relative when under the working directory."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m moe_runtime.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small dimensions and few tokens (CI)")
    ap.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for bench.json/.md/.html")
    ap.add_argument("--parts", default="model,workload-16bit,workload-2bit",
                    help="comma-separated: model, workload-16bit, workload-2bit")
    ap.add_argument("--model", default=_shown(DEFAULT_MODEL), help="checkpoint folder of the model part")
    ap.add_argument("--trace", default=_shown(DEFAULT_TRACE), help="routing trace the workload replays")
    ap.add_argument("--layers", type=int, default=2, help="layers of the Mixtral-shaped workload")
    ap.add_argument("--cache-size", type=int, default=4, help="experts per layer in the cache (lru variants)")
    ap.add_argument("--prefetch", type=int, default=2, help="experts prefetched one layer ahead")
    ap.add_argument("--store-dir", default="expert-store/bench", help="expert stores and offload folders (reused)")
    ap.add_argument("--device", default="cpu", help='"cpu" or "cuda[:N]"')
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads of every variant (default 1: on a shared 2-core machine a second "
                         "thread is slower, and waking it after each blocking disk read costs milliseconds)")
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                    help="one subprocess per variant (default: on, off with --quick)")
    ap.add_argument("--record-trace", type=Path, metavar="OUT", help="record a routing trace from --model and exit")
    ap.add_argument("--from-json", type=Path, metavar="BENCH_JSON",
                    help="only re-render bench.md/.html into --out from an earlier run's bench.json")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        job = Job(**json.loads(args.worker.read_text()))
        try:
            result = run_job(job)
        except Exception:  # reported to the parent with its traceback (stderr is not kept)
            result = _failed(job, traceback.format_exc())
        args.result.write_text(json.dumps(result))
        return 1 if "error" in result else 0
    if args.record_trace:
        from .bench_model import record_trace

        path = record_trace(args.model, args.record_trace, store_dir=args.store_dir)
        print(f"routing trace written to {path}")
        return 0
    from .bench_report import write_reports

    if args.from_json:
        report = json.loads(args.from_json.read_text())
        print(write_reports(report["results"], report["meta"], args.out))
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in ("model", "workload-16bit", "workload-2bit")]
    if unknown:
        print(f"error: --parts {unknown[0]!r} is not allowed: use model, workload-16bit, workload-2bit", file=sys.stderr)
        return 2
    if "model" in parts and not (Path(args.model) / "config.json").exists():
        print(f"note: no checkpoint at {args.model}; skipping the model part", file=sys.stderr)
        parts.remove("model")
    if any(p.startswith("workload") for p in parts) and not Path(args.trace).exists():
        print(f"error: no routing trace at {args.trace}: record one with --record-trace", file=sys.stderr)
        return 2
    plan = Plan(parts, args.quick, args.model, args.trace, args.layers, args.cache_size, args.prefetch,
                args.store_dir, args.device, args.threads)
    isolate = (not args.quick) if args.isolate is None else args.isolate
    started = time.perf_counter()
    results = run_plan(plan, isolate)
    command = "python -m moe_runtime.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": command.strip(), "machine": machine(), "plan": asdict(plan), "isolated": isolate,
            "variants": VARIANTS,
            "wall_seconds": time.perf_counter() - started, "date": time.strftime("%Y-%m-%d %H:%M")}
    print(write_reports(results, meta, args.out))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
