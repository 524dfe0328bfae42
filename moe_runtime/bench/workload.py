"""A Mixtral-8x7B-shaped MoE stack that runs on a small machine, with routing replayed from a trace.

The real expert dimensions (H 4096, I 14336, E 8, K 2) for a few layers L, random weights, and the
routing of a trace recorded from a real model: random routing would have no locality, and locality
is what the cache exploits. Only the MoE blocks run (no attention): they are where offloading costs.

Dimension legend: L workload layers, Lt trace layers, E experts, K experts per token, H hidden,
I expert FFN size, N decode tokens of the trace.

`OffloadedStack` replays the tokens with the engine's own pieces (disk-tier expert store, per-layer
`ExpertCache`, `OffloadedExperts`), `ReplaySpeculator` prefetching the guesses recorded in the trace;
baseline.py replays the same tokens through accelerate's offloading.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cache import ExpertCache
from ..config import torch_dtype
from ..device import make_device
from ..experts import build_offloaded_experts, link_speculators
from ..host_cache import HostCache
from ..kernels import choose_format
from ..kernels.capability import choose_compute
from ..policies import make_policy
from ..quant import ExpertCodec
from ..speculation import MAX_GUESS_RECORDED, Guess
from ..stats import RoutingTrace, StatsCollector
from ..store import DiskTier, open_store, round_up, store_folder, write_store
from ..types import swiglu

WEIGHT_STD = 0.02


@dataclass(frozen=True)
class WorkloadSpec:
    """Shape and weights of the synthetic stack. bits None = 16-bit experts (`dtype`)."""

    layers: int = 2
    hidden: int = 4096
    intermediate: int = 14336
    experts: int = 8
    top_k: int = 2
    bits: int | None = 2
    group_size: int = 32  # the engine's default for 2/3-bit (the fused CPU kernel needs 32+)
    dtype: str = "bfloat16"  # the bench fills in the device's 16-bit dtype: `spec_for`
    seed: int = 0
    device: str = "cpu"  # the device the records are formed for (kernels.forms.choose_format)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    def codec(self) -> ExpertCodec:
        return _codec(self)

    def weights_identity(self) -> dict:
        """What determines the random weights (not how they are packed)."""
        return {"hidden": self.hidden, "intermediate": self.intermediate, "experts": self.experts,
                "layers": self.layers, "seed": self.seed, "std": WEIGHT_STD}


def spec_for(device, **fields) -> WorkloadSpec:
    """The spec of `fields` on `device` (a torch device or a kernels.capability.DeviceInfo): 16-bit parts in
    the device's 16-bit dtype (bf16 on CPU and on GPUs of compute capability 8.0+, fp16 below) unless a
    dtype is given, which must be one the device computes in."""
    dtype = choose_compute(device, fields.pop("dtype", "half")).dtype
    records_for = fields.pop("records_for", None)  # the device the records are formed for (WorkloadSpec.device)
    if records_for is not None:
        fields["device"] = str(records_for)
    return WorkloadSpec(**fields, dtype=str(dtype).removeprefix("torch."))


@lru_cache(maxsize=4)
def _codec(spec: WorkloadSpec) -> ExpertCodec:
    # optimize=False: round-to-nearest HQQ, same bytes and layout as optimized codes, seconds faster
    fmt = None
    if spec.bits is not None:
        shapes = [(spec.intermediate, spec.hidden), (spec.intermediate, spec.hidden), (spec.hidden, spec.intermediate)]
        fmt = choose_format(spec.bits, spec.group_size, shapes, torch.device(spec.device))
    return ExpertCodec(spec.hidden, spec.intermediate, spec.bits, spec.group_size, True, spec.torch_dtype,
                       optimize=False, fmt=fmt)


def expert_weights(spec: WorkloadSpec, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate [I, H], up [I, H], down [H, I]) float32, the same for every consumer of a spec."""
    gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + layer * 1_009 + expert)
    shapes = ((spec.intermediate, spec.hidden), (spec.intermediate, spec.hidden), (spec.hidden, spec.intermediate))
    return tuple(torch.randn(s, generator=gen).mul_(WEIGHT_STD) for s in shapes)


