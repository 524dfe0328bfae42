"""A complete store starts the model without the checkpoint; hub shards stream through the store build.

The checkpoints here are sharded like the hub's: contiguous runs of sorted keys, cut so that some
experts have w1 in one shard and w2/w3 in the next (or, in the fused layout, gate_up_proj and
down_proj in different shards). A fake hub serves them from a local folder, laid out like the
Hugging Face cache (blobs + snapshot links), and records how many shards were on disk at once.
"""

import fnmatch
import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from moe_runtime import OffloadConfig, load
from tiny_models import save_tiny_mixtral

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SPLIT_AFTER = {  # cut a shard right after these keys: the next expert tensor lands in the next shard
    "original": ["model.layers.0.block_sparse_moe.experts.1.w1.weight",
                 "model.layers.1.block_sparse_moe.experts.2.w2.weight",
                 "model.layers.1.self_attn.v_proj.weight"],
    "fused": ["model.layers.0.mlp.experts.down_proj", "model.layers.1.mlp.experts.down_proj",
              "model.layers.1.self_attn.v_proj.weight"],
}


def save_split_mixtral(path: Path, layout: str = "original", dtype: torch.dtype = torch.float32) -> Path:
    """A baby Mixtral in 4 hub-style shards, with experts split across shard boundaries."""
    save_tiny_mixtral(path, layers=2, shards=1, layout=layout)
    single = path / "model.safetensors"
    state = {k: v.to(dtype) for k, v in load_file(single).items()}
    single.unlink()
    keys = sorted(state)
    cuts = [0] + [keys.index(k) + 1 for k in SPLIT_AFTER[layout]] + [len(keys)]
    weight_map = {}
    for i, (start, stop) in enumerate(zip(cuts, cuts[1:])):
        name = f"model-{i + 1:05d}-of-{len(cuts) - 1:05d}.safetensors"
        save_file({k: state[k] for k in keys[start:stop]}, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys[start:stop], name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return path


@pytest.fixture(scope="module", params=["original", "fused"])
def split_model(request, tmp_path_factory):
    path = save_split_mixtral(tmp_path_factory.mktemp(request.param) / "model", request.param)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, reference


class FakeHub:
    """`snapshot_download` / `hf_hub_download` serving one repo from a local folder into a fake cache."""

    def __init__(self, origin: Path, cache: Path, offline_shards: bool = False) -> None:
        self.origin, self.blobs, self.snapshot = origin, cache / "blobs", cache / "snapshots" / COMMIT
        self.blobs.mkdir(parents=True)
        self.snapshot.mkdir(parents=True)
        self.offline_shards = offline_shards
        self.patterns: list = []
        self.downloads: list[str] = []
        self.most_shards_on_disk = 0

    def _fetch(self, name: str) -> Path:
        blob = self.blobs / name
        shutil.copyfile(self.origin / name, blob)
        link = self.snapshot / name
        if not link.is_symlink():
            link.symlink_to(Path("..", "..", "blobs", name))
        return link

    def snapshot_download(self, repo_id, *, allow_patterns=None, revision=None, **kwargs):
        assert repo_id == "fake-org/split-mixtral" and revision in (None, COMMIT)
        self.patterns.append(list(allow_patterns))
        for file in self.origin.iterdir():
            if any(fnmatch.fnmatch(file.name, p) for p in allow_patterns):
                self._fetch(file.name)
        return str(self.snapshot)

    def hf_hub_download(self, repo_id, filename, *, revision=None, **kwargs):
        assert repo_id == "fake-org/split-mixtral" and revision == COMMIT  # pinned to the snapshot
        if self.offline_shards:
            raise OSError("we are offline")
        path = self._fetch(filename)
        self.downloads.append(filename)
        on_disk = [p for p in self.blobs.iterdir() if p.suffix == ".safetensors"]
        self.most_shards_on_disk = max(self.most_shards_on_disk, len(on_disk))
        return str(path)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    def install(origin: Path, **kwargs) -> FakeHub:
        hub = FakeHub(origin, tmp_path / "hf-cache", **kwargs)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.hf_hub_download)
        return hub
    return install


