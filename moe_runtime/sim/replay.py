"""Replay a routing trace against expert-cache policies, and predict tokens/s on named hardware.

    python -m moe_runtime.simulate TRACE [--cache-sizes 1,2,3] [--prefetch 0,2]
        [--policies lru,lfu,lfru,belady] [--hardware t4-pcie3,a100] [--json OUT] [--markdown OUT] [--html OUT]

Dimension names: L layers, E experts per layer, K experts per token (top-k), T tokens, C cache slots
per layer, P experts prefetched per layer (the top-P of the guess).

Per token and layer, in this order (experts.py runs a layer's experts in the same order):
  1. prefetch: the top-P guessed experts that are not resident are loaded; the guessed experts already
     resident or just prefetched are pinned, so a prefetch never evicts its own guesses (when every
     resident expert is pinned, the remaining guesses are skipped);
  2. the token's K experts run in ascending id, the resident ones (hits; a prefetched expert that is
     used is a hit: no stall) first, then each missing one is loaded (a miss). The victim is chosen
     among the resident experts this token does not need. When C < K the experts run one at a time
     and any resident expert may be evicted (this token's resident ones have already run).
Belady's MIN (evict the expert whose next use is farthest away) needs the future, so it lives here,
not in policies.py; with prefetch its prefetch loads use the MIN victim too. Without prefetch and with
C >= K it is the optimum, an upper bound for every policy (the tests check it against exhaustive
search). With prefetch (forced loads) or C < K (forced load order) it is a strong reference, not a bound.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from moe_runtime.policies import POLICIES, EvictionPolicy, make_policy
from moe_runtime.stats import CacheRates, RoutingTrace
from moe_runtime.throughput import (  # noqa: F401  (re-exported: the simulator's public API)
    GB,
    HARDWARE,
    MODELS,
    PAPER_TABLE2,
    HardwareProfile,
    ModelShape,
    PaperFigure,
    Throughput,
    fitting_cache_size,
    predict_from_loads,
)

SIM_POLICIES = (*POLICIES, "belady")


# --- cache replay ------------------------------------------------------------------------------
class Belady(EvictionPolicy):
    """MIN: evict the key whose next use is farthest in the future (never used again: first)."""

    def __init__(self, next_use: list[list[float]]) -> None:
        super().__init__()
        self.next_use = next_use  # next_use[t][e]: first token >= t that selects e (inf if none)
        self.now = 0

    def _access(self, key: int) -> None:
        pass

    def _forget(self, key: int) -> None:
        pass

    def _rank(self, key: int):
        return -self.next_use[self.now][key]


def _next_use_table(selected: list[list[int]], num_experts: int) -> list[list[float]]:
    table = [[math.inf] * num_experts]
    for t in range(len(selected) - 1, -1, -1):
        row = list(table[-1])
        for e in selected[t]:
            row[e] = t
        table.append(row)
    return table[::-1]  # (T+1, E)


class _LayerCache:
    """One layer's resident set, ranked by a policy, with the counters of the replay."""

    def __init__(self, policy: EvictionPolicy, size: int) -> None:
        self.policy, self.size = policy, size
        self.resident: set[int] = set()
        self.unused_prefetch: set[int] = set()
        self.hits = self.misses = self.prefetch_loads = self.prefetch_used = 0

    def _load(self, key: int, candidates: set[int]) -> bool:
        if len(self.resident) >= self.size:
            if not candidates:
                return False
            victim = self.policy.victim(sorted(candidates))  # sorted: ties break the same every run
            self.policy.evict(victim)
            self.resident.discard(victim)
            self.unused_prefetch.discard(victim)
        self.resident.add(key)
        self.policy.insert(key)
        return True

    def prefetch(self, guessed: list[int]) -> None:
        pinned = self.resident.intersection(guessed)
        for e in guessed:
            if e in self.resident:
                continue
            if not self._load(e, self.resident - pinned):
                return
            pinned.add(e)
            self.unused_prefetch.add(e)
            self.prefetch_loads += 1

    def run(self, needed: list[int]) -> None:
        needed = sorted(needed)  # the engine's dispatch order (torch.unique), resident ones first
        missing = [e for e in needed if e not in self.resident]
        for e in needed:
            if e in self.resident:
                self.hits += 1
                self.policy.access(e)
                if e in self.unused_prefetch:
                    self.unused_prefetch.discard(e)
                    self.prefetch_used += 1
        # C >= K: the token's experts stay pinned; C < K: they run one at a time, so once run any
        # of them may make room for the next.
        pinned = set(needed) if self.size >= len(needed) else set()
        for e in missing:
            self.misses += 1
            self._load(e, self.resident - pinned)
            self.policy.access(e)