# --- routing trace -> workload layers ----------------------------------------------------------
@dataclass
class Replay:
    """Per workload layer j: selected[j][n] (K experts) and guess[j][n] (ranking predicted from j-1)."""

    selected: list[list[list[int]]]
    guess: list[list[list[int]]]
    trace_layers: list[int]
    num_experts: int
    top_k: int

    @property
    def num_tokens(self) -> int:
        return len(self.selected[0])


def map_trace(trace: RoutingTrace, layers: int, first_layer: int | None = None) -> Replay:
    """Workload layer j replays trace layer (first + j) mod Lt, decode tokens only.

    Consecutive trace layers, so a recorded guess for layer j (made from j-1) is a guess made from
    the layer the workload runs right before it. Default `first`: the middle block of the trace.
    """
    decode = trace.decode_only() if "decode" in trace.phase else trace
    if not decode.num_tokens:
        raise ValueError("the routing trace has no tokens to replay")
    lt = trace.num_layers
    if first_layer is None:
        first_layer = max(0, (lt - layers) // 2)
    if not 0 <= first_layer < lt:
        raise ValueError(f"first trace layer {first_layer} is not allowed: use 0..{lt - 1}")
    mapped = [(first_layer + j) % lt for j in range(layers)]
    # layer 0 of the workload has no layer before it, hence no guess (as in the engine)
    guess = [decode.guess[m] if j and decode.guess[m] else [[] for _ in decode.selected[m]]
             for j, m in enumerate(mapped)]
    return Replay([decode.selected[m] for m in mapped], guess, mapped, trace.num_experts, trace.top_k)


class ReplaySpeculator:
    """Stands in for `speculation.Speculator`: prefetches the guess the trace recorded for layer L+1.

    `token` is set by the stack before each step; the `Guess` it returns feeds the recall statistics
    of layer L+1 exactly as the real speculator's does (what was resident is not known: None).
    """

    def __init__(self, guesses: list[list[int]], next_cache: ExpertCache, prefetch: int) -> None:
        self.guesses = guesses
        self.next_cache = next_cache
        self.prefetch = prefetch
        self.token = 0

    def __call__(self, hidden_states: torch.Tensor) -> Guess | None:
        ranking = self.guesses[self.token][:MAX_GUESS_RECORDED]
        if self.prefetch and ranking:
            self.next_cache.prefetch(ranking[: self.prefetch])
        return Guess([list(ranking)] * hidden_states.shape[0]) if ranking else None


def check_replay(spec: WorkloadSpec, replay: Replay) -> None:
    found = (len(replay.selected), replay.num_experts, replay.top_k)
    if found != (spec.layers, spec.experts, spec.top_k):
        raise ValueError(f"the replay has (layers, experts, top_k) = {found}, the workload "
                         f"{(spec.layers, spec.experts, spec.top_k)}: map the trace onto the workload's layers")


def residual_step(hidden: torch.Tensor, moe_out: torch.Tensor) -> torch.Tensor:
    """Next layer's input: the residual stream plus this MoE block, RMS-normalized."""
    r = hidden.float() + moe_out.float()
    return (r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + 1e-6)).to(hidden.dtype)


