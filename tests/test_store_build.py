"""Store builds that survive SIGKILL, that two processes run at once, and whose identity is their content.

The killed builds and the concurrent loads are real processes (tests/store_worker.py); the kill
points are drawn at random (the seed is in the failure message).
"""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_runtime import OffloadConfig, load
from moe_runtime.loading import build_store
from moe_runtime.store import STORE_FILE
from moe_runtime.store.cli import main as store_cli
from tiny_models import save_tiny_mixtral

WORKER = Path(__file__).with_name("store_worker.py")
ROOT = WORKER.parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(WORKER.parent), os.environ.get("PYTHONPATH", "")])}
EXPERTS = 2 * 4  # the model below: 2 MoE layers of 4 experts
SEED = int(time.time())


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV)


def _config(**kw) -> OffloadConfig:
    return OffloadConfig(device="cpu", expert_bits=4, hqq_optimize=False, **kw)


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny_mixtral(tmp_path_factory.mktemp("src") / "model", layers=2, shards=3)


@pytest.fixture(scope="module")
def reference_store(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "store"
    report = build_store(model, _config(), out)
    assert (report.experts_built, report.experts_reused) == (EXPERTS, 0)
    return out


@pytest.mark.parametrize("point", ["after", "mid-record", "mid-meta"])
def test_a_build_killed_anywhere_resumes_to_the_same_store_building_only_what_is_missing(
        model, reference_store, tmp_path, capsys, point):
    k = random.Random(f"{SEED}-{point}").randrange(1, EXPERTS)
    where = point if point == "mid-meta" else f"{point}:{k}"
    out = tmp_path / "store"
    killed = _run("kill", str(model), str(out), where)
    assert killed.returncode == -9, (where, SEED, killed.stderr[-2000:])
    assert not (out / "store.json").exists()
    assert store_cli(["build", str(model), "--out", str(out), "--device", "cpu", "--expert-bits", "4",
                      "--no-hqq-optimize"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    kept = EXPERTS if point == "mid-meta" else k
    assert (line["experts_built"], line["experts_reused"]) == (EXPERTS - kept, kept), (where, SEED)
    assert line["store"] == str(out) and line["bytes"] > 0
    assert _contents(out) == _contents(reference_store), (where, SEED)  # byte for byte, every file


def test_a_damaged_record_in_an_interrupted_build_is_built_again(model, reference_store, tmp_path):
    out = tmp_path / "store"
    assert _run("kill", str(model), str(out), "after:5").returncode == -9
    partial = out / (STORE_FILE + ".partial")
    data = bytearray(partial.read_bytes())
    data[-1] ^= 0xFF  # the last record's page: written or not, the journal does not vouch for it now
    header = 8 + int.from_bytes(data[:8], "little")
    data[header + 7] ^= 0xFF  # the first record (layer 0, expert 0), which the build wrote first
    partial.write_bytes(bytes(data))
    report = build_store(model, _config(), out)
    assert report.experts_reused == 4 and report.experts_built == EXPERTS - 4
    assert _contents(out) == _contents(reference_store)


def test_store_verify_and_info_name_the_damaged_expert(reference_store, tmp_path, capsys):
    import shutil

    out = tmp_path / "store"
    shutil.copytree(reference_store, out)
    assert store_cli(["verify", str(out)]) == 0
    meta = json.loads((out / "store.json").read_text())
    file = out / STORE_FILE
    data = bytearray(file.read_bytes())
    data[meta["data_start"] + (1 * 4 + 2) * meta["stride"] + 3] ^= 0xFF  # layer 1, expert 2
    file.write_bytes(bytes(data))
    capsys.readouterr()
    assert store_cli(["verify", str(out)]) == 1
    assert "damaged: layer 1, expert 2" in capsys.readouterr().out
    assert store_cli(["info", str(out)]) == 1
    shown = capsys.readouterr().out
    assert "1 damaged: layer 1, expert 2" in shown and "expert bits: 4" in shown
    assert "identity derived from: safetensors headers + sampled content" in shown


def test_two_processes_loading_one_store_at_once_both_work(model, tmp_path):
    """10 trials: each, two processes start loading the same (not yet built) store at the same moment."""
    trials = 10
    workers = [subprocess.Popen([sys.executable, str(WORKER), "concurrent", str(model), str(tmp_path), str(trials),
                                 name], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for name in ("a", "b")]
    outputs = [w.communicate(timeout=240) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [err[-3000:] for _, err in outputs]
    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    engine = load(model, _config(offload="disk", store_dir=str(tmp_path / "trial-0" / "store")))
    try:
        with torch.no_grad():
            expected = engine.model(torch.arange(12).reshape(2, 6)).logits
    finally:
        engine.close()
    assert expected.shape[-1] == reference.config.vocab_size
    for trial in range(trials):
        folder = tmp_path / f"trial-{trial}"
        for name in ("a", "b"):
            assert torch.equal(torch.load(folder / f"logits-{name}.pt"), expected), (trial, name)
        stores = [p for p in (folder / "store").iterdir() if p.is_dir()]
        assert len(stores) == 1 and (stores[0] / "store.json").exists()
        assert not [p for p in stores[0].iterdir() if p.name.endswith(".partial") or p.name == "build.journal"]
    waited = sum("waiting for it to finish" in err for _, err in outputs)
    assert waited >= 1, "the lock was never contended: the trials did not overlap"


def test_same_named_checkpoints_with_other_weights_get_other_stores(tmp_path):
    a = save_tiny_mixtral(tmp_path / "runA" / "checkpoint-final", layers=2, seed=1)
    b = save_tiny_mixtral(tmp_path / "runB" / "checkpoint-final", layers=2, seed=2)
    assert (a / "config.json").read_text() == (b / "config.json").read_text()
    ids = torch.arange(12).reshape(2, 6)
    store_dir = str(tmp_path / "store")
    paths = []
    for folder in (a, b):
        engine = load(folder, OffloadConfig(device="cpu", offload="disk", store_dir=store_dir))
        try:
            reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            with torch.no_grad():
                torch.testing.assert_close(engine.model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
            paths.append(engine.store_path)
        finally:
            engine.close()
    assert paths[0] != paths[1] and paths[0].name.startswith("checkpoint-final-")
    identity = json.loads((paths[0] / "store.json").read_text())["identity"]["weights"]
    assert identity["derived_from"] == "safetensors headers + sampled content"


def test_an_interrupted_build_whose_records_file_lost_its_header_starts_over(model, reference_store, tmp_path):
    out = tmp_path / "store"
    assert _run("kill", str(model), str(out), "after:5").returncode == -9
    partial = out / (STORE_FILE + ".partial")
    data = bytearray(partial.read_bytes())
    data[20:40] = b"x" * 20  # the safetensors header no longer matches the layout: no record in it is trusted
    partial.write_bytes(bytes(data))
    report = build_store(model, _config(), out)
    assert (report.experts_built, report.experts_reused) == (EXPERTS, 0)
    assert _contents(out) == _contents(reference_store)
