"""Named machine scenarios: budgets of a real machine applied to a full model, through the three levels.

`colab-t4` is the paper's headline setting: a free Colab with a T4 (15 GB usable GPU memory, 12.7 GB
host RAM, a disk), Mixtral-8x7B with 2-bit experts and 4-bit attention. The device budget is what
the GPU has minus the dense weights (attention, embeddings, LM head), the KV cache and a reserve;
the host budget is the RAM minus the process. The routing comes from a trace: by default a
Mixtral-like synthetic one (synth.py, from real Mixtral-8x7B-Instruct routing statistics).

The model is what the engine builds by default (OffloadConfig: 2-bit experts at its default group
size, 8-bit scales/zeros, the default host policy), and the prediction is for the engine's GPU path
(throughput.ENGINE_PATH: the fused kernel reads the record, nothing is converted per load or use,
exclusive levels with the write-back overlapped on its own stream); the same run on the serial
write-back (`engine-serial`) and on main's path before issue 16 (`main`) is printed beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..config import OffloadConfig
from ..stats import RoutingTrace
from .hierarchy import HierarchyResult, simulate_hierarchy
from .throughput import (
    GB,
    HARDWARE,
    LAYER_OVERHEAD_S,
    MODELS,
    PAPER_TABLE2,
    PATHS,
    ModelShape,
    predict_from_loads,
)

ENGINE_DEFAULTS = OffloadConfig(expert_bits=2, attn_bits=4)
SCENARIO_PATHS = ("engine", "engine-serial", "main")  # the first is the headline prediction


def engine_model(name: str = "mixtral-8x7b") -> ModelShape:
    """`name`'s shape as the engine builds it by default: 2-bit experts at OffloadConfig's group size."""
    return replace(MODELS[name], expert_bits=2, expert_group_size=ENGINE_DEFAULTS.expert_group, attn_bits=4,
                   attn_group_size=ENGINE_DEFAULTS.attn_group_size, meta_bits=8 if ENGINE_DEFAULTS.quantize_meta
                   else 16)


@dataclass(frozen=True)
class Scenario:
    """A machine's budgets. Every figure is an assumption with its source in `source`."""

    name: str
    hardware: str  # a throughput.HARDWARE profile (bandwidths, device memory, device reserve)
    host_ram_gb: float
    process_gb: float  # host RAM the process takes besides the expert cache
    disk_gbs: float  # sustained read bandwidth of the disk holding the store
    context_tokens: int  # KV cache reserved on the device for this many tokens
    cache_size: int  # device slots per layer (the paper's setting on this machine)
    source: str


SCENARIOS = {s.name: s for s in (
    Scenario("colab-t4", "t4-pcie3", host_ram_gb=12.7, process_gb=3.0, disk_gbs=0.3, context_tokens=4096,
             cache_size=4, source=(
                 "free Colab: 12.7 GB RAM and a 15 GB T4 as Colab reports them; 3.0 GB assumed for Python, "
                 "torch, the CUDA runtime and transformers on the host (an assumption, not measured on Colab); "
                 "0.3 GB/s disk: within the 0.2-0.5 GB/s of a Colab disk (issue 9); 4 experts per layer on the "
                 "GPU (the paper's setting on a T4)")),
)}


def kv_cache_bytes(model: ModelShape, tokens: int) -> int:
    """fp16 keys and values of every layer for `tokens` tokens."""
    head_dim = model.hidden_size // model.num_attention_heads
    return 2 * model.num_layers * model.num_key_value_heads * head_dim * 2 * tokens


@dataclass(frozen=True)
class Prediction:
    """Decode tokens/s on one GpuPath: steady state (the trace's second half) and over the whole trace,
    and the seconds per token of write-back the steady figure includes."""

    path: str
    tokens_per_second: float
    cold_tokens_per_second: float
    write_back_s: float


