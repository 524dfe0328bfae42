"""A real process for the store tests: a build killed with SIGKILL at a chosen point, or one of two
processes loading the same store at once. Run by tests/test_store_build.py, not collected by pytest.

  python tests/store_worker.py kill MODEL OUT after:K|mid-record:K|mid-meta
  python tests/store_worker.py concurrent MODEL ROOT TRIALS NAME
"""

import os
import signal
import sys
import time
from pathlib import Path

import torch


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill(model: str, out: str, where: str) -> None:
    from moe_runtime.store import build
    from moe_runtime.store.cli import main

    point, _, k = where.partition(":")
    if point == "after":  # killed right after the k-th expert is journalled (written and synced)
        add, done = build.BuildJournal.add, []

        def add_then_die(self, entry):
            add(self, entry)
            done.extend(["x"] if "expert" in entry else [])
            if len(done) == int(k):
                die()
        build.BuildJournal.add = add_then_die
    elif point == "mid-record":  # killed with half of record k+1 written
        pwrite, calls = os.pwrite, []

        def half_then_die(fd, data, offset):
            calls.append(1)
            if len(calls) == int(k) + 1:
                pwrite(fd, data[: len(data) // 2], offset)
                die()
            return pwrite(fd, data, offset)
        os.pwrite = half_then_die
    elif point == "mid-meta":  # killed with store.json's temporary file half written, before its rename
        replace = os.replace

        def torn_then_die(src, dst):
            if str(dst).endswith("store.json"):
                data = Path(src).read_bytes()
                Path(src).write_bytes(data[: len(data) // 2])
                die()
            return replace(src, dst)
        os.replace = torn_then_die
    main(["build", model, "--out", out, "--device", "cpu", "--expert-bits", "4", "--no-hqq-optimize"])
    sys.exit(3)  # not killed: the test fails on this exit status


def concurrent(model: str, root: str, trials: int, name: str) -> None:
    from moe_runtime import OffloadConfig, load

    ids = torch.arange(12).reshape(2, 6)
    for trial in range(int(trials)):
        folder = Path(root) / f"trial-{trial}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"ready-{name}").touch()
        while len(list(folder.glob("ready-*"))) < 2:  # both processes start the trial together
            time.sleep(0.002)
        engine = load(model, OffloadConfig(device="cpu", offload="disk", expert_bits=4, hqq_optimize=False,
                                           store_dir=str(folder / "store")))
        with torch.no_grad():
            torch.save(engine.model(ids).logits, folder / f"logits-{name}.pt")
        engine.close()


if __name__ == "__main__":
    {"kill": kill, "concurrent": concurrent}[sys.argv[1]](*sys.argv[2:])
