"""The simulator: `python -m moe_runtime.sim TRACE` (cli.py).

replay.py replays a routing trace against cache policies (Belady's MIN included); throughput.py turns
loads per token into predicted tokens/s on named hardware; report.py renders tables and a figure.
"""
