"""A damaged store is never computed with: it is detected (file, layer, expert named), refused or
rebuilt, and the rebuilt store is again transformers' model. An unreadable store.json means none."""

from __future__ import annotations

import json
import os
import struct
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_runtime import OffloadConfig, load
from moe_runtime.cache import ExpertLoadError

IDS = torch.tensor([[5, 17, 3, 99, 42, 7, 250, 8, 1, 64, 33]])


@pytest.fixture(scope="module")
def expected(tiny_dir):
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return reference(IDS).logits


def _config(tmp_path, offload):
    return OffloadConfig(device="cpu", offload=offload, cache_size=2, prefetch=1, store_dir=str(tmp_path / "store"))


def _build(tiny_dir, tmp_path) -> Path:
    engine = load(tiny_dir, _config(tmp_path, "disk"))
    engine.close()
    return engine.store_path


def _logits(engine):
    with torch.no_grad():
        return engine.model(IDS).logits


def _header(file: Path) -> tuple[int, dict]:
    raw = file.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return 8 + length, json.loads(raw[8 : 8 + length])


def _record_span(store: Path, layer: int, expert: int) -> tuple[int, int]:
    start, header = _header(store / "experts.safetensors")
    begin, end = header[f"layers.{layer}.experts.{expert}"]["data_offsets"]
    return start + begin, start + end


def _patch(file: Path, offset: int, data: bytes) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        f.write(data)


def flip_every_record_of_layer_0(store):
    for expert in range(4):
        begin, _ = _record_span(store, 0, expert)
        _patch(store / "experts.safetensors", begin + 7, bytes([0xA5 ^ 0xFF]) * 3)


def swap_two_records(store):
    (a0, a1), (b0, b1) = _record_span(store, 0, 0), _record_span(store, 0, 1)
    raw = bytearray((store / "experts.safetensors").read_bytes())
    raw[a0:a1], raw[b0:b1] = raw[b0:b1], raw[a0:a1]
    (store / "experts.safetensors").write_bytes(bytes(raw))
    for expert in (2, 3):  # and damage the rest of layer 0, so any first use meets a damaged record
        begin, _ = _record_span(store, 0, expert)
        _patch(store / "experts.safetensors", begin, b"\x00" * 8)


def nan_into_every_record_of_layer_0(store):
    for expert in range(4):
        begin, _ = _record_span(store, 0, expert)
        _patch(store / "experts.safetensors", begin, struct.pack("<f", float("nan")) * 4)


DAMAGE = {"flipped bytes": flip_every_record_of_layer_0, "swapped records": swap_two_records,
          "a NaN": nan_into_every_record_of_layer_0}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_record_is_refused_on_the_disk_tier_then_rebuilt(tiny_dir, tmp_path, expected, damage):
    store = _build(tiny_dir, tmp_path)
    DAMAGE[damage](store)
    engine = load(tiny_dir, _config(tmp_path, "disk"))
    try:
        with pytest.raises(RuntimeError) as caught:
            _logits(engine)
        error = caught.value
        assert isinstance(error, ExpertLoadError) and error.layer == 0, repr(error)
        assert f"layer 0, expert {error.expert} does not match its checksum" in str(error)
        assert str(store / "experts.safetensors") in str(error)
    finally:
        engine.close()
    assert not (store / "store.json").exists()  # marked for a rebuild
    again = load(tiny_dir, _config(tmp_path, "disk"))
    try:
        torch.testing.assert_close(_logits(again), expected, atol=1e-4, rtol=1e-4)
    finally:
        again.close()


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_record_is_found_when_the_ram_tier_loads_and_the_store_rebuilt(tiny_dir, tmp_path, expected,
                                                                                damage):
    store = _build(tiny_dir, tmp_path)
    DAMAGE[damage](store)
    with pytest.warns(UserWarning, match=r"layer 0, expert \d does not match its checksum.*rebuilding"):
        engine = load(tiny_dir, _config(tmp_path, "ram"))
    try:
        torch.testing.assert_close(_logits(engine), expected, atol=1e-4, rtol=1e-4)
    finally:
        engine.close()


def zero_the_records_header_length(store):
    _patch(store / "experts.safetensors", 0, b"\x00" * 8)


def flip_bytes_of_a_dense_tensor(store):
    start, header = _header(store / "dense.safetensors")
    begin, _ = header["model.layers.1.self_attn.q_proj.weight"]["data_offsets"]
    _patch(store / "dense.safetensors", start + begin + 40, b"\x7f\x7f\x7f\x7f")


def store_json(content: bytes):
    return lambda store: (store / "store.json").write_bytes(content)


REBUILT = {"zeroed header length": zero_the_records_header_length, "flipped dense bytes": flip_bytes_of_a_dense_tensor,
           "store.json null": store_json(b"null"), "store.json []": store_json(b"[]"),
           "store.json binary": store_json(bytes(range(256))), "store.json number": store_json(b"12")}


@pytest.mark.parametrize("offload", ["disk", "ram"])
@pytest.mark.parametrize("damage", list(REBUILT))
def test_a_damaged_store_is_not_a_store_and_is_rebuilt(tiny_dir, tmp_path, expected, damage, offload):
    store = _build(tiny_dir, tmp_path)
    REBUILT[damage](store)
    config = OffloadConfig(device="cpu", offload=offload, expert_bits=None, cache_size=2, prefetch=1,
                           store_dir=str(tmp_path / "store"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = load(tiny_dir, config)
    try:
        torch.testing.assert_close(_logits(engine), expected, atol=1e-4, rtol=1e-4)
    finally:
        engine.close()
    if offload == "disk":  # the disk tier always reads from a store: it was rebuilt
        assert json.loads((store / "store.json").read_text())["version"] >= 2


def test_a_damaged_dense_file_warns_naming_the_tensor(tiny_dir, tmp_path):
    store = _build(tiny_dir, tmp_path)
    flip_bytes_of_a_dense_tensor(store)
    with pytest.warns(UserWarning, match="dense.safetensors: tensor model.layers.1.self_attn.q_proj.weight does "
                                         "not match its checksum"):
        load(tiny_dir, _config(tmp_path, "disk")).close()


def test_records_are_on_disk_before_store_json_names_them(tiny_dir, tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    _build(tiny_dir, tmp_path)
    meta_at = events.index(("replace", "store.json"))
    before = events[:meta_at]
    assert ("fsync", "experts.safetensors.partial") in before, events
    assert ("fsync", "dense.safetensors.partial") in before, events
    assert ("fsync", f"store.json.{os.getpid()}.partial") in before, events  # a name of this process's own
    assert before.index(("replace", "experts.safetensors")) < meta_at


def test_a_safetensors_header_length_past_the_file_is_a_clear_error_not_an_allocation(tmp_path):
    """A corrupt 8-byte header length (here 2**62) is refused from the file's size, before any read."""
    from moe_runtime.store.check import _damaged_dense
    from moe_runtime.store.identity import _header

    bad = tmp_path / "dense.safetensors"
    bad.write_bytes((2**62).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="header length .* runs past the end of the file"):
        _header(bad)
    assert _damaged_dense(bad, {}) == [f"{bad} cannot be read: its header length runs past the end of the file"]
