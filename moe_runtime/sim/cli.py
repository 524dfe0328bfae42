"""Replay a routing trace against expert-cache policies, and predict tokens/s on named hardware.

    python -m moe_runtime.sim TRACE [--cache-sizes 1,2,3] [--prefetch 0,2]
        [--policies lru,lfu,lfru,belady] [--hardware t4-pcie3,a100] [--json OUT] [--markdown OUT] [--html OUT]
    python -m moe_runtime.sim synth --out TRACE [--tokens 577] [--generations 4] [--seed 0]
        a Mixtral-like synthetic trace, from real Mixtral-8x7B-Instruct routing statistics (synth.py)
    python -m moe_runtime.sim scenario colab-t4 [--trace TRACE] [--cache-size 4] [--inclusive] [--host-policy P]
        [--json OUT]
        device slots <- host-RAM cache <- disk under a machine's budgets (scenario.py)
    python -m moe_runtime.sim host-policy [--trace TRACE] [--budgets 25,50,75,100] [--cache-size 4]
        [--levels exclusive,inclusive,single] [--host-policies quota-lfru,lru,belady] [--half-lives 16,64]
        [--json OUT] [--markdown OUT]
        host hit rates of the host-level policies against Belady and LRU (hierarchy.py)
    python -m moe_runtime.sim calibrate
        the throughput model against every row of the paper's Table 2
    python -m moe_runtime.sim fits [--hardware t4-pcie3,rtx3060,cpu-space] [--bits 2,4]
        which hub models fit where, as the engine builds them by default (predictions)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

from ..config import OffloadConfig
from ..policies import LayerClockFrequency, LayerQuota
from ..stats import RoutingTrace
from .hierarchy import HOST_SIM_POLICIES, LEVELS, host_policy_sweep
from .replay import SIM_POLICIES, check_trace, predict_throughput, sweep
from .report import fits_report, hit_rate_figure, host_policy_report, markdown_report, throughput_rows
from .scenario import SCENARIOS, run_scenario, scenario_report
from .synth import RoutingStats, synthesize
from .throughput import (
    HARDWARE,
    LAYER_OVERHEAD_S,
    MIXTRAL_LRU_HIT_RATES,
    MODELS,
    PAPER_PATH,
    PAPER_TABLE2,
    PATHS,
    paper_errors,
)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _name_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m moe_runtime.sim", description=__doc__.split("\n")[0])
    ap.add_argument("trace", help="routing trace JSON (RoutingTrace.save)")
    ap.add_argument("--cache-sizes", type=_int_list, help="default: 1..E-1")
    ap.add_argument("--prefetch", type=_int_list, help="experts prefetched per layer; default: 0,K")
    ap.add_argument("--policies", type=_name_list, default=list(SIM_POLICIES), help=", ".join(SIM_POLICIES))
    ap.add_argument("--hardware", type=_name_list, default=list(HARDWARE), help=", ".join(HARDWARE))
    ap.add_argument("--include-prefill", action="store_true", help="replay prompt tokens too (default: decode only)")
    ap.add_argument("--model", choices=list(MODELS), default="mixtral-8x7b", help="shape for the throughput model")
    ap.add_argument("--expert-bits", type=int, choices=(2, 3, 4, 8, 16), default=2, help="16 = fp16")
    ap.add_argument("--expert-group-size", type=int, default=16)
    ap.add_argument("--attn-bits", type=int, choices=(4, 8, 16), default=4, help="16 = fp16")
    ap.add_argument("--attn-group-size", type=int, default=64)
    ap.add_argument("--json", type=Path, help="write every result and prediction here")
    ap.add_argument("--markdown", type=Path, help="write the printed tables here")
    ap.add_argument("--html", type=Path, help="write a Plotly figure of hit rate vs cache size here")
    return ap


def _load_trace(path: str, include_prefill: bool) -> RoutingTrace:
    try:
        trace = RoutingTrace.load(path)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a valid routing trace: missing or malformed {err}") from None
    check_trace(trace)
    if not include_prefill:
        trace = trace.decode_only()
        if not trace.num_tokens:
            raise ValueError(f"{path} has no decode tokens: pass --include-prefill to replay its prompt tokens")
    return trace


def run(args: argparse.Namespace) -> str:
    trace = _load_trace(args.trace, args.include_prefill)
    unknown = [h for h in args.hardware if h not in HARDWARE]
    if unknown:
        raise ValueError(f"hardware={unknown[0]!r} is not allowed: use one of {', '.join(HARDWARE)}")
    for name in ("expert_group_size", "attn_group_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer")
    model = replace(MODELS[args.model], expert_bits=args.expert_bits, expert_group_size=args.expert_group_size,
                    attn_bits=args.attn_bits, attn_group_size=args.attn_group_size)
    hardware = [HARDWARE[h] for h in args.hardware]
    cache_sizes = args.cache_sizes or list(range(1, max(2, trace.num_experts)))
    prefetches = args.prefetch if args.prefetch is not None else sorted({0, min(trace.top_k, trace.num_experts)})
    results = sweep(trace, args.policies, cache_sizes, prefetches)
    report = markdown_report(trace, results, model, hardware, source=Path(args.trace).name)
    if args.markdown:
        args.markdown.write_text(report)
    if args.json:
        args.json.write_text(json.dumps(_json_report(args, trace, results, model, hardware), indent=1))
    if args.html:
        hit_rate_figure(results).write_html(args.html, include_plotlyjs=True)
    return report


def _json_report(args, trace, results, model, hardware) -> dict:
    best = {(r.prefetch, r.cache_size): r.hit_rate for r in results if r.policy == "belady"}
    rows = []
    for r in results:
        row = r.to_dict(model.expert_bytes)
        reference = best.get((r.prefetch, r.cache_size))
        if reference:
            row["ratio_to_belady"] = r.hit_rate / reference
        row["throughput"] = {h.name: predict_throughput(r, model, h).tokens_per_second for h in hardware}
        rows.append(row)
    return {
        "trace": {"path": str(args.trace), "model": trace.model, "num_layers": trace.num_layers,
                  "num_experts": trace.num_experts, "top_k": trace.top_k, "num_tokens": trace.num_tokens,
                  "include_prefill": args.include_prefill},
        "model": {**asdict(model), "expert_bytes": model.expert_bytes,
                  "resident_dense_bytes": model.resident_dense_bytes},
        "hardware": [asdict(h) for h in hardware],
        "results": rows,
        "throughput": throughput_rows(results, model, hardware),
        "paper_table2": [asdict(f) for f in PAPER_TABLE2],
    }


def _synth_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m moe_runtime.sim synth",
                                 description="Write a Mixtral-like synthetic routing trace (decode tokens).")
    ap.add_argument("--out", type=Path, required=True, help="trace JSON to write")
    ap.add_argument("--tokens", type=int, default=577, help="tokens in all (the statistics': 577)")
    ap.add_argument("--generations", type=int, default=4, help="independent generations (the statistics': 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stats", type=Path, help="routing statistics JSON (default: assets/mixtral-routing-stats.json)")
    return ap


def synth(args: argparse.Namespace) -> str:
    trace = synthesize(RoutingStats.load(args.stats), args.tokens, args.generations, args.seed)
    trace.save(args.out)
    return f"wrote {args.out}: {trace.model}, {trace.num_tokens} tokens, {trace.num_layers} layers\n"


def _scenario_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m moe_runtime.sim scenario",
                                 description="Three-level replay (device <- host RAM <- disk) under a machine's budgets.")
    ap.add_argument("name", choices=list(SCENARIOS))
    ap.add_argument("--trace", help="routing trace JSON (default: a Mixtral-like synthetic trace, seed 0)")
    ap.add_argument("--cache-size", type=int, help="device slots per layer (default: the scenario's)")
    ap.add_argument("--inclusive", action="store_true", help="host keeps what it sends to the device")
    ap.add_argument("--host-policy", choices=list(HOST_SIM_POLICIES),
                    help="the host level's policy (default: OffloadConfig's)")
    ap.add_argument("--json", type=Path, help="write the counters here")
    return ap


def scenario(args: argparse.Namespace) -> str:
    if args.trace:
        trace = _load_trace(args.trace, include_prefill=False)
    else:
        trace = synthesize(RoutingStats.load())
    out = run_scenario(args.name, trace, cache_size=args.cache_size, exclusive=not args.inclusive,
                       host_policy=args.host_policy)
    if args.json:
        r = out.result
        args.json.write_text(json.dumps({
            **asdict(r), "peak_host_bytes": out.peak_host_bytes, "host_budget_bytes": out.host_budget_bytes,
            "device_free_bytes": out.device_free_bytes, "fits_cache_size": out.fits_cache_size,
            "tokens_per_second": out.tokens_per_second, "cold_tokens_per_second": out.cold_tokens_per_second,
            "predictions": {name: asdict(p) for name, p in out.predictions.items()},
            "paths": {name: asdict(PATHS[name]) for name in out.predictions},
            "model": {**asdict(out.model), "expert_bytes": out.model.expert_bytes},
            "scenario": asdict(out.scenario), "trace": out.trace_name}, indent=1))
    return scenario_report(out)


def _host_policy_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m moe_runtime.sim host-policy",
                                 description="Host hit rates of the host-level eviction policies against Belady.")
    ap.add_argument("--trace", help="routing trace JSON (default: a Mixtral-like synthetic trace, seed 0)")
    ap.add_argument("--budgets", type=_int_list, default=[25, 50, 75, 100],
                    help="host budgets, in %% of all L x E experts")
    ap.add_argument("--cache-size", type=int, default=4, help="device slots per layer above the host level")
    ap.add_argument("--levels", type=_name_list, default=list(LEVELS), help=", ".join(LEVELS))
    ap.add_argument("--host-policies", type=_name_list, default=list(HOST_SIM_POLICIES),
                    help=", ".join(HOST_SIM_POLICIES))
    ap.add_argument("--half-lives", type=_int_list, default=[],
                    help="also quota-lfru with these half-lives (events of a layer), as quota-lfru/hN")
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--markdown", type=Path, help="write the printed tables here")
    return ap


def host_policy(args: argparse.Namespace) -> str:
    trace = _load_trace(args.trace, include_prefill=False) if args.trace else synthesize(RoutingStats.load())
    for level in args.levels:
        if level not in LEVELS:
            raise ValueError(f"level={level!r} is not allowed: use one of {', '.join(LEVELS)}")
    if args.levels != ["single"] and not 1 <= args.cache_size <= trace.num_experts:
        raise ValueError(f"--cache-size {args.cache_size} is not allowed: use 1..{trace.num_experts}")
    extra = {f"quota-lfru/h{h}": _quota_lfru_factory(h) for h in args.half_lives}
    rows = host_policy_sweep(trace, [b / 100 for b in args.budgets], [*args.host_policies, *extra],
                             levels=args.levels, cache_size=args.cache_size, extra_policies=extra)
    if args.json:
        args.json.write_text(json.dumps([{**asdict(r), "hit_rate": r.hit_rate} for r in rows], indent=1))
    source = Path(args.trace).name if args.trace else "Mixtral-like synthetic routing (seed 0)"
    report = host_policy_report(rows, trace, args.cache_size, source)
    if args.markdown:
        args.markdown.write_text(report)
    return report


def _quota_lfru_factory(half_life: int):
    if half_life < 1:
        raise ValueError(f"--half-lives {half_life} is not allowed: use integers >= 1")

    def factory(num_layers: int, num_experts: int, slots: int):
        return LayerQuota(num_layers, slots, LayerClockFrequency(num_layers, float(half_life), insert_weight=1.0))

    return factory


def _fits_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m moe_runtime.sim fits",
                                 description="Which hub models fit where, as the engine builds them by default.")
    ap.add_argument("--hardware", type=_name_list, default=["t4-pcie3", "rtx3060", "cpu-space"],
                    help=", ".join(HARDWARE))
    ap.add_argument("--bits", type=_int_list, default=[2, 4], help="expert bits (attention: 4-bit)")
    return ap


def fits(args: argparse.Namespace) -> str:
    unknown = [h for h in args.hardware if h not in HARDWARE]
    if unknown:
        raise ValueError(f"hardware={unknown[0]!r} is not allowed: use one of {', '.join(HARDWARE)}")
    shapes = []
    for name in MODELS:
        for bits in args.bits:
            config = OffloadConfig(expert_bits=bits, attn_bits=4)  # ValueError names the allowed bits
            shapes.append(replace(MODELS[name], expert_bits=bits, expert_group_size=config.expert_group, attn_bits=4,
                                  attn_group_size=config.attn_group_size))
    return fits_report(shapes, [HARDWARE[h] for h in args.hardware])


def calibrate(_args) -> str:
    model = MODELS["mixtral-8x7b"]
    lines = ["## Throughput model against the paper's Table 2 (Mixtral-8x7B, 2-bit experts, 4-bit attention)", "",
             f"Per-layer overhead fitted to the T4 full-method row: {LAYER_OVERHEAD_S * 1e3:.2f} ms, on the paper's "
             f"own path ({PAPER_PATH.source}). Loads per layer: accelerate moves all {model.num_experts} experts; the "
             "full method misses 2 x (1 - LRU hit rate of real Mixtral routing at its cache size) and writes each "
             "evicted expert back in series; speculative prefetch is not modelled.", "",
             "| hardware | method | cache | paper tok/s | predicted | error |", "|---|---|---:|---:|---:|---:|"]
    for r in paper_errors(model, MIXTRAL_LRU_HIT_RATES):
        error = "fitted" if r["fitted"] else f"{r['error']:+.0%}"
        lines.append(f"| {r['hardware']} | {r['method']} | {r['cache_size'] or '-'} | {r['paper']:.2f} | "
                     f"{r['predicted']:.2f} | {error} |")
    return "\n".join(lines) + "\n"


SUBCOMMANDS = {"synth": (_synth_parser, synth), "scenario": (_scenario_parser, scenario),
               "host-policy": (_host_policy_parser, host_policy), "fits": (_fits_parser, fits),
               "calibrate": (lambda: argparse.ArgumentParser(prog="python -m moe_runtime.sim calibrate"), calibrate)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        make_parser, command = SUBCOMMANDS[argv[0]]
        args, command = make_parser().parse_args(argv[1:]), command
    else:
        args, command = _parser().parse_args(argv), run
    try:
        print(command(args), end="")
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
