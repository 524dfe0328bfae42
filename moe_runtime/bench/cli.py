"""Decode-speed benchmark: accelerate's offloading vs. the engine without cache, with an LRU cache,
with cache + speculative prefetch, and with every expert resident.

    python -m moe_runtime.bench [--quick] [--out bench-results] [--parts model,workload-2bit,workload-16bit]
    python -m moe_runtime.bench --parts kernels          # one Mixtral-shaped expert FFN per compute format
    python -m moe_runtime.bench --record-trace assets/traces/tiny-mixtral.json [--model assets/tiny-mixtral]
    python -m moe_runtime.bench --shape qwen3-30b-a3b --expert-bits 2   # a hub-shaped model of random weights

Parts (each a table in bench.md, a group of rows in bench.json, a panel in bench.html):
  model            a real checkpoint (default assets/tiny-mixtral). Every variant decodes the same
                   tokens: teacher-forced, each step feeds the next token of a fixed text, so the
                   routing is the same for all of them.
  workload-2bit    the Mixtral-8x7B-shaped stack of workload.py (2-bit experts, group 32, 8-bit meta),
  workload-4bit    the same with 4-bit experts (group 64),
  workload-16bit   and with 16-bit experts, replaying a recorded routing trace.
  shape            (with --shape NAME) a full model in a family's hub shape (bench/hub_shapes.py), all layers,
                   random weights written straight into a store in the target's form (bench/shape.py), loaded
                   with `moe_runtime.load` as a user would and decoded (random tokens, teacher-forced):
                   resident (every expert in RAM) and lru+host-half (the disk store under a host budget of
                   half the experts; also lru+host, lru+host-quarter with --variants). --max-rss-gb refuses
                   a variant predicted to need more RAM, with the numbers.
  kernels          not a decode run: one expert FFN (H 4096, I 14336; small with --quick) at batch 1
                   per compute format (hqq's dequantize path, the fused kernels, dense fp32/bf16), as
                   ratios (kernels/bench.py); written to kernels.md and kernels.json.

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
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..kernels.bench import DEFAULT_GROUP
from ..paths import EMBEDDED_MODEL_DIR, REPO_ROOT, SHIPPED_TRACE
from .measure import Job, failed
from .runners import run_job

MIXTRAL_DIMS = {"hidden": 4096, "intermediate": 14336}
QUICK_DIMS = {"hidden": 256, "intermediate": 512}

VARIANTS = {
    "accelerate": "accelerate's disk offloading of transformers' Mixtral experts (16-bit; moves all E "
                  "experts of a layer, which are one parameter)",
    "accelerate-per-expert": "accelerate's disk offloading, one module per expert (moves only the routed experts)",
    "no-cache": "ours, every selected expert read from disk on every use (cache emptied before each token)",
    "lru": "ours, LRU cache of C experts per layer",
    "lru+prefetch": "ours, LRU cache + speculative prefetch of P experts one layer ahead",
    "lru+host": "ours, lru+prefetch with a host-RAM cache of every record below it (each read from disk once; on a "
                "CPU the experts compute in that cache)",
    "lru+host-half": "ours, lru+host with a host budget of half the experts (the rest read from disk again)",
    "lru+host-quarter": "ours, lru+host with a host budget of a quarter of the experts (shape part)",
    "resident": "ours, cache of all E experts, loaded before timing (the limit)",
    "transformers": "plain transformers model, every weight in memory",
}
ENGINE_VARIANTS = ("no-cache", "lru", "lru+prefetch", "lru+host", "lru+host-half", "resident")
WORKLOAD_PARTS = {"workload-16bit": None, "workload-2bit": 2, "workload-4bit": 4}  # part -> expert bits
SHAPE_VARIANTS = ("resident", "lru+host", "lru+host-half", "lru+host-quarter")
PARTS = ("model", *WORKLOAD_PARTS, "shape", "kernels")


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
    variants: tuple[str, ...] = ()  # only these (all when empty)
    expert_bits: int | None = None  # the model and shape parts' experts (None: as in the checkpoint / 16-bit)
    shape: str = ""  # the shape part's hub shape (bench/hub_shapes.py)
    max_rss_gb: float | None = None  # the shape part: refuse variants predicted to need more RAM
    routing: str = "model"  # the shape part's routing (bench/shape.py ROUTINGS)
    attn_bits: int | None = None  # the shape part's attention (OffloadConfig.attn_bits)

    def jobs(self) -> list[Job]:
        return [job for job in self._all_jobs() if not self.variants or job.variant in self.variants]

    def _all_jobs(self) -> list[Job]:
        jobs = []
        common = dict(cache_size=self.cache_size, prefetch=self.prefetch, store_dir=self.store_dir, device=self.device,
                      threads=self.threads)
        if "model" in self.parts:
            prompt, warm, tokens = (8, 2, 4) if self.quick else (32, 16, 192)
            positions = json.loads((Path(self.model) / "config.json").read_text()).get("max_position_embeddings")
            if positions:  # the fixed text must fit the model's context
                tokens = max(1, min(tokens, positions - prompt - warm - 1))
            for v in ("accelerate", *(v for v in ENGINE_VARIANTS if v != "lru+host-half"), "transformers"):
                bits = None if v in ("accelerate", "transformers") else self.expert_bits
                jobs.append(Job("model", v, warm, tokens, model=self.model, prompt_tokens=prompt, expert_bits=bits,
                                **common))
        if "shape" in self.parts:
            prompt, warm, tokens = (8, 2, 4) if self.quick else (16, 8, 32)
            for v in [v for v in SHAPE_VARIANTS if v in self.variants] or ["resident", "lru+host-half"]:
                jobs.append(Job("shape", v, warm, tokens, prompt_tokens=prompt, expert_bits=self.expert_bits,
                                shape=self.shape, max_rss_gb=self.max_rss_gb, routing=self.routing, attn_bits=self.attn_bits, **common))
        dims = QUICK_DIMS if self.quick else MIXTRAL_DIMS
        for part, bits in WORKLOAD_PARTS.items():
            if part not in self.parts:
                continue
            spec = {**dims, "layers": self.layers, "bits": bits, **self._trace_shape()}
            if bits:
                spec["group_size"] = DEFAULT_GROUP[bits]
            variants = list(ENGINE_VARIANTS)
            if bits is None or "workload-16bit" not in self.parts:  # accelerate moves 16-bit weights either way
                variants = ["accelerate", "accelerate-per-expert", *variants]
            for v in variants:
                w, t = (2, 6) if self.quick else self._full_tokens(v, bits)
                job_spec = {**spec, "bits": None} if v.startswith("accelerate") else spec
                jobs.append(Job(part, v, w, t, trace=self.trace, spec=job_spec, **common))
        return [j for j in jobs if not self.variants or j.variant in self.variants]

    @staticmethod
    def _full_tokens(variant: str, bits: int | None) -> tuple[int, int]:
        """(warm-up, timed) decode steps, sized so the full run fits ~15 minutes on 2 CPU cores:
        accelerate reads 2-8 experts per layer for every token (3-10 s/token here), so it gets few
        tokens (its per-token time barely varies); cache hit rates come from the longer runs."""
        if variant == "accelerate":
            return 1, 4
        if variant == "accelerate-per-expert":
            return 1, 6
        if variant == "no-cache":
            return 2, 12
        return 8, 48

    def _trace_shape(self) -> dict:
        from ..stats import RoutingTrace

        trace = RoutingTrace.load(self.trace)
        return {"experts": trace.num_experts, "top_k": trace.top_k}


def run_isolated(job: Job) -> dict:
    """Run `job` in a fresh Python process, so its peak RSS is its own."""
    with tempfile.TemporaryDirectory() as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps(asdict(job)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([sys.executable, "-m", "moe_runtime.bench", "--worker", str(job_file),
                               "--result", str(result_file)], env=env, stdout=subprocess.PIPE, text=True)
        # stderr (progress bars) stays on the terminal: the worker writes its own error, traceback
        # included, into the result file; only a worker that died without one lands here
        if result_file.exists():
            return json.loads(result_file.read_text())
        return failed(job, f"worker exited with {proc.returncode} and no result: {proc.stdout[-2000:]}")


def run_plan(plan: Plan, isolate: bool) -> list[dict]:
    results = []
    for job in tqdm(plan.jobs(), desc="variants", unit="variant"):
        if isolate:
            results.append(run_isolated(job))
            continue
        try:
            results.append(run_job(job))
        except Exception:  # one failing variant is reported, the others still run
            results.append(failed(job, traceback.format_exc()))
    return results


def run_kernels(quick: bool, device: str, threads: int, out: Path) -> str:
    """The kernels part: kernels/bench.py's table, also written to out/kernels.md and kernels.json."""
    import torch

    from ..kernels.bench import expert_formats, to_markdown

    torch.set_num_threads(threads)
    dims = QUICK_DIMS if quick else MIXTRAL_DIMS
    rows = expert_formats(dims["hidden"], dims["intermediate"], batch=1, repeats=3 if quick else 10,
                          hqq_repeats=1 if quick else 3, device=device)
    table = to_markdown(rows, f"One expert FFN (H {dims['hidden']}, I {dims['intermediate']}), batch 1, {device}, "
                              f"{threads} threads")
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.md").write_text(table + "\n")
    (out / "kernels.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1) + "\n")
    return table


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


def _shape_names() -> list[str]:
    from .hub_shapes import HUB_SHAPES

    return list(HUB_SHAPES)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m moe_runtime.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small dimensions and few tokens (CI)")
    ap.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for bench.json/.md/.html")
    ap.add_argument("--parts", default=None,
                    help="comma-separated: " + ", ".join(PARTS) + " (default: model,workload-16bit,workload-2bit; "
                    "shape with --shape)")
    ap.add_argument("--variants", default="", help="comma-separated: run only these variants (default: all); "
                    "one of " + ", ".join(VARIANTS))
    ap.add_argument("--model", default=_shown(EMBEDDED_MODEL_DIR), help="checkpoint folder of the model part")
    ap.add_argument("--expert-bits", type=int, choices=(2, 3, 4, 8),
                    help="HQQ experts for the engine's variants of the model and shape parts (default: unquantized)")
    ap.add_argument("--shape", default="", metavar="NAME",
                    help="the shape part's hub shape: one of " + ", ".join(_shape_names()))
    ap.add_argument("--max-rss-gb", type=float, default=None,
                    help="shape part: refuse (report, not run) a variant predicted to need more RAM than this")
    ap.add_argument("--shape-routing", choices=("model", "uniform"), default="model",
                    help="shape part: the random routers' own choice (little changes between tokens: a cache's "
                         "best case) or top-k experts drawn uniformly per token (no locality: its worst case)")
    ap.add_argument("--attn-bits", type=int, choices=(4, 8), default=None,
                    help="shape part: HQQ-quantize attention when loading (OffloadConfig.attn_bits; default: bf16)")
    ap.add_argument("--trace", default=_shown(SHIPPED_TRACE), help="routing trace the workload replays")
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
            result = failed(job, traceback.format_exc())
        args.result.write_text(json.dumps(result))
        return 1 if "error" in result else 0
    if args.record_trace:
        from .model import record_trace

        path = record_trace(args.model, args.record_trace, store_dir=args.store_dir)
        print(f"routing trace written to {path}")
        return 0
    from .report import write_reports

    if args.from_json:
        report = json.loads(args.from_json.read_text())
        print(write_reports(report["results"], report["meta"], args.out))
        return 0
    default_parts = "shape" if args.shape else "model,workload-16bit,workload-2bit"
    parts = [p.strip() for p in (args.parts or default_parts).split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        print(f"error: --parts {unknown[0]!r} is not allowed: use {', '.join(PARTS)}", file=sys.stderr)
        return 2
    if ("shape" in parts) != bool(args.shape):
        print("error: the shape part and --shape NAME go together: --shape " + (args.shape or "is missing"),
              file=sys.stderr)
        return 2
    if args.shape and args.shape not in _shape_names():
        print(f"error: --shape {args.shape!r} is not allowed: use one of {', '.join(_shape_names())}", file=sys.stderr)
        return 2
    if "kernels" in parts:
        parts.remove("kernels")
        print(run_kernels(args.quick, args.device, args.threads, args.out))
        if not parts:
            return 0
    if "model" in parts and not (Path(args.model) / "config.json").exists():
        print(f"note: no checkpoint at {args.model}; skipping the model part", file=sys.stderr)
        parts.remove("model")
    if any(p.startswith("workload") for p in parts) and not Path(args.trace).exists():
        print(f"error: no routing trace at {args.trace}: record one with --record-trace", file=sys.stderr)
        return 2
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if any(v not in VARIANTS for v in variants):
        print(f"error: --variants {args.variants!r} is not allowed: use some of {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    plan = Plan(parts, args.quick, args.model, args.trace, args.layers, args.cache_size, args.prefetch,
                args.store_dir, args.device, args.threads, variants, args.expert_bits, args.shape, args.max_rss_gb,
                args.shape_routing, args.attn_bits)
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

