"""Typed configuration of the offloaded engine, validated in one place.

Everything a user can set lives in `OffloadConfig`; `validate()` checks the values that can be
checked without the model, `validate_for_model()` the ones that depend on it (cache size against
the number of experts). Both raise ValueError naming the allowed values, before any work is done.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .policies import HOST_POLICIES, POLICIES

DEVICES_HELP = '"auto", "cpu", "cuda" or "cuda:N"'
OFFLOAD_TIERS = ("auto", "ram", "disk")
EXPERT_BITS = (None, 2, 3, 4, 8)
ATTN_BITS = (None, 4, 8)
DTYPE_NAMES = ("float32", "float16", "bfloat16")  # the compute dtypes, by their torch names
DTYPES = ("auto", *DTYPE_NAMES)
MAX_HOST_CACHE_GB = 1e6  # host_cache_gb above this is refused (a petabyte; larger overflows a byte count)


def torch_dtype(name: str):
    """The torch dtype of one of `DTYPE_NAMES` (torch is imported only here, on first use)."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype={name!r} is not allowed: use one of {', '.join(DTYPE_NAMES)}")
    import torch

    return getattr(torch, name)


@dataclass
class OffloadConfig:
    """How a Mixture-of-Experts model is split between the compute device and a slower tier.

    device:       where attention and the expert cache live: "auto" (CUDA when present), "cpu",
                  "cuda" or "cuda:N".
    offload:      where experts live off the device: "ram" (every expert in host memory, pinned on CUDA;
                  refused, with the GB needed and available, when they do not fit), "disk" (the on-disk
                  expert store, read with O_DIRECT, through a host-RAM cache of host_cache_gb) or "auto"
                  ("ram" when every expert fits host_cache_gb, else "disk").
    host_cache_gb: host-RAM budget of the expert cache between the device slots and the disk store:
                  a number of GB (0: no host cache) or "auto" (what psutil says is available, minus
                  2 GB of headroom). One arena (pinned on CUDA) global across layers, with the cache's
                  eviction policy; on CUDA exclusive with the device slots (an expert is held by one of
                  them; experts evicted from the device are written back to it); on a CPU the experts
                  compute in the arena itself (no device copy), which also holds the cache_size experts
                  per layer in use (an expert in both is one record). More than the machine has, or less
                  than one expert per layer, is refused before any work.
    disk_prefetch_layers: with offload="disk", experts of the next this-many layers guessed from the
                  current one and read from disk into the host cache on its own I/O thread, behind
                  demand and device loads (0 disables).
    cache_size:   experts per MoE layer kept resident on the device (1..num_experts). On a CPU, where the
                  device is the host RAM, the experts each layer keeps ready to compute: records pinned in
                  the host arena (or the RAM tier), not copies; a hit there, or in the host cache, costs no copy.
    prefetch:     experts of layer L+1 guessed from layer L and loaded ahead (0 disables).
    expert_bits:  None (unquantized) or 2, 3, 4, 8 (HQQ).
    expert_group_size: HQQ group size of experts; None picks 32 for 2- and 3-bit (the paper used 16;
                  the fused int4 CPU kernel needs groups of 32 or more: docs/results.md has the quality
                  cost) and 64 for 4- and 8-bit.
    attn_bits:    None (unquantized) or 4, 8 (HQQ) for the attention projections.
    attn_group_size: HQQ group size of the attention projections (a power of two dividing them).
    quantize_meta: meta-quantize HQQ scales and zeros to 8 bits (the paper's setting).
    hqq_optimize: run HQQ's half-quadratic optimizer (better accuracy; slow on a CPU, seconds per Mixtral
                  expert matrix; fast on a GPU). False = round-to-nearest, same format.
    store_dir:    folder of the expert store, reused across runs (keyed by model and quant settings).
    policy:       eviction policy of the expert cache: "lru", "lfu" or "lfru".
    host_policy:  eviction policy of the host-RAM cache, one pool global across layers, visited layer by
                  layer: "quota-lfru" (each layer keeps its share of the pool; within it, decayed use
                  frequency), "quota-lfru-stay" (the same, experts used at their layer's latest visit
                  counting double: better on one RAM level, CPU-only), "lru" (thrashes once the budget is
                  below one token's experts), "lfu" or "quota-lru". docs/results.md has the host hit rates
                  of each against Belady.
    dtype:        compute dtype: "auto" (float16 on CUDA, float32 on CPU) or an explicit one; "bfloat16" on
                  CUDA needs compute capability 8.0+ (refused on a T4: kernels.capability).
    record_trace: keep a per-token routing trace (selected experts per layer) in the stats.
    delete_shards: for a hub repo id, delete each downloaded safetensors shard from the Hugging Face
                  cache as soon as its experts and dense tensors are in the store, so the disk holds the
                  store plus one or two shards (Mixtral-8x7B on a free Colab). Later starts need only the
                  store. Files of a local folder are never deleted (the setting is ignored, with a
                  warning). With offload="ram" and expert_bits=None it makes load() build a store.
    """

    device: str = "auto"
    offload: str = "auto"
    host_cache_gb: float | str = "auto"
    disk_prefetch_layers: int = 3
    cache_size: int = 2
    prefetch: int = 2
    expert_bits: int | None = None
    expert_group_size: int | None = None
    attn_bits: int | None = None
    attn_group_size: int = 64
    quantize_meta: bool = True
    hqq_optimize: bool = True
    store_dir: str = "expert-store"
    policy: str = "lru"
    host_policy: str = "quota-lfru"
    dtype: str = "auto"
    record_trace: bool = True
    delete_shards: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_device(self.device)
        _check_choice("offload", self.offload, OFFLOAD_TIERS)
        _check_choice("expert_bits", self.expert_bits, EXPERT_BITS)
        _check_choice("attn_bits", self.attn_bits, ATTN_BITS)
        _check_choice("policy", self.policy, tuple(POLICIES))
        _check_choice("host_policy", self.host_policy, tuple(HOST_POLICIES))
        _check_choice("dtype", self.dtype, DTYPES)
        _check_int("cache_size", self.cache_size, minimum=1)
        _check_int("prefetch", self.prefetch, minimum=0)
        _check_int("disk_prefetch_layers", self.disk_prefetch_layers, minimum=0)
        if self.host_cache_gb != "auto" and (isinstance(self.host_cache_gb, bool) or not isinstance(
                self.host_cache_gb, (int, float)) or not 0 <= self.host_cache_gb <= MAX_HOST_CACHE_GB):
            raise ValueError(f"host_cache_gb={self.host_cache_gb!r} is not allowed: use a number of GB in "
                             f"0..{MAX_HOST_CACHE_GB:g} (0: no host cache) or \"auto\"")
        for name in ("expert_group_size", "attn_group_size"):
            value = getattr(self, name)
            if value is None and name == "expert_group_size":
                continue
            _check_int(name, value, minimum=1)
            if value & (value - 1):
                raise ValueError(f"{name}={value!r} is not allowed: use a power of two (8, 16, 32, 64, 128...)")
        if not isinstance(self.store_dir, str) or not self.store_dir:
            raise ValueError(f"store_dir={self.store_dir!r} is not allowed: give a folder path")
        try:
            Path(self.store_dir).expanduser()  # "~/x" is the home folder's x (store.store_folder expands it)
        except RuntimeError:
            raise ValueError(f"store_dir={self.store_dir!r} is not allowed: its home folder does not exist") from None
        for name in ("delete_shards", "quantize_meta", "hqq_optimize", "record_trace"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed: use True or False")

    def validate_for_model(self, num_experts: int, top_k: int) -> None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"the model's config.json has num_experts_per_tok={top_k!r} with {num_experts} experts "
                             f"per layer: a token's experts must be 1..{num_experts}; config.json is wrong")
        if not 1 <= self.cache_size <= num_experts:
            raise ValueError(
                f"cache_size={self.cache_size} is not allowed for this model: "
                f"use 1..{num_experts} (it has {num_experts} experts per layer)"
            )
        if self.prefetch > num_experts:
            raise ValueError(
                f"prefetch={self.prefetch} is not allowed for this model: use 0..{num_experts}"
            )

    @property
    def expert_group(self) -> int:
        if self.expert_group_size is not None:
            return self.expert_group_size
        return 32 if self.expert_bits is not None and self.expert_bits <= 3 else 64

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        """Each setting's documentation from this class's docstring (the one place it is written),
        one line per setting: what `app.py --help` shows."""
        docs: dict[str, str] = {}
        current = None
        for line in (cls.__doc__ or "").splitlines():
            match = re.match(r"^    (\w+(?:, \w+)*):\s+(.*)$", line)
            if match:
                current = [name.strip() for name in match.group(1).split(",")]
                for name in current:
                    docs[name] = match.group(2).strip()
            elif current and line.startswith("     ") and line.strip():
                for name in current:
                    docs[name] += " " + line.strip()
            else:
                current = None
        return {f.name: docs[f.name] for f in fields(cls) if f.name in docs}

    @classmethod
    def from_dict(cls, values: dict) -> OffloadConfig:
        """Build from a dict, ignoring keys that are not settings (so saved files stay readable)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def _check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed or isinstance(value, bool):
        shown = ", ".join("None" if a is None else repr(a) for a in allowed)
        raise ValueError(f"{name}={value!r} is not allowed: use one of {shown}")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is not allowed: use an integer >= {minimum}")


def _check_device(device: str) -> None:
    if device in ("auto", "cpu", "cuda"):
        return
    if isinstance(device, str) and device.startswith("cuda:") and device[5:].isdigit():
        return
    raise ValueError(f"device={device!r} is not allowed: use {DEVICES_HELP}")
