"""Run Mixture-of-Experts language models whose experts do not fit on the compute device.

    from moe_runtime import OffloadConfig, load
    engine = load("path/or/org-name", OffloadConfig(device="cpu", offload="disk", cache_size=2))
"""

from .config import OffloadConfig
from .engine import Engine, GenerationSettings, StreamUpdate
from .loading import load
from .stats import RoutingTrace, Stats

__all__ = ["Engine", "GenerationSettings", "OffloadConfig", "RoutingTrace", "Stats", "StreamUpdate", "load"]
