"""Tables, target checks and figures of a benchmark run: bench.json, bench.md and bench.html.

The cache numbers of the engine are cross-checked against the simulator (`sim.replay.simulate`) on
the very tokens the workload replayed: same layers, same tokens, same cache size, from a cold cache.
"""

from __future__ import annotations

import json
from pathlib import Path

PARTS = {
    "model": "Real checkpoint, teacher-forced decode",
    "workload-16bit": "Mixtral-8x7B-shaped experts, 16-bit, routing replayed from a trace",
    "workload-2bit": "Mixtral-8x7B-shaped experts, 2-bit HQQ, routing replayed from a trace",
    "workload-4bit": "Mixtral-8x7B-shaped experts, 4-bit HQQ, routing replayed from a trace",
    "shape": "A hub-shaped full model of random weights, teacher-forced decode of random tokens",
}
ORDER = ("accelerate", "accelerate-per-expert", "no-cache", "lru", "lru+prefetch", "lru+host", "lru+host-half",
         "lru+host-quarter", "resident", "transformers")
TARGETS = {"vs_accelerate": 10.0, "vs_resident": 0.7, "host_vs_resident": 0.9, "lru_vs_belady": 0.95,
           "prefetch_recall": 0.85}
MB = 1e6
MIN_TARGET_TOKENS = 20  # hit-rate and recall targets are not judged on shorter windows


def _mb(nbytes):
    return None if nbytes is None else nbytes / MB


def rows_of(results: list[dict], part: str) -> dict[str, dict]:
    """variant -> result for one part. The 2-bit part borrows the 16-bit accelerate rows: accelerate
    cannot hold 2-bit weights, so it moves 16-bit ones in both (as in the paper)."""
    rows = {r["variant"]: r for r in results if r["part"] == part}
    if part in ("workload-2bit", "workload-4bit") and rows:
        for r in results:
            if r["part"] == "workload-16bit" and r["variant"].startswith("accelerate"):
                rows.setdefault(r["variant"], {**r, "borrowed": "workload-16bit"})
    return {v: rows[v] for v in ORDER if v in rows}


def _ratio(rows: dict, a: str, b: str) -> float | None:
    ra, rb = rows.get(a), rows.get(b)
    if not ra or not rb or "error" in ra or "error" in rb or not rb.get("tokens_per_second"):
        return None
    return ra["tokens_per_second"] / rb["tokens_per_second"]


# --- simulator cross-checks ---------------------------------------------------------------------
def _replayed_trace(result: dict):
    """The RoutingTrace of exactly the tokens a workload job replayed (warm-up included)."""
    from ..stats import RoutingTrace
    from .workload import map_trace

    job = result["job"]
    replay = map_trace(RoutingTrace.load(job["trace"]), job["spec"]["layers"])
    count = job["warmup"] + job["tokens"]
    pick = [n % replay.num_tokens for n in range(count)]
    return RoutingTrace(len(replay.selected), replay.num_experts, replay.top_k, "replay",
                        selected=[[layer[n] for n in pick] for layer in replay.selected],
                        guess=[[layer[n] for n in pick] for layer in replay.guess], phase=["decode"] * count)


def simulator_checks(results: list[dict]) -> dict:
    """Per workload part: simulated LRU / Belady on the replayed tokens vs. the engine's counts."""
    from ..sim.replay import simulate

    checks = {}
    for part in ("workload-16bit", "workload-2bit", "workload-4bit"):
        rows = rows_of(results, part)
        lru = rows.get("lru")
        if not lru or "error" in lru:
            continue
        trace = _replayed_trace(lru)
        c, p = lru["job"]["cache_size"], lru["job"]["prefetch"]
        sims = {"lru": simulate(trace, "lru", c, 0), "belady": simulate(trace, "belady", c, 0),
                "lru+prefetch": simulate(trace, "lru", c, p)}
        check = {"cache_size": c, "prefetch": p, "tokens": trace.num_tokens, "layers": trace.num_layers,
                 "sim_lru_hit_rate": sims["lru"].hit_rate, "sim_belady_hit_rate": sims["belady"].hit_rate,
                 "sim_lru_prefetch_hit_rate": sims["lru+prefetch"].hit_rate,
                 "sim_prefetch_recall": sims["lru+prefetch"].prefetch_recall}
        for variant in ("lru", "lru+prefetch"):
            row = rows.get(variant)
            if row and "error" not in row:
                total = row["total"]
                check[f"engine_{variant}_hit_rate"] = total["hit_rate"]
                check[f"engine_{variant}_matches_sim"] = total["hits"] == sum(sims[variant].hits)
        checks[part] = check
    return checks