@dataclass
class SimResult(CacheRates):
    """Counters of one replay; lists are indexed by layer."""

    policy: str
    cache_size: int
    prefetch: int
    num_tokens: int
    hits: list[int]
    misses: list[int]
    prefetch_loads: list[int]
    prefetch_used: list[int]
    guess_hits: list[int]
    guess_total: list[int]

    @property
    def num_layers(self) -> int:
        return len(self.hits)

    @property
    def selections(self) -> list[int]:
        return [h + m for h, m in zip(self.hits, self.misses)]

    @property
    def loads(self) -> list[int]:
        """Experts moved per layer: demand loads (misses) plus prefetch loads."""
        return [m + p for m, p in zip(self.misses, self.prefetch_loads)]

    @property
    def prefetch_recall(self) -> float | None:
        """Fraction of selected experts (at layers with a guess) that were in the top-P guess."""
        total = sum(self.guess_total)
        return sum(self.guess_hits) / total if total else None

    @property
    def wasted_prefetch(self) -> int:
        """Prefetch loads never used (evicted first, or still unused when the trace ends)."""
        return sum(self.prefetch_loads) - sum(self.prefetch_used)

    def per_layer_token(self, counts: list[int]) -> float:
        """Mean of a per-layer counter over layers and tokens."""
        return sum(counts) / (self.num_layers * self.num_tokens) if self.num_tokens else 0.0

    def to_dict(self, expert_bytes: int | None = None) -> dict:
        out = asdict(self)
        out.update(hit_rate=self.hit_rate, loads=sum(self.loads), prefetch_recall=self.prefetch_recall,
                   wasted_prefetch=self.wasted_prefetch)
        if expert_bytes is not None:
            out["bytes_loaded"] = sum(self.loads) * expert_bytes
        return out


def check_trace(trace: RoutingTrace) -> None:
    """Raise ValueError naming the first malformed part of a trace."""
    shape = {"num_layers": trace.num_layers, "num_experts": trace.num_experts, "top_k": trace.top_k}
    for name, value in shape.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"trace {name}={value!r}: expected a positive integer")
    n_experts, top_k, n_tokens = trace.num_experts, trace.top_k, trace.num_tokens
    if top_k > n_experts:
        raise ValueError(f"trace top_k={top_k} exceeds num_experts={n_experts}")
    for key in ("selected", "guess"):
        layers = getattr(trace, key)
        if not isinstance(layers, list) or len(layers) != trace.num_layers:
            raise ValueError(f"trace '{key}' must be a list of {trace.num_layers} layers")
        for i, layer in enumerate(layers):
            if key == "guess" and layer == []:
                continue  # this layer has no guess (layer 0, or a trace recorded without prefetch)
            if not isinstance(layer, list) or len(layer) != n_tokens:
                raise ValueError(f"trace {key}[{i}] must list {n_tokens} tokens, like layer 0")
            for n, experts in enumerate(layer):
                if not _are_expert_ids(experts, n_experts) or (key == "selected" and (
                        len(experts) != top_k or len(set(experts)) != top_k)):
                    want = f"{top_k} distinct expert ids" if key == "selected" else "expert ids"
                    raise ValueError(f"trace {key}[{i}][{n}]={experts!r}: expected {want} in 0..{n_experts - 1}")
    if trace.phase and (not isinstance(trace.phase, list) or len(trace.phase) != n_tokens
                        or not set(trace.phase) <= {"prefill", "decode"}):
        raise ValueError(f"trace 'phase' must list 'prefill' or 'decode' for each of the {n_tokens} tokens")