def _logits(engine, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, engine.model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return engine.model(ids).logits


def _reference_logits(reference, vocab_size: int, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return reference(ids).logits


@pytest.mark.parametrize("offload,bits", [("disk", None), ("ram", 4)])
def test_a_complete_store_starts_the_model_without_any_shard(split_model, tmp_path, offload, bits):
    origin, reference = split_model
    model = tmp_path / "model"
    shutil.copytree(origin, model)
    config = OffloadConfig(device="cpu", offload=offload, cache_size=2, prefetch=1, expert_bits=bits,
                           hqq_optimize=False, store_dir=str(tmp_path / "store"))
    first = load(model, config)
    try:
        before = _logits(first)
        if bits is None:
            expected = _reference_logits(reference, first.model.config.vocab_size)
            torch.testing.assert_close(before, expected, atol=1e-4, rtol=1e-4)
    finally:
        first.close()
    names = {p.name for p in first.store_path.iterdir()}
    assert {"dense.safetensors", "experts.safetensors", "store.json"} <= names  # + what makes it a model
    assert not {n for n in names if n.endswith(".partial") or n == "build.journal"}
    for shard in model.glob("*.safetensors"):
        shard.unlink()
    second = load(model, config)
    try:
        assert second.store_path == first.store_path
        assert torch.equal(_logits(second), before)
    finally:
        second.close()


def test_dense_tensors_keep_their_dtype_and_transformers_names(tmp_path):
    model = save_split_mixtral(tmp_path / "model", dtype=torch.bfloat16)
    engine = load(model, OffloadConfig(device="cpu", offload="disk", store_dir=str(tmp_path / "store")))
    try:
        with safe_open(str(engine.store_path / "dense.safetensors"), framework="pt") as dense:
            names = set(dense.keys())
            assert {dense.get_tensor(n).dtype for n in names} == {torch.bfloat16}
        assert "model.layers.0.mlp.gate.weight" in names and not any("block_sparse_moe" in n for n in names)
        assert not any("experts" in n for n in names)
        reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        expected = _reference_logits(reference, engine.model.config.vocab_size)
        torch.testing.assert_close(_logits(engine), expected, atol=1e-4, rtol=1e-4)
    finally:
        engine.close()


def test_unquantized_ram_tier_packs_from_the_checkpoint_unless_a_store_exists(split_model, tmp_path):
    origin, _ = split_model
    model = tmp_path / "model"
    shutil.copytree(origin, model)
    store_dir = tmp_path / "store"
    ram = OffloadConfig(device="cpu", offload="ram", store_dir=str(store_dir))
    engine = load(model, ram)
    packed = _logits(engine)
    engine.close()
    assert engine.store_path is None and not store_dir.exists()  # the fast path writes nothing
    disk = load(model, OffloadConfig(device="cpu", offload="disk", store_dir=str(store_dir)))
    disk.close()
    for shard in model.glob("*.safetensors"):
        shard.unlink()
    again = load(model, ram)  # the same store serves the RAM tier once the shards are gone
    try:
        assert again.store_path == disk.store_path
        assert torch.equal(_logits(again), packed)
    finally:
        again.close()


def test_without_a_store_missing_shards_are_still_reported(split_model, tmp_path):
    origin, _ = split_model
    model = tmp_path / "model"
    shutil.copytree(origin, model)
    (model / "model-00002-of-00004.safetensors").unlink()
    for offload in ("ram", "disk"):
        with pytest.raises(ValueError, match="shards listed in model.safetensors.index.json are missing: "
                                             "model-00002-of-00004.safetensors"):
            load(model, OffloadConfig(device="cpu", offload=offload, store_dir=str(tmp_path / "store")))
    assert not list((tmp_path / "store").glob("*/*"))


def test_a_broken_shard_leaves_no_store_behind(split_model, tmp_path):
    origin, _ = split_model
    model = tmp_path / "model"
    shutil.copytree(origin, model)
    shard = model / "model-00003-of-00004.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load(model, OffloadConfig(device="cpu", offload="disk", store_dir=str(tmp_path / "store")))
    assert not list((tmp_path / "store").glob("*/*"))  # no store.json, no .partial files


def test_hub_repo_builds_the_store_shard_by_shard_and_deletes_them(split_model, tmp_path, fake_hub):
    origin, reference = split_model
    hub = fake_hub(origin)
    config = OffloadConfig(device="cpu", offload="disk", cache_size=2, prefetch=1, delete_shards=True,
                           store_dir=str(tmp_path / "store"))
    engine = load("fake-org/split-mixtral", config)
    try:
        expected = _reference_logits(reference, engine.model.config.vocab_size)
        torch.testing.assert_close(_logits(engine), expected, atol=1e-4, rtol=1e-4)
    finally:
        engine.close()
    shards = sorted(p.name for p in origin.glob("*.safetensors"))
    assert "*.safetensors" not in hub.patterns[0]  # the first fetch is the small files only
    assert hub.downloads == shards  # each shard once, in order
    assert hub.most_shards_on_disk <= 2
    assert not [p for p in hub.blobs.iterdir() if p.suffix == ".safetensors"]
    assert not list(hub.snapshot.glob("*.safetensors"))  # no dangling snapshot links either

    again = load("fake-org/split-mixtral", config)
    try:
        assert hub.downloads == shards  # a second start downloads no shard
        assert again.store_path == engine.store_path
        torch.testing.assert_close(_logits(again), expected, atol=1e-4, rtol=1e-4)
    finally:
        again.close()


def test_hub_shards_are_kept_unless_asked_and_quantized_stores_stream_too(split_model, tmp_path, fake_hub):
    origin, _ = split_model
    hub = fake_hub(origin)
    config = OffloadConfig(device="cpu", offload="ram", expert_bits=2, hqq_optimize=False,
                           store_dir=str(tmp_path / "store"))
    engine = load("fake-org/split-mixtral", config)
    hub_logits = _logits(engine)
    engine.close()
    shards = sorted(p.name for p in origin.glob("*.safetensors"))
    assert sorted(p.name for p in hub.blobs.iterdir() if p.suffix == ".safetensors") == shards
    local = load(origin, config)  # the same weights from a local folder: the same outputs
    try:  # (a store of its own: a hub store is named by its commit id, a local one by its content)
        assert local.store_path != engine.store_path
        assert torch.equal(_logits(local), hub_logits)
    finally:
        local.close()


def test_offline_hub_repo_without_a_store_is_a_clear_error(split_model, tmp_path, fake_hub, monkeypatch):
    origin, _ = split_model
    fake_hub(origin, offline_shards=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"cannot get shard model-00001-of-00004.safetensors of model "
                                         r"'fake-org/split-mixtral' from the hub \(HF_HUB_OFFLINE is set\)"):
        load("fake-org/split-mixtral", OffloadConfig(device="cpu", offload="disk", store_dir=str(tmp_path / "s")))
    assert not list((tmp_path / "s").glob("*/*"))


def test_hub_repo_without_an_index_is_fetched_whole_and_kept(tmp_path, fake_hub):
    origin = save_tiny_mixtral(tmp_path / "single", layers=2, shards=1)
    hub = fake_hub(origin)
    with pytest.warns(UserWarning, match="without model.safetensors.index.json .* must stay"):
        engine = load("fake-org/split-mixtral", OffloadConfig(device="cpu", offload="disk", delete_shards=True,
                                                              store_dir=str(tmp_path / "store")))
    try:
        reference = AutoModelForCausalLM.from_pretrained(origin, dtype=torch.float32).eval()
        expected = _reference_logits(reference, engine.model.config.vocab_size)
        torch.testing.assert_close(_logits(engine), expected, atol=1e-4, rtol=1e-4)
    finally:
        engine.close()
    assert hub.patterns[1] == ["*.safetensors"] and (hub.blobs / "model.safetensors").exists()


def test_local_files_are_never_deleted(split_model, tmp_path):
    origin, _ = split_model
    model = tmp_path / "model"
    shutil.copytree(origin, model)
    shards = sorted(model.glob("*.safetensors"))
    with pytest.warns(UserWarning, match="delete_shards=True is ignored .* never deleted"):
        engine = load(model, OffloadConfig(device="cpu", offload="disk", delete_shards=True,
                                           store_dir=str(tmp_path / "store")))
    engine.close()
    assert sorted(model.glob("*.safetensors")) == shards


def test_delete_shards_must_be_a_bool():
    with pytest.raises(ValueError, match="delete_shards='yes' is not allowed: use True or False"):
        OffloadConfig(delete_shards="yes")


def test_read_exactly_keeps_reading_after_short_reads(tmp_path, monkeypatch):
    import os

    from moe_runtime.store import read_exactly

    data = bytes(range(256)) * 40
    (tmp_path / "f").write_bytes(data)
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: real(fd, [bufs[0][:1000]], off))  # as read() past 2 GiB
    dst = torch.empty(len(data) - 100, dtype=torch.uint8)
    with open(tmp_path / "f", "rb") as f:
        read_exactly(f.fileno(), dst, 100, "test file")
        assert bytes(dst.numpy()) == data[100:]
        with pytest.raises(OSError, match="short read from test file"):
            read_exactly(f.fileno(), torch.empty(len(data), dtype=torch.uint8), 100, "test file")