def trace_summary(trace_path: str, cache_size: int, prefetch: int) -> dict:
    """LRU vs Belady and prefetch recall over the whole trace (every layer, decode tokens)."""
    from ..sim.replay import simulate
    from ..stats import RoutingTrace

    trace = RoutingTrace.load(trace_path)
    trace = trace.decode_only() if "decode" in trace.phase else trace
    lru, belady = simulate(trace, "lru", cache_size, 0), simulate(trace, "belady", cache_size, 0)
    with_prefetch = simulate(trace, "lru", cache_size, prefetch)
    return {"path": trace_path, "model": trace.model, "layers": trace.num_layers, "experts": trace.num_experts,
            "top_k": trace.top_k, "tokens": trace.num_tokens, "cache_size": cache_size, "prefetch": prefetch,
            "lru_hit_rate": lru.hit_rate, "belady_hit_rate": belady.hit_rate,
            "lru_vs_belady": lru.hit_rate / belady.hit_rate if belady.hit_rate else None,
            "prefetch_recall": with_prefetch.prefetch_recall}


# --- targets ------------------------------------------------------------------------------------
def targets(results: list[dict], checks: dict, trace: dict | None) -> list[dict]:
    out = []
    for part in PARTS:
        rows = rows_of(results, part)
        if not rows:
            continue
        for name, a, b in (("vs_accelerate", "lru+prefetch", "accelerate"),
                           ("vs_resident", "lru+prefetch", "resident"),
                           ("host_vs_resident", "lru+host", "resident")):
            value = _ratio(rows, a, b)
            if value is not None:
                out.append({"part": part, "target": name, "value": value, "goal": TARGETS[name],
                            "met": value >= TARGETS[name]})
        prefetching = rows.get("lru+prefetch", {})
        recall = prefetching.get("prefetch_recall")
        if recall is not None and prefetching.get("tokens", 0) >= MIN_TARGET_TOKENS:
            out.append({"part": part, "target": "prefetch_recall", "value": recall,
                        "goal": TARGETS["prefetch_recall"], "met": recall >= TARGETS["prefetch_recall"]})
        check = checks.get(part, {})
        if check.get("sim_belady_hit_rate") and "engine_lru_hit_rate" in check and \
                check["tokens"] >= MIN_TARGET_TOKENS:
            value = check["engine_lru_hit_rate"] / check["sim_belady_hit_rate"]
            out.append({"part": part, "target": "lru_vs_belady", "value": value, "goal": TARGETS["lru_vs_belady"],
                        "met": value >= TARGETS["lru_vs_belady"]})
    if trace:
        for name, key in (("lru_vs_belady", "lru_vs_belady"), ("prefetch_recall", "prefetch_recall")):
            if trace.get(key) is not None:
                out.append({"part": "whole trace", "target": name, "value": trace[key], "goal": TARGETS[name],
                            "met": trace[key] >= TARGETS[name]})
    return out


# --- Markdown -----------------------------------------------------------------------------------
def _f(value, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}{suffix}"


def _settings_line(rows: dict) -> str:
    any_row = next(iter(rows.values()))
    job = any_row["job"]
    if any_row["part"] == "shape":
        return _shape_line(rows)
    if any_row["part"] == "model":
        bits = f"{job['expert_bits']}-bit HQQ" if job["expert_bits"] else "unquantized"
        return (f"model `{Path(job['model']).name}`, experts {bits}, cache {job['cache_size']} "
                f"experts/layer, prefetch {job['prefetch']}, prompt {job['prompt_tokens']} tokens, "
                f"{job['warmup']} warm-up + {job['tokens']} timed decode steps")
    ours = [r for v, r in rows.items() if "workload" in r and not v.startswith("accelerate")]
    w = ours[0]["workload"] if ours else {}
    bits = f"{w.get('bits')}-bit (group {w.get('group_size')}, 8-bit meta)" if w.get("bits") else f"16-bit ({w.get('dtype')})"
    return (f"{w.get('layers')} layers × {w.get('experts')} experts (top-{w.get('top_k')}), H {w.get('hidden')}, "
            f"I {w.get('intermediate')}, experts {bits}: {_f(w.get('expert_bytes', 0) / MB, 1)} MB each, store "
            f"{_f(w.get('store_bytes', 0) / 1e9, 2)} GB on disk; cache {job['cache_size']} experts/layer, prefetch "
            f"{job['prefetch']}; trace layers {w.get('trace_layers')} of {Path(job['trace']).name} "
            f"({w.get('trace_tokens')} decode tokens)")