def _are_expert_ids(experts, n_experts: int) -> bool:
    return isinstance(experts, list) and all(
        isinstance(e, int) and not isinstance(e, bool) and 0 <= e < n_experts for e in experts)


def simulate(trace: RoutingTrace, policy: str, cache_size: int, prefetch: int = 0) -> SimResult:
    """Replay every token of `trace` against one cache of `cache_size` experts per layer."""
    check_trace(trace)
    _check_knobs(trace, [policy], [cache_size], [prefetch])
    return _simulate(trace, policy, cache_size, prefetch)


def sweep(trace: RoutingTrace, policies, cache_sizes, prefetches) -> list[SimResult]:
    """`simulate` over a grid (policy-major order), checking the trace once."""
    check_trace(trace)
    _check_knobs(trace, policies, cache_sizes, prefetches)
    return [_simulate(trace, name, c, p) for name in policies for p in prefetches for c in cache_sizes]


def _check_knobs(trace: RoutingTrace, policies, cache_sizes, prefetches) -> None:
    n_experts = trace.num_experts
    for name in policies:
        if name not in SIM_POLICIES:
            raise ValueError(f"policy={name!r} is not allowed: use one of {', '.join(SIM_POLICIES)}")
    for c in cache_sizes:
        if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= n_experts:
            raise ValueError(f"cache_size={c!r} is not allowed: use 1..{n_experts} (experts per layer)")
    for p in prefetches:
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= n_experts:
            raise ValueError(f"prefetch={p!r} is not allowed: use 0..{n_experts}")


def _simulate(trace: RoutingTrace, policy: str, cache_size: int, prefetch: int) -> SimResult:
    per_layer = [_replay_layer(selected, guess, policy, cache_size, prefetch, trace.num_experts)
                 for selected, guess in zip(trace.selected, trace.guess)]
    hits, misses, prefetch_loads, prefetch_used, guess_hits, guess_total = (list(c) for c in zip(*per_layer))
    return SimResult(policy, cache_size, prefetch, trace.num_tokens, hits, misses, prefetch_loads,
                     prefetch_used, guess_hits, guess_total)


def _replay_layer(selected, guess, policy: str, cache_size: int, prefetch: int, num_experts: int):
    belady = Belady(_next_use_table(selected, num_experts)) if policy == "belady" else None
    cache = _LayerCache(belady or make_policy(policy), cache_size)
    guess_hits = guess_total = 0
    for t, needed in enumerate(selected):
        guessed = list(dict.fromkeys(guess[t]))[:prefetch] if prefetch and guess else []
        if guessed:
            if belady:
                belady.now = t  # this token's own experts are still ahead
            cache.prefetch(guessed)
            guess_total += len(needed)
            guess_hits += len(set(needed).intersection(guessed))
        if belady:
            belady.now = t + 1
        cache.run(needed)
    return cache.hits, cache.misses, cache.prefetch_loads, cache.prefetch_used, guess_hits, guess_total


def predict_throughput(result: SimResult, model: ModelShape, hardware: HardwareProfile) -> Throughput:
    """Apply a replay's mean loads per layer and token to `model` on `hardware`."""
    return predict_from_loads(model, hardware, result.per_layer_token(result.misses),
                              result.per_layer_token(result.prefetch_loads))


# --- reports -----------------------------------------------------------------------------------
def _by_key(results: list[SimResult]) -> dict[tuple[str, int, int], SimResult]:
    return {(r.policy, r.prefetch, r.cache_size): r for r in results}