@dataclass
class ScenarioResult:
    scenario: Scenario
    model: ModelShape
    device_free_bytes: int  # for expert slots, after dense weights, KV cache and reserve
    fits_cache_size: int
    host_budget_bytes: int
    host_slots: int
    result: HierarchyResult
    predictions: dict[str, Prediction]  # by path name, SCENARIO_PATHS order
    trace_name: str
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        """The engine's path, steady state."""
        return self.predictions[SCENARIO_PATHS[0]].tokens_per_second

    @property
    def cold_tokens_per_second(self) -> float:
        return self.predictions[SCENARIO_PATHS[0]].cold_tokens_per_second

    @property
    def peak_host_bytes(self) -> int:
        return self.result.peak_host_bytes + int(self.scenario.process_gb * GB)


def run_scenario(name: str, trace: RoutingTrace, model: ModelShape | None = None,
                 cache_size: int | None = None, exclusive: bool = True,
                 host_policy: str | None = None) -> ScenarioResult:
    if name not in SCENARIOS:
        raise ValueError(f"scenario={name!r} is not allowed: use one of {', '.join(SCENARIOS)}")
    scenario = SCENARIOS[name]
    model = model or engine_model()
    host_policy = host_policy or ENGINE_DEFAULTS.host_policy
    if (trace.num_layers, trace.num_experts, trace.top_k) != (model.num_layers, model.num_experts, model.top_k):
        raise ValueError(f"the trace has L={trace.num_layers}, E={trace.num_experts}, top-{trace.top_k}; "
                         f"{model.name} has L={model.num_layers}, E={model.num_experts}, top-{model.top_k}")
    hardware = HARDWARE[scenario.hardware]
    device_free = int((hardware.memory_gb - hardware.reserve_gb) * GB) - model.resident_dense_bytes \
        - kv_cache_bytes(model, scenario.context_tokens)
    fits = max(0, min(model.num_experts, device_free // (model.num_layers * model.expert_bytes)))
    cache_size = cache_size or scenario.cache_size
    if cache_size > fits:
        raise ValueError(f"cache_size={cache_size} does not fit {name}: {device_free / GB:.2f} GB free on the device "
                         f"holds {fits} experts per layer")
    host_budget = int((scenario.host_ram_gb - scenario.process_gb) * GB)
    host_slots = max(0, host_budget // model.expert_bytes - 1)  # one record of the arena stages disk reads
    result = simulate_hierarchy(trace, cache_size, host_slots, model.expert_bytes, exclusive=exclusive,
                                host_policy=host_policy)
    predictions = {path: _predict(model, scenario, result, PATHS[path]) for path in SCENARIO_PATHS}
    return ScenarioResult(scenario, model, device_free, fits, host_budget, host_slots, result, predictions,
                          trace.model)


def _predict(model: ModelShape, scenario: Scenario, result: HierarchyResult, path) -> Prediction:
    """Calibrated time per token (throughput.py) on `path`, plus the disk reads, which stall at the
    disk's bandwidth: steady state (disk reads of the trace's second half) and the whole trace."""
    layers = model.num_layers
    tp = predict_from_loads(model, HARDWARE[scenario.hardware], result.per_token(result.misses) / layers,
                            path=path, write_backs_per_layer=result.per_token(result.write_backs) / layers)
    disk_s = model.expert_bytes / (scenario.disk_gbs * GB)
    late_tokens = result.num_tokens - result.num_tokens // 2
    steady = tp.token_s + (result.late_disk_reads / late_tokens if late_tokens else 0.0) * disk_s
    cold = tp.token_s + result.per_token(result.disk_reads) * disk_s
    return Prediction(path.name, 1.0 / steady, 1.0 / cold, tp.write_back_s)


def scenario_report(s: ScenarioResult) -> str:
    r, m, sc = s.result, s.model, s.scenario
    paper = [f for f in PAPER_TABLE2 if f.hardware == sc.hardware and f.cache_size == r.cache_size]
    mb = m.expert_bytes / 1e6
    hw = HARDWARE[sc.hardware]
    engine, serial, main = (s.predictions[p] for p in SCENARIO_PATHS)
    lines = [
        f"## Scenario {sc.name}: {m.name}, {m.expert_bits}-bit experts (group {m.expert_group_size}, "
        f"{m.meta_bits}-bit scales/zeros: {mb:.1f} MB each), {m.attn_bits}-bit attention; routing: {s.trace_name}, "
        f"{r.num_tokens} tokens; host policy {r.host_policy}", "",
        f"Assumptions: {sc.source}.", "",
        f"- device: {hw.memory_gb:g} GB - {hw.reserve_gb:g} GB reserve - "
        f"{m.resident_dense_bytes / GB:.2f} GB dense weights - {kv_cache_bytes(m, sc.context_tokens) / GB:.2f} GB KV "
        f"cache ({sc.context_tokens} tokens) = {s.device_free_bytes / GB:.2f} GB for experts: {s.fits_cache_size} "
        f"per layer fit; {r.cache_size} per layer used ({r.cache_size * m.num_layers * m.expert_bytes / GB:.2f} GB)",
        f"- host: {sc.host_ram_gb:g} GB - {sc.process_gb:g} GB process = {s.host_budget_bytes / GB:.2f} GB budget: "
        f"{s.host_slots} expert records + 1 staging; levels {'exclusive' if r.exclusive else 'inclusive'}",
        f"- disk: the store, {m.num_layers * m.num_experts * m.expert_bytes / GB:.1f} GB, read at "
        f"{sc.disk_gbs:g} GB/s", "",
        "| level | reads / token | bytes / token |", "|---|---:|---:|",
        f"| device (hits) | {r.per_token(r.hits):.2f} | - |",
        f"| host -> device (host hits) | {r.per_token(r.host_hits):.2f} | "
        f"{r.per_token(r.host_hits) * m.expert_bytes / 1e6:.0f} MB |",
        f"| disk -> device (disk reads) | {r.per_token(r.disk_reads):.2f} | {r.disk_bytes_per_token / 1e6:.0f} MB |",
        f"| device -> host (write-backs) | {r.per_token(r.write_backs):.2f} | "
        f"{r.write_back_bytes_per_token / 1e6:.0f} MB |", "",
        f"- disk reads: {sum(r.disk_reads)} in all, {r.distinct_experts} distinct experts used; "
        f"{sum(r.disk_rereads)} re-reads of an expert read before; {r.late_disk_reads} in the second half "
        "of the trace (steady state)",
        f"- peak host memory: {r.peak_host_records + 1} records x {mb:.1f} MB = {r.peak_host_bytes / GB:.2f} GB "
        f"+ {sc.process_gb:g} GB process = {s.peak_host_bytes / GB:.2f} GB (of {sc.host_ram_gb:g} GB)",
        f"- device hit rate {sum(r.hits) / max(1, sum(r.hits) + sum(r.misses)):.3f}",
        f"- predicted decode tok/s on the engine's path ({hw.notes}; fused Triton kernel reading the record, no "
        f"conversion per load or use, write-back overlapped with the load on its own stream; per-layer overhead "
        f"{LAYER_OVERHEAD_S * 1e3:.2f} ms fitted to the paper's T4 row on the paper's path): steady state "
        f"{engine.tokens_per_second:.2f}, including {engine.write_back_s * 1e3:.1f} ms/token of write-back; over "
        f"the whole trace, first disk reads included, {engine.cold_tokens_per_second:.2f}"
        + (f"; paper, Table 2 ({paper[0].method}, cache {paper[0].cache_size}): {paper[0].tokens_per_second:.2f}"
           if paper else ""),
        f"- the same with the write-back in series before each load (HostCache.exchange on main): steady state "
        f"{serial.tokens_per_second:.2f}, including {serial.write_back_s * 1e3:.1f} ms/token of write-back",
        f"- main before issue 16 (the record re-packed on every use, ~5.6 GB of traffic per expert; serial "
        f"write-back): steady state {main.tokens_per_second:.2f}, including {main.write_back_s * 1e3:.1f} ms/token "
        "of write-back",
    ]
    return "\n".join(lines) + "\n"