def _shape_line(rows: dict) -> str:
    ran = [r for r in rows.values() if "error" not in r]
    job = next(iter(rows.values()))["job"]
    if not ran:
        return f"shape `{job['shape']}`: no variant ran"
    f = ran[0]
    bits = f"{f['bits']}-bit HQQ (group {f['group_size']}, 8-bit meta)" if f["bits"] else "16-bit"
    built = f", built in {_f(f['build_seconds'], 0)} s" if f.get("build_seconds") is not None else ""
    budgeted = [r["settings"] for r in ran if r["variant"] != "resident"]
    cache = (f"host-budget variants: cache {budgeted[0]['cache_size']} experts/layer, prefetch "
             f"{budgeted[0]['prefetch']}; " if budgeted else "")
    return (f"shape `{f['shape']}` ({f['hub_repo']}): {f['layers']} MoE layers × {f['experts']} experts "
            f"(top-{f['top_k']}), H {f['hidden']}, I {f['intermediate']}; experts {bits} in the `{f['form']}` form, "
            f"{_f(f['expert_bytes'] / MB, 2)} MB each, {_f(f['layers'] * f['experts'] * f['stride'] / 1e9, 2)} GB in "
            f"all; dense part {_f(f['dense_bytes'] / 1e9, 2)} GB; store {_f(f['store_bytes'] / 1e9, 2)} GB{built}; "
            f"attention {str(job['attn_bits']) + '-bit HQQ' if job.get('attn_bits') else 'as stored'}; "
            f"routing: {job.get('routing', 'model')}; {cache}prompt {job['prompt_tokens']} tokens, {job['warmup']} warm-up + {job['tokens']} "
            "timed decode steps")


def _error_line(error: str) -> str:
    """A table cell for an error: its last line (a traceback's exception), at most 80 characters."""
    lines = [line for line in error.strip().splitlines() if line.strip()] or [""]
    return lines[-1].strip()[:80].replace("|", "\\|")


def part_table(results: list[dict], part: str) -> str:
    rows = rows_of(results, part)
    gpu = any(r.get("cuda_peak_bytes") for r in rows.values())
    lines = [f"### {PARTS[part]}", "", _settings_line(rows), "",
             "| variant | tok/s | ms/token mean / median | CPU ms/token | stall ms/token | hit rate | prefetch recall "
             "| MB moved/token | disk MB/token | MB converted/token | MB copied RAM->slot/token | peak RSS MB | "
             + ("GPU peak MB | " if gpu else "") + "× accelerate | × resident |",
             "|---|" + "---:|" * (14 if gpu else 13)]
    for variant, r in rows.items():
        if "error" in r:
            lines.append(f"| {variant} | error: {_error_line(r['error'])} |" + " |" * (13 if gpu else 12))
            continue
        name = variant + (" (16-bit run)" if r.get("borrowed") else "")
        recall = r.get("prefetch_recall") if variant.startswith(("lru+prefetch", "lru+host")) else None
        gpu_cell = f"{_f((r.get('cuda_peak_bytes') or 0) / MB, 0)} | " if gpu else ""
        lines.append(
            f"| {name} | {_f(r['tokens_per_second'], 3)} | {_f(r['ms_per_token'], 1)} / "
            f"{_f(r['ms_per_token_median'], 1)} | {_f(r.get('cpu_ms_per_token'), 1)} | {_f(r['stall_ms_per_token'], 1)} | {_f(r.get('hit_rate'), 3)} | {_f(recall, 3)} | "
            f"{_f(r['bytes_per_token'] / MB, 1)} | {_f(_mb(r.get('disk_bytes_per_token')), 1)} | "
            f"{_f(_mb(r.get('converted_bytes_per_token')), 1)} | {_f(_mb(r.get('level_copy_bytes_per_token')), 1)} | "
            f"{_f(r['peak_rss_bytes'] / MB, 0)} | {gpu_cell}"
            f"{_f(_ratio(rows, variant, 'accelerate'), 2, '×')} | {_f(_ratio(rows, variant, 'resident'), 2, '×')} |")
    return "\n".join(lines) + "\n"


