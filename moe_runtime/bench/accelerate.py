"""The paper's naive baseline: accelerate's offloading of the same experts, for the synthetic workload.

The workload's weights (workload.expert_weights) as 16-bit parameters in accelerate's offload folder
(one .dat memory map per parameter + index.json), loaded by accelerate's hooks on every forward:

- granularity "fused": transformers 5's `MixtralExperts`, whose experts are one [E, 2I, H] and one
  [E, H, I] parameter, so accelerate moves all E experts of a layer for every token (what
  `device_map` with disk offload does to a transformers Mixtral);
- granularity "per-expert": one module per expert, so accelerate moves only the routed experts
  (the transformers 4 layout the paper compared against).

accelerate reads through the OS page cache; `drop_page_cache` before each token makes it read the
disk, as the engine's O_DIRECT disk tier does. Dimensions: L layers, E experts, H hidden, I FFN size.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.hooks import AlignDevicesHook, add_hook_to_module, attach_align_device_hook
from accelerate.utils import OffloadedWeightsLoader, offload_weight, save_offload_index
from torch import nn
from tqdm.auto import tqdm
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from ..experts import reference_moe
from ..store import store_folder
from ..types import ExpertWeights, swiglu
from .workload import Replay, WorkloadSpec, check_replay, expert_weights, first_hidden, residual_step, routing


class PerExpertLayer(nn.Module):
    """One MoE layer with one module per expert, so accelerate loads only the experts that run."""

    def __init__(self, spec: WorkloadSpec) -> None:
        super().__init__()
        self.experts = nn.ModuleList(
            nn.ModuleDict({name: nn.Linear(*dims, bias=False) for name, dims in
                           (("gate", (spec.hidden, spec.intermediate)), ("up", (spec.hidden, spec.intermediate)),
                            ("down", (spec.intermediate, spec.hidden)))})
            for _ in range(spec.experts)
        )

    def forward(self, hidden_states, top_k_index, top_k_weights):
        # the accelerate hooks of each Linear load its weight on entry, so they run as modules
        weights = [ExpertWeights(e["gate"], e["up"], e["down"]) for e in self.experts]
        return reference_moe(hidden_states, top_k_index, top_k_weights, weights, swiglu(F.silu), linear=_call_module)


def _call_module(x: torch.Tensor, module: nn.Linear, bias: torch.Tensor | None = None) -> torch.Tensor:
    return module(x)  # the module's own bias, if any


def _mixtral_config(spec: WorkloadSpec) -> MixtralConfig:
    config = MixtralConfig(hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                           num_local_experts=spec.experts, num_experts_per_tok=spec.top_k, num_hidden_layers=1)
    config._experts_implementation = "eager"
    return config


def _accelerate_layers(spec: WorkloadSpec, granularity: str) -> nn.ModuleList:
    with torch.device("meta"):
        if granularity == "fused":
            layers = nn.ModuleList(MixtralExperts(_mixtral_config(spec)) for _ in range(spec.layers))
        else:
            layers = nn.ModuleList(PerExpertLayer(spec) for _ in range(spec.layers))
    return layers.to(spec.torch_dtype)  # accelerate casts what it loads to the parameter's dtype


def build_offload_folder(spec: WorkloadSpec, root: str | Path, granularity: str) -> Path:
    """accelerate's offload folder (one .dat memmap per parameter + index.json) for the 16-bit weights."""
    identity = {**spec.weights_identity(), "dtype": spec.dtype, "granularity": granularity}
    folder = store_folder(root, f"accelerate-{granularity}", identity)
    if (folder / "index.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    index: dict = {}
    dtype, e_count = spec.torch_dtype, spec.experts
    bar = tqdm(total=spec.layers * e_count, desc=f"building accelerate offload folder ({granularity})", unit="expert")
    for layer in range(spec.layers):
        if granularity == "fused":  # transformers 5 layout: gate_up_proj [E, 2I, H], down_proj [E, H, I]
            gate_up = torch.empty(e_count, 2 * spec.intermediate, spec.hidden, dtype=dtype)
            down = torch.empty(e_count, spec.hidden, spec.intermediate, dtype=dtype)
            for e in range(e_count):
                gate, up, down_e = expert_weights(spec, layer, e)
                gate_up[e] = torch.cat([gate, up])
                down[e] = down_e
                bar.update()
            offload_weight(gate_up, f"{layer}.gate_up_proj", folder, index)
            offload_weight(down, f"{layer}.down_proj", folder, index)
            del gate_up, down
        else:
            for e in range(e_count):
                for name, w in zip(("gate", "up", "down"), expert_weights(spec, layer, e)):
                    offload_weight(w.to(dtype), f"{layer}.experts.{e}.{name}.weight", folder, index)
                bar.update()
    bar.close()
    save_offload_index(index, folder)  # written last: its presence marks a complete folder
    return folder


class TimedWeightsLoader(OffloadedWeightsLoader):
    """accelerate's loader of offloaded weights, counting the seconds and bytes it spends."""

    def __init__(self, save_folder: Path | str | None, index: dict | None = None) -> None:
        super().__init__(save_folder=str(save_folder) if save_folder else None, index=index)
        self.seconds = 0.0
        self.nbytes = 0
        self.loads = 0

    def __getitem__(self, key: str):
        start = time.perf_counter()
        tensor = super().__getitem__(key)
        self.seconds += time.perf_counter() - start
        self.nbytes += tensor.numel() * tensor.element_size()
        self.loads += 1
        return tensor


def drop_page_cache(folder: Path) -> None:
    """Evict a folder's files from the OS page cache, so the next read really reads the disk
    (the engine's disk tier reads with O_DIRECT; without this, accelerate would read RAM)."""
    for path in Path(folder).rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class AccelerateStack:
    """The same L layers as parameters offloaded by accelerate (`disk_offload`'s hooks, spelled out
    so the loader can be timed). granularity "fused": transformers' `MixtralExperts`, whose
    [E, 2I, H] parameter accelerate moves whole; "per-expert": one module per expert."""

    def __init__(self, spec: WorkloadSpec, replay: Replay, folder: Path, device: torch.device,
                 granularity: str = "fused") -> None:
        check_replay(spec, replay)
        self.spec, self.replay, self.device, self.folder = spec, replay, device, folder
        self.layers = _accelerate_layers(spec, granularity)
        self.loader = TimedWeightsLoader(folder)
        add_hook_to_module(self.layers, AlignDevicesHook(io_same_device=True), append=True)
        attach_align_device_hook(self.layers, execution_device=device, offload=True, weights_map=self.loader)

    @torch.no_grad()
    def step(self, token: int) -> torch.Tensor:
        n = token % self.replay.num_tokens
        hidden = first_hidden(self.spec, n, self.device)
        for layer, module in enumerate(self.layers):
            index, weights = routing(self.replay, layer, n, self.device)
            hidden = residual_step(hidden, module(hidden, index, weights.to(hidden.dtype)))
        return hidden

