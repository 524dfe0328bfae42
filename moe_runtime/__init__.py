"""Run Mixture-of-Experts language models whose experts do not fit on the compute device.

    from moe_runtime import OffloadConfig, load
    engine = load("path/or/org-name", OffloadConfig(device="cpu", offload="disk", cache_size=2))

Names are imported lazily, so `python -m moe_runtime.sim` does not pay for transformers.
"""

from importlib import import_module

_EXPORTS = {
    "OffloadConfig": ".config",
    "Engine": ".engine",
    "GenerationSettings": ".engine",
    "StreamUpdate": ".engine",
    "load": ".loading",
    "RoutingTrace": ".stats",
    "Stats": ".stats",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moe_runtime' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
