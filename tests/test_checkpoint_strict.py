"""A checkpoint that does not fit its config.json is refused with the names (a few, and the count),
before any store is built; an index cannot point outside the model's folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from moe_runtime import OffloadConfig, load
from tiny_models import save_tiny_mixtral

OFFLOADS = ["ram", "disk"]  # the checkpoint fast path, and a store build


def _config(tmp_path, offload):
    return OffloadConfig(device="cpu", offload=offload, cache_size=2, prefetch=1, store_dir=str(tmp_path / "store"))


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _one_shard(tmp_path, **spec) -> Path:
    return save_tiny_mixtral(tmp_path / "model", shards=1, **spec)


@pytest.mark.parametrize("offload", OFFLOADS)
def test_more_layers_in_the_weights_than_in_config_json(tmp_path, offload):
    model = save_tiny_mixtral(tmp_path / "model", layers=4, shards=2)
    _edit_config(model, num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"has no place for: model\.layers\.3\..* and \d+ more \(\d+ in all\)"):
        load(model, _config(tmp_path, offload))
    assert not list((tmp_path / "store").glob("*/*"))  # refused before any work


@pytest.mark.parametrize("offload", OFFLOADS)
def test_an_expert_past_num_experts(tmp_path, offload):
    model = _one_shard(tmp_path, experts=4)
    _edit_config(model, num_local_experts=3)
    with pytest.raises(ValueError, match=r"has no place for: model\.layers\.0\.block_sparse_moe\.experts\.3\."):
        load(model, _config(tmp_path, offload))


@pytest.mark.parametrize("offload", OFFLOADS)
def test_a_missing_dense_tensor(tmp_path, offload):
    model = _one_shard(tmp_path)
    file = next(model.glob("*.safetensors"))
    state = load_file(str(file))
    del state["model.layers.1.self_attn.k_proj.weight"], state["model.norm.weight"]
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks tensors the model needs: model\.layers\.1\.self_attn\.k_proj\.weight, "
                                         r"model\.norm\.weight;"):
        load(model, _config(tmp_path, offload))


@pytest.mark.parametrize("offload", OFFLOADS)
def test_dense_shapes_that_do_not_match(tmp_path, offload):
    model = _one_shard(tmp_path, kv_heads=2)
    _edit_config(model, num_key_value_heads=4)  # k_proj and v_proj of every layer are half the size
    with pytest.raises(ValueError, match=r"wrong shape: model\.layers\.\d\.self_attn\.[kv]_proj\.weight \(16, 32\) "
                                         r"\(expected \(32, 32\)\).* and 2 more \(6 in all\)"):
        load(model, _config(tmp_path, offload))


@pytest.mark.parametrize("offload", OFFLOADS)
def test_expert_shapes_that_do_not_match(tmp_path, offload):
    model = _one_shard(tmp_path, intermediate=48)
    _edit_config(model, intermediate_size=40)
    with pytest.raises(ValueError, match=r"expert 0 of layer 0 has the wrong shape: gate \(48, 32\) \(expected "
                                         r"\(40, 32\)\)"):
        load(model, _config(tmp_path, offload))
    assert not list((tmp_path / "store").glob("*/store.json"))


@pytest.mark.parametrize("shard", ["../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_shard_names_stay_inside_the_folder(tmp_path, shard):
    model = save_tiny_mixtral(tmp_path / "model", shards=2)
    index = model / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    first = next(iter(content["weight_map"]))
    content["weight_map"][first] = shard
    index.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="names shard files outside its folder"):
        load(model, _config(tmp_path, "disk"))