def markdown(report: dict) -> str:
    meta, results = report["meta"], report["results"]
    m = meta["machine"]
    out = [f"## Benchmark ({meta['date']})", "",
           f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['ram_bytes'] / 2**30:.0f} GiB RAM, "
           f"GPU: {m['gpu'] or 'none'}; torch {m['torch']}. Command: `{meta['command']}` "
           f"({meta['wall_seconds']:.0f} s).", ""]
    for part in PARTS:
        if rows_of(results, part):
            out.append(part_table(results, part))
    checks = report["simulator"]
    if checks:
        out += ["### Engine vs. simulator on the replayed tokens", "",
                "| part | C | P | tokens×layers | engine LRU | sim LRU | sim Belady | engine LRU+prefetch "
                "| sim LRU+prefetch |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for part, c in checks.items():
            out.append(f"| {part} | {c['cache_size']} | {c['prefetch']} | {c['tokens']}×{c['layers']} | "
                       f"{_f(c.get('engine_lru_hit_rate'), 3)} | {_f(c['sim_lru_hit_rate'], 3)} | "
                       f"{_f(c['sim_belady_hit_rate'], 3)} | {_f(c.get('engine_lru+prefetch_hit_rate'), 3)} | "
                       f"{_f(c['sim_lru_prefetch_hit_rate'], 3)} |")
        out.append("")
    if report.get("trace"):
        t = report["trace"]
        out += [f"Whole trace `{Path(t['path']).name}` ({t['layers']} layers, {t['tokens']} decode tokens), cache "
                f"{t['cache_size']}: LRU hit rate {_f(t['lru_hit_rate'], 3)}, Belady {_f(t['belady_hit_rate'], 3)} "
                f"(ratio {_f(t['lru_vs_belady'], 3)}); prefetch recall of {t['prefetch']} guesses one layer ahead "
                f"{_f(t['prefetch_recall'], 3)}.", ""]
    shown = {r["variant"] for r in results}
    out += ["Variants: " + "; ".join(f"**{v}**: {d}" for v, d in meta.get("variants", {}).items() if v in shown)
            + ".", ""]
    if report["targets"]:
        out += ["### Targets", "", "| part | target | measured | goal | met |", "|---|---|---:|---:|---|"]
        for t in report["targets"]:
            out.append(f"| {t['part']} | {t['target']} | {_f(t['value'], 3)} | {t['goal']} | "
                       f"{'yes' if t['met'] else 'no'} |")
        out.append("")
    return "\n".join(out)


# --- figures ------------------------------------------------------------------------------------
def figure(results: list[dict]):
    """Per part: decode tokens/s per variant (log scale) above time per token split into stall and the rest."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    parts = [p for p in PARTS if rows_of(results, p)]
    fig = make_subplots(rows=2, cols=len(parts), subplot_titles=[PARTS[p] for p in parts], vertical_spacing=0.12)
    for col, part in enumerate(parts, start=1):
        rows = {v: r for v, r in rows_of(results, part).items() if "error" not in r}
        names = list(rows)
        fig.add_trace(go.Bar(x=names, y=[rows[v]["tokens_per_second"] for v in names], name="tokens/s",
                             marker_color="#4c78a8", showlegend=col == 1), row=1, col=col)
        stall = [rows[v]["stall_ms_per_token"] for v in names]
        rest = [max(0.0, rows[v]["ms_per_token"] - s) for v, s in zip(names, stall)]
        fig.add_trace(go.Bar(x=names, y=stall, name="waiting for experts (ms/token)", marker_color="#e45756",
                             showlegend=col == 1), row=2, col=col)
        fig.add_trace(go.Bar(x=names, y=rest, name="compute and the rest (ms/token)", marker_color="#72b7b2",
                             showlegend=col == 1), row=2, col=col)
        fig.update_yaxes(type="log", title_text="decode tokens/s" if col == 1 else None, row=1, col=col)
        fig.update_yaxes(title_text="ms per token" if col == 1 else None, row=2, col=col)
    fig.update_layout(barmode="stack", height=760, width=max(700, 480 * len(parts)),
                      title="Decode speed: accelerate offloading vs. expert cache and prefetch")
    return fig


def simulator_figure(trace_path: str, prefetch: int):
    """The simulator's hit rate vs cache size figure for the whole trace (decode tokens)."""
    from ..sim.replay import SIM_POLICIES, sweep
    from ..sim.report import hit_rate_figure
    from ..stats import RoutingTrace

    trace = RoutingTrace.load(trace_path)
    trace = trace.decode_only() if "decode" in trace.phase else trace
    return hit_rate_figure(sweep(trace, SIM_POLICIES, list(range(1, trace.num_experts)), sorted({0, prefetch})))


def write_reports(results: list[dict], meta: dict, out: Path) -> str:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    checks = simulator_checks(results)
    plan = meta.get("plan", {})
    trace = None
    if plan.get("trace") and Path(plan["trace"]).exists() and any(r["part"].startswith("workload") for r in results):
        trace = trace_summary(plan["trace"], plan["cache_size"], plan["prefetch"])
    report = {"meta": meta, "results": results, "simulator": checks, "trace": trace,
              "targets": targets(results, checks, trace)}
    (out / "bench.json").write_text(json.dumps(report, indent=1, default=str))
    text = markdown(report)
    (out / "bench.md").write_text(text)
    try:
        fig = figure(results)
    except ImportError:  # a machine without plotly (e.g. a bare GPU box): the JSON and markdown are the results
        return text
    fig.write_html(out / "bench.html", include_plotlyjs="cdn")
    figures = {"bench": fig}
    if trace:
        figures["hit-rate"] = simulator_figure(plan["trace"], plan["prefetch"])
        figures["hit-rate"].write_html(out / "hit-rate.html", include_plotlyjs="cdn")
    for name, figure_ in figures.items():
        try:
            figure_.write_image(out / f"{name}.png", scale=1)
        except Exception:  # kaleido (and a browser) are optional: the HTML is the figure
            pass
    return text