def _grid_table(results: list[SimResult], cell) -> list[str]:
    sizes = sorted({r.cache_size for r in results})
    rows = dict.fromkeys((r.policy, r.prefetch) for r in results)
    table = _by_key(results)
    lines = ["| policy | prefetch | " + " | ".join(f"C={c}" for c in sizes) + " |",
             "|---|---:|" + "---:|" * len(sizes)]
    for policy, p in rows:
        cells = [cell(table[policy, p, c], table.get(("belady", p, c))) for c in sizes]
        lines.append(f"| {policy} | {p} | " + " | ".join(cells) + " |")
    return lines


def _hit_cell(r: SimResult, best: SimResult | None) -> str:
    if best is None or r.policy == "belady":
        return f"{r.hit_rate:.3f}"
    ratio = r.hit_rate / best.hit_rate if best.hit_rate else float("nan")
    return f"{r.hit_rate:.3f} ({ratio:.2f})"


def _load_cell(r: SimResult, _best) -> str:
    text = f"{r.per_layer_token(r.loads):.2f}"
    loads = sum(r.prefetch_loads)
    return f"{text} ({r.wasted_prefetch / loads:.0%} wasted)" if loads else text


def throughput_rows(results: list[SimResult], model: ModelShape, hardware: list[HardwareProfile]) -> list[dict]:
    """Per hardware: predictions at the largest simulated cache size that fits its memory."""
    rows = []
    for hw in hardware:
        fit = fitting_cache_size(model, hw)
        sizes = [c for c in sorted({r.cache_size for r in results}) if c <= fit]
        configs = []
        if fit >= model.num_experts:
            configs.append(("all experts resident", fit, predict_from_loads(model, hw, 0.0)))
        elif sizes:
            configs += [(f"{r.policy}, prefetch {r.prefetch}", r.cache_size, predict_throughput(r, model, hw))
                        for r in results if r.cache_size == sizes[-1]]
        configs.append(("load all E experts of every layer (accelerate-like)", 0,
                        predict_from_loads(model, hw, float(model.num_experts))))
        for config, cache_size, tp in configs:
            paper = [f for f in PAPER_TABLE2 if f.hardware == hw.name and _paper_applies(model, config, f)]
            rows.append({"hardware": hw.name, "fits_cache_size": fit, "cache_size": cache_size,
                         "config": config, "tokens_per_second": tp.tokens_per_second,
                         "compute_s": tp.compute_s, "stall_s": tp.demand_stall_s + tp.prefetch_stall_s,
                         "paper_table2": paper[0].tokens_per_second if paper else None,
                         "paper_method": paper[0].method if paper else None})
    return rows


def _paper_applies(model: ModelShape, config: str, figure: PaperFigure) -> bool:
    paper_setting = (model.name, model.expert_bits, model.expert_group_size, model.attn_bits) == (
        "mixtral-8x7b", 2, 16, 4)
    if not paper_setting:
        return False
    if figure.method.startswith("naive"):
        return config.startswith("load all")
    return config.startswith("lru") and not config.endswith("prefetch 0")


