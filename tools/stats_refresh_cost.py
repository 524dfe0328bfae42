"""What one refresh of the app's Stats tab costs (each open tab refreshes once a second while a reply
streams): the snapshot, the cache map query, every figure, and the JSON the browser is sent.

    python -m tools.stats_refresh_cost                  # the embedded model after a 40-token reply
    python -m tools.stats_refresh_cost --repeats 20

Also times the two new figures at Mixtral/Qwen3-MoE-like sizes on made-up data (48 layers x 128
experts, a full timeline ring buffer), the worst case a big model gives them.

    python -m tools.stats_refresh_cost --pollers 0 1 4 6   # decode speed with N visitors polling /stats

`--pollers` launches `python app.py` (the embedded model) on a free 127.0.0.1 port and measures the
decode speed of streamed /v1 replies while N clients each call the /stats endpoint once a second
(what an open Stats tab did before the views were shared; a tab now skips polls with nothing new),
then the server's memory (VmRSS) after a crafted What-if trace and a 10 MB chat message.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from moe_runtime import GenerationSettings
from moe_runtime.config import OffloadConfig
from moe_runtime.stats import MAX_SPANS, StatsCollector
from webapp import plots
from webapp.service import EngineService


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall time of `fn()` in ms over `repeats` calls, and its last result."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times), out


def served_model(repeats: int, tokens: int) -> list[str]:
    with tempfile.TemporaryDirectory() as store:
        service = EngineService(config=OffloadConfig(device="cpu", store_dir=store))
        service.start()
        try:
            list(service.chat([{"role": "user", "content": "To be, or not to be"}],
                              GenerationSettings(tokens, temperature=0.7, seed=0)))
            snapshot_ms, stats = timed(lambda: service.stats(trace=False), repeats)
            map_query_ms, levels = timed(service.cache_map, repeats)
            figures_ms, figures = timed(lambda: plots.dashboard(stats, levels=levels), repeats)
            map_ms, _ = timed(lambda: plots.cache_map(levels, stats), repeats)
            timeline_ms, _ = timed(lambda: plots.timeline(stats), repeats)
            table_ms, _ = timed(lambda: (plots.counters(stats), plots.counter_rows(stats)), repeats)
            json_ms, payload = timed(lambda: [fig.to_json() for fig in figures.values()], repeats)
            kib = sum(map(len, payload)) / 1024
            shape = f"{stats.num_layers} layers x {stats.num_experts} experts, {len(stats.timeline)} timeline spans"
        finally:
            service.close()
    total = snapshot_ms + map_query_ms + figures_ms + table_ms + json_ms
    return [f"## embedded model ({shape}), median of {repeats}", "",
            "| part | ms |", "| --- | ---: |",
            f"| snapshot (counters, timeline; no trace) | {snapshot_ms:.1f} |",
            f"| cache map query (every layer's slots) | {map_query_ms:.2f} |",
            f"| all {len(figures)} figures | {figures_ms:.1f} |",
            f"| of which the live cache map | {map_ms:.1f} |",
            f"| of which the timeline (newest {plots.TIMELINE_TOKENS} tokens) | {timeline_ms:.1f} |",
            f"| counter table | {table_ms:.2f} |",
            f"| figures to JSON ({kib:.0f} KiB sent) | {json_ms:.1f} |",
            f"| **one refresh, one open tab** | **{total:.0f}** |", ""]


def big_model(repeats: int, layers: int = 48, experts: int = 128, top_k: int = 8) -> list[str]:
    """The new figures on made-up data of a large model: every place in the map, a full ring of spans."""
    rng = random.Random(0)
    collector = StatsCollector(layers, experts, top_k, 16, 8, record_trace=False)
    collector.start_generation()
    for _ in range(MAX_SPANS // (layers * 4)):
        start = time.perf_counter()
        collector.mark_token()
        for layer in range(layers):
            t = start + layer * 1e-5
            collector.record_span("compute", layer, -1, t, t + 8e-4)
            collector.record_span("prefetch", layer, rng.randrange(experts), t, t + 2e-3, "ram")
            collector.record_span("demand", layer, rng.randrange(experts), t, t + 5e-4, "disk")
            collector.record_span("stall", layer, rng.randrange(experts), t, t + 5e-4)
    stats = collector.snapshot(trace=False)
    places = list(plots.PLACES)
    levels = [[rng.choice(places) for _ in range(experts)] for _ in range(layers)]
    map_ms, fig = timed(lambda: plots.cache_map(levels, stats), repeats)
    map_kib = len(fig.to_json()) / 1024
    newest_ms, fig = timed(lambda: plots.timeline(stats), repeats)
    newest_kib = len(fig.to_json()) / 1024
    all_ms, fig = timed(lambda: plots.timeline(stats, last_tokens=None), repeats)
    all_kib = len(fig.to_json()) / 1024
    return [f"## made-up large model ({layers} layers x {experts} experts, {len(stats.timeline)} spans), "
            f"median of {repeats}", "", "| figure | ms | KiB as JSON |", "| --- | ---: | ---: |",
            f"| live cache map | {map_ms:.1f} | {map_kib:.0f} |",
            f"| timeline, newest {plots.TIMELINE_TOKENS} tokens | {newest_ms:.1f} | {newest_kib:.0f} |",
            f"| timeline, whole ring (at most {plots.MAX_DRAWN_SPANS} spans drawn) | {all_ms:.1f} | {all_kib:.0f} |", ""]


# --- decode speed with visitors polling, through the running app ----------------------------------
REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mib(pid: int, field: str = "VmRSS") -> float:
    """The process's resident memory now (VmRSS), or its peak so far (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _decode_speed(url: str, tokens: int) -> float:
    """tokens/s between the first and the last streamed piece of one greedy /v1 reply."""
    import httpx

    body = {"messages": [{"role": "user", "content": "To be, or not to be"}], "max_tokens": tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    stamps, used = [], 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                used = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
    if used < 2 or len(stamps) < 2:
        return float("nan")
    return (used - 1) / (stamps[-1] - stamps[0])


def _poll(url: str, stop: threading.Event, polls: list, active: threading.Event | None = None) -> None:
    """One visitor: /stats once a second until `stop` (only while `active` is set, when given);
    each call's latency goes to `polls`."""
    from gradio_client import Client

    client = Client(url + "/", verbose=False, analytics_enabled=False)
    while not stop.is_set():
        if active is not None and not active.wait(0.2):
            continue
        start = time.monotonic()
        client.predict(api_name="/stats")
        polls.append(time.monotonic() - start)
        stop.wait(max(0.0, 1.0 - (time.monotonic() - start)))


def _poll_tab(url: str, stop: threading.Event, polls: list) -> None:
    """One open Stats tab: the timer's tick (the app's private stats_poll) once a second, as the
    browser sends it (outside gradio's queue: /gradio_api/run/predict), until `stop`."""
    import uuid

    import httpx

    config = httpx.get(f"{url}/config", timeout=30).json()
    index = next(d["id"] for d in config["dependencies"] if d.get("js") and "visibilityState" in str(d.get("js")))
    session = uuid.uuid4().hex
    with httpx.Client(timeout=60) as http:
        while not stop.is_set():
            start = time.monotonic()
            http.post(f"{url}/gradio_api/run/predict", json={"data": [8, True], "fn_index": index,
                                                             "session_hash": session})
            polls.append(time.monotonic() - start)
            stop.wait(max(0.0, 1.0 - (time.monotonic() - start)))


def with_pollers(counts: list[int], tokens: int, replies: int) -> list[str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "GRADIO_TEMP_DIR": f"{tmp}/gradio"}
        server = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--store-dir", f"{tmp}/store"],
                                  cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_for(url, server)
            for _ in range(3):
                _decode_speed(url, 64)  # warm up
            rows = []
            for n in counts:  # pairs: a reply alone (pollers paused), then one with them: drift cancels
                stop, active, polls = threading.Event(), threading.Event(), []
                threads = [threading.Thread(target=_poll, args=(url, stop, polls, active), daemon=True)
                           for _ in range(n)]
                for t in threads:
                    t.start()
                alone, crowded = [], []
                for _ in range(replies):
                    active.clear()
                    time.sleep(1.2)  # polls in flight end
                    alone.append(_decode_speed(url, tokens))
                    active.set()
                    time.sleep(1.2 if n else 0.0)
                    crowded.append(_decode_speed(url, tokens))
                stop.set()
                active.set()
                for t in threads:
                    t.join(30)
                ratio = statistics.median(c / a for a, c in zip(alone, crowded))
                latency = f"{1e3 * statistics.median(polls):.0f}" if polls else "—"
                rows.append(f"| {n} | {statistics.median(alone):.1f} | {statistics.median(crowded):.1f} | "
                            f"{ratio:.2f}x | {len(polls)} | {latency} |")
            idle = _idle_poll_cost(url, server.pid, max(counts), _poll) + " " + \
                _idle_poll_cost(url, server.pid, max(counts), _poll_tab, "open Stats tab's timer tick")
            rss = _probes(url, server.pid)
        finally:
            server.terminate()
            server.wait(60)
    load = open("/proc/loadavg").read().split()[:3]
    return [f"## decode speed through /v1 with N clients polling /stats at 1 Hz ({tokens}-token greedy replies, "
            f"{replies} pairs: a reply alone, then one with the pollers; load average {' '.join(load)})", "",
            "| pollers | alone tokens/s (median) | with pollers tokens/s (median) | ratio (median of pairs) | "
            "polls answered | poll latency ms (median) |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |", *rows, "", idle, "", *rss, ""]


def _idle_poll_cost(url: str, pid: int, pollers: int, poll=_poll, what: str = "/stats poll",
                    seconds: float = 6.0) -> str:
    """Server CPU per poll with no reply running: nothing new (a /stats call gets the shared view
    again; a tab's tick gets nothing)."""
    stop, polls = threading.Event(), []
    threads = [threading.Thread(target=poll, args=(url, stop, polls), daemon=True) for _ in range(max(pollers, 1))]
    for t in threads:
        t.start()
    time.sleep(2.0)  # the clients have connected
    cpu, start, first = _cpu_seconds(pid), time.monotonic(), len(polls)
    time.sleep(seconds)
    used, answered, elapsed = _cpu_seconds(pid) - cpu, len(polls) - first, time.monotonic() - start
    stop.set()
    for t in threads:
        t.join(30)
    time.sleep(1.0)
    cpu = _cpu_seconds(pid)  # what the server burns with nobody asking (gradio's own loops), subtracted
    time.sleep(seconds)
    idle = (_cpu_seconds(pid) - cpu) / seconds * elapsed
    return (f"Server CPU per {what} with nothing new ({max(pollers, 1)} pollers, no reply running): "
            f"{1e3 * (used - idle) / max(answered, 1):.1f} ms ({answered} polls in {elapsed:.0f} s; the server's "
            f"idle {1e3 * idle / elapsed:.0f} ms/s subtracted).")


def _wait_for(url: str, server: subprocess.Popen) -> None:
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit("the app exited before serving")
        try:
            if httpx.get(url + "/", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the app did not start serving within 300 s")


def _probes(url: str, pid: int) -> list[str]:
    """The server's RSS after a crafted What-if trace (1 layer, 10**7 experts, Belady) and a 10 MB chat
    message through the gradio API: both are refused before they cost memory."""
    import httpx
    from gradio_client import Client, handle_file

    before, peak_before = _rss_mib(pid), _rss_mib(pid, "VmHWM")
    client = Client(url + "/", verbose=False, analytics_enabled=False)
    with tempfile.TemporaryDirectory() as tmp:
        crafted = Path(tmp) / "crafted.json"
        crafted.write_text(json.dumps({"format": "moe-routing-trace", "num_layers": 1, "num_experts": 10**7,
                                       "top_k": 1, "model": "x", "phase": ["decode"] * 15,
                                       "selected": [[[i] for i in range(15)]], "guess": [[]]}))
        start = time.monotonic()
        try:
            note = client.predict("an uploaded trace file", handle_file(str(crafted)), "belady", 2, 0, "cpu-space",
                                  "served model", True, api_name="/what_if")[1]
        except Exception as err:  # noqa: BLE001 - the refusal is the point
            note = str(err)
        whatif_s, after_whatif, peak_whatif = time.monotonic() - start, _rss_mib(pid), _rss_mib(pid, "VmHWM")
    start = time.monotonic()
    try:
        client.predict("x" * 10_000_000, [], "", 0.7, 0.95, 8, api_name="/chat")
        chat = "answered"
    except Exception as err:  # noqa: BLE001
        chat = f"refused: {str(err)[:80]}"
    chat_s, after_chat, peak_chat = time.monotonic() - start, _rss_mib(pid), _rss_mib(pid, "VmHWM")
    status = httpx.get(url + "/", timeout=10).status_code
    return ["| probe | RSS before MiB | RSS after MiB | peak RSS so far MiB (before -> after) | seconds | outcome |",
            "| --- | ---: | ---: | ---: | ---: | --- |",
            f"| What-if: 1 layer x 10^7 experts x 15 tokens, belady | {before:.0f} | {after_whatif:.0f} | "
            f"{peak_before:.0f} -> {peak_whatif:.0f} | {whatif_s:.1f} | {' '.join(str(note).split())[:90]} |",
            f"| /chat with a 10 MB message | {after_whatif:.0f} | {after_chat:.0f} | {peak_whatif:.0f} -> "
            f"{peak_chat:.0f} | {chat_s:.1f} | {chat} (the app then answers HTTP {status}) |"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.stats_refresh_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=10, help="timed calls per part (the median is printed)")
    p.add_argument("--tokens", type=int, default=40, help="tokens of the reply before timing")
    p.add_argument("--pollers", type=int, nargs="*", help="measure decode speed with these numbers of /stats "
                   "pollers (e.g. 0 1 4 6; 0 first: the ratios are to it) through a launched app.py")
    p.add_argument("--replies", type=int, default=3, help="pairs of replies (alone, with pollers) per number of "
                   "pollers (medians)")
    args = p.parse_args(argv)
    if args.pollers:
        print("\n".join(with_pollers(args.pollers, max(args.tokens, 8), args.replies)))
        return
    print("\n".join(served_model(args.repeats, args.tokens) + big_model(max(args.repeats // 2, 1))))


if __name__ == "__main__":
    main()
