"""The decode-speed benchmark: `python -m moe_runtime.bench` (cli.py).

measure.py (a job, timed steps, counter windows) <- runners.py (model part: model.py; Mixtral-shaped
workload: workload.py, accelerate.py) <- cli.py (plans, isolation, machine facts); report.py renders.
"""