def first_hidden(spec: WorkloadSpec, token: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(spec.seed * 7919 + token)
    return torch.randn(1, spec.hidden, generator=gen).to(device=device, dtype=spec.torch_dtype)  # [1, H]


def routing(replay: Replay, layer: int, token: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.tensor([replay.selected[layer][token]], device=device)  # [1, K]
    weights = torch.full(index.shape, 1.0 / replay.top_k, device=device)  # [1, K]
    return index, weights


# --- ours: the engine's cache on the disk tier --------------------------------------------------
def build_store(spec: WorkloadSpec, store_dir: str | Path) -> Path:
    """The disk-tier expert store of `spec` (built once, reused while the spec is unchanged)."""
    codec = spec.codec()
    identity = {**spec.weights_identity(), "bits": spec.bits, "group_size": spec.group_size,
                "dtype": spec.dtype, "quantize_meta": True, "optimize": False, "form": codec.form_name}
    folder = store_folder(store_dir, "mixtral-shaped", identity)
    if open_store(folder, spec.layers, spec.experts, codec) is None:
        write_store(folder, codec, spec.layers, spec.experts, lambda layer, e: expert_weights(spec, layer, e), identity)
    return folder


LEVELS = ("shared", "exclusive", "inclusive")


class OffloadedStack:
    """L `OffloadedExperts` modules over one `DiskTier` and its host cache, each layer with its own
    `ExpertCache`. `levels`: how the host cache stacks under the device slots (host_cache.py): "shared"
    (the CPU's: experts compute in the arena), "exclusive" (CUDA's: separate slots, write-back; on CPU
    tensors it emulates the GPU path), "inclusive" (separate slots, the arena keeps what it read).
    Default: the engine's choice for `device`."""

    def __init__(self, spec: WorkloadSpec, replay: Replay, folder: Path, cache_size: int, prefetch: int,
                 device: torch.device, policy: str = "lru", host_slots: int = 0, levels: str | None = None) -> None:
        check_replay(spec, replay)
        levels = levels or ("shared" if device.type == "cpu" else "exclusive")
        if levels not in LEVELS:
            raise ValueError(f"levels={levels!r} is not allowed: use one of {', '.join(LEVELS)}")
        self.spec, self.replay, self.device = spec, replay, device
        codec = spec.codec()
        stride = round_up(codec.nbytes)
        dev = make_device(device) if device.type == "cuda" else None  # device.py: the GPU's streams and pinning
        disk = DiskTier(folder, spec.experts, stride, codec.nbytes, dev)
        self.stats = StatsCollector(spec.layers, spec.experts, spec.top_k, cache_size, prefetch, record_trace=False)
        # the host level (host_cache.py) below the device slots: with 0 slots it keeps nothing and counts
        # disk reads
        disk = HostCache(disk, spec.layers, host_slots, stride, make_policy(policy), levels == "exclusive",
                         stats=self.stats, shared=levels == "shared", device_slots=spec.layers * cache_size,
                         max_records=spec.layers * spec.experts, dev=dev)
        self.tier = disk
        self.transfer, self.modules = build_offloaded_experts(
            disk, codec, num_layers=spec.layers, num_experts=spec.experts, top_k=spec.top_k, cache_size=cache_size,
            prefetch=prefetch, policy=policy, stats=self.stats, expert_fn=swiglu(F.silu), device=device, dev=dev)
        self.speculators = [ReplaySpeculator(replay.guess[layer + 1], self.modules[layer + 1].cache, prefetch)
                            for layer in range(spec.layers - 1)]
        link_speculators(self.modules, self.speculators)

    @property
    def direct_io(self) -> bool:
        return self.tier.direct_io

    def step(self, token: int) -> torch.Tensor:
        """One decode token through every layer; `token` indexes the replay (wraps around)."""
        n = token % self.replay.num_tokens
        for speculator in self.speculators:
            speculator.token = n
        hidden = first_hidden(self.spec, n, self.device)
        for layer, module in enumerate(self.modules):
            index, weights = routing(self.replay, layer, n, self.device)
            hidden = residual_step(hidden, module(hidden, index, weights))
        return hidden

    def warm_all(self) -> None:
        """Load every expert that fits (all of them when cache_size = E)."""
        for module in self.modules:
            for expert in range(min(self.spec.experts, module.cache.cache_size)):
                module.cache.acquire(expert)
                module.cache.release(expert)

    def drain(self) -> None:
        for module in self.modules:
            module.cache.drain()

    def drop_resident(self) -> None:
        """Forget every resident expert, so the next use of any expert is a load ("no cache")."""
        self.drain()
        for module in self.modules:
            module.cache.clear()

    def close(self) -> None:
        self.drain()
        self.transfer.close()
        self.tier.close()


def describe(spec: WorkloadSpec, replay: Replay, packed: bool = True) -> dict:
    """Facts for the report. packed=False skips the codec, for the accelerate baseline, which never
    uses it."""
    out = {**asdict(spec), "expert_bytes_16bit": 3 * spec.hidden * spec.intermediate * 2,
           "trace_layers": replay.trace_layers, "trace_tokens": replay.num_tokens}
    if packed:
        nbytes = spec.codec().nbytes
        out.update(expert_bytes=nbytes, store_bytes=round_up(nbytes) * spec.layers * spec.experts)
    return out