def markdown_report(trace: RoutingTrace, results: list[SimResult], model: ModelShape,
                    hardware: list[HardwareProfile], source: str = "") -> str:
    recalls = {r.prefetch: r.prefetch_recall for r in results if r.prefetch_recall is not None}
    lines = [f"## Expert cache replay: {source or trace.model or 'trace'}", "",
             (f"{trace.num_tokens} tokens, L={trace.num_layers} layers, E={trace.num_experts} experts, "
              f"top-{trace.top_k}; one cache of C experts per layer."), "",
             "Hit rate (ratio to Belady's MIN at the same prefetch):", "", *_grid_table(results, _hit_cell), "",
             "Experts loaded per layer and token (share of prefetch loads never used):", "",
             *_grid_table(results, _load_cell), ""]
    lines += [f"Prefetch top-{p} recall (selected experts that were guessed, layers with a guess): {v:.3f}"
              for p, v in sorted(recalls.items())]
    if any(r.prefetch for r in results) and not recalls:
        lines.append("The trace holds no prefetch guesses: rows with prefetch > 0 equal prefetch 0.")
    lines += ["", (f"### Predicted decode throughput: {model.name}, {model.expert_bits}-bit experts "
                   f"(group {model.expert_group_size}), {model.attn_bits}-bit attention"), "",
              f"Model: {model.expert_bytes / 1e6:.1f} MB per expert, {model.resident_dense_bytes / GB:.2f} GB "
              "dense weights. Assumed bandwidths (link = host/disk to device, device = resident weights): "
              + "; ".join(f"{h.name} {h.link_gbs:g} / {h.device_gbs:g} GB/s, {h.memory_gb:g} GB ({h.notes})"
                          for h in hardware) + ".",
              ("Time per token = (dense + active expert bytes) / device bandwidth + misses x expert bytes / link "
               "bandwidth; prefetch loads are hidden up to one layer's compute. Spec-sheet peaks and mean "
               "loads make these optimistic bounds; the trace's per-layer hit rates are applied to the model's "
               "layers. Paper, Table 2 values were measured by its authors, not by us."), "",
              "| hardware | C (fits) | configuration | predicted tok/s | stall s/token | paper, Table 2 tok/s |",
              "|---|---:|---|---:|---:|---|"]
    for row in throughput_rows(results, model, hardware):
        paper = f"{row['paper_table2']:.2f} ({row['paper_method']})" if row["paper_table2"] else ""
        lines.append(f"| {row['hardware']} | {row['cache_size'] or '-'} ({row['fits_cache_size']}) | "
                     f"{row['config']} | {row['tokens_per_second']:.2f} | {row['stall_s']:.3f} | {paper} |")
    if trace.num_experts != model.num_experts or trace.top_k != model.top_k:
        lines += ["", (f"Note: the trace has E={trace.num_experts}, top-{trace.top_k}; {model.name} has "
                       f"E={model.num_experts}, top-{model.top_k}, so the prediction borrows hit rates across shapes.")]
    return "\n".join(lines) + "\n"


def hit_rate_figure(results: list[SimResult]):
    """Plotly figure: hit rate vs cache size, one line per policy, one panel per prefetch value."""
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:
        raise ValueError("--html needs plotly: pip install plotly") from None
    prefetches = sorted({r.prefetch for r in results})
    fig = make_subplots(rows=1, cols=len(prefetches), shared_yaxes=True,
                        subplot_titles=[f"prefetch {p}" for p in prefetches])
    colors = dict(zip(SIM_POLICIES, ("#1f77b4", "#ff7f0e", "#2ca02c", "#444444")))
    for col, p in enumerate(prefetches, start=1):
        for policy in dict.fromkeys(r.policy for r in results):
            points = sorted((r.cache_size, r.hit_rate) for r in results if r.policy == policy and r.prefetch == p)
            fig.add_trace(go.Scatter(
                x=[c for c, _ in points], y=[h for _, h in points], name=policy, legendgroup=policy,
                showlegend=col == 1, mode="lines+markers",
                line={"color": colors[policy], "dash": "dash" if policy == "belady" else "solid"}), row=1, col=col)
        fig.update_xaxes(title_text="cache size (experts per layer)", dtick=1, row=1, col=col)
    fig.update_yaxes(title_text="hit rate", range=[0, 1], row=1, col=1)
    fig.update_layout(title="Expert cache hit rate by policy (Belady's MIN dashed)", template="plotly_white")
    return fig


# --- command line ------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _name_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m moe_runtime.simulate", description=__doc__.split("\n")[0])
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        print(run(args), end="")
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
