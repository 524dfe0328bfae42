"""Loading edge cases, each refused with a clear ValueError before work (or handled): a top-k the
expert count cannot give, dense tensors of the wrong shape (before a store is written), an absurd
host-cache size, a deeply nested store.json, and a store_dir under "~"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_runtime import OffloadConfig, load
from moe_runtime.store import read_meta, store_folder
from tiny_models import save_tiny_mixtral


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _config(tmp_path, **changes) -> OffloadConfig:
    return OffloadConfig(**{"device": "cpu", "cache_size": 2, "prefetch": 1, "store_dir": str(tmp_path / "store"),
                            **changes})


@pytest.mark.parametrize("top_k", [0, 5])
def test_num_experts_per_tok_beyond_the_expert_count_is_refused_before_loading(tmp_path, top_k):
    model = save_tiny_mixtral(tmp_path / "model", experts=4, shards=1)
    _edit_config(model, num_experts_per_tok=top_k)
    with pytest.raises(ValueError, match=rf"num_experts_per_tok={top_k} with 4 experts per layer: .* 1\.\.4"):
        load(model, _config(tmp_path))
    assert not (tmp_path / "store").exists()


def test_dense_shape_mismatches_are_refused_before_a_store_is_written(tmp_path):
    model = save_tiny_mixtral(tmp_path / "model", kv_heads=2, shards=1)
    _edit_config(model, num_key_value_heads=4)  # k_proj and v_proj are half the size config.json says
    with pytest.raises(ValueError, match=r"wrong shape: model\.layers\.0\.self_attn\.k_proj\.weight \(16, 32\) "
                                         r"\(expected \(32, 32\)\)"):
        load(model, _config(tmp_path, offload="disk"))
    written = [p for p in (tmp_path / "store").rglob("*") if p.is_file()] if (tmp_path / "store").exists() else []
    assert written == [], written  # not one expert record, let alone a whole store


@pytest.mark.parametrize("value", [1e300, float("inf"), float("nan"), -1.0])
def test_an_absurd_host_cache_size_is_a_clear_value_error(value):
    with pytest.raises(ValueError, match=r"host_cache_gb=.* is not allowed: use a number of GB in 0\.\.1e\+06"):
        OffloadConfig(host_cache_gb=value)
    OffloadConfig(host_cache_gb=1e6)


def test_a_deeply_nested_store_json_reads_as_no_store(tmp_path):
    (tmp_path / "store.json").write_text("[" * 100_000 + "]" * 100_000)
    assert read_meta(tmp_path) is None  # not a RecursionError: the store is rebuilt


def test_a_store_dir_under_home_is_the_home_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = store_folder("~/stores", "some/model", {"a": 1})
    assert folder.parent == tmp_path / "stores" and "~" not in str(folder)
    with pytest.raises(ValueError, match="its home folder does not exist"):
        OffloadConfig(store_dir="~no-such-user-here/x")


def test_a_model_loads_into_a_store_dir_under_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    model = save_tiny_mixtral(tmp_path / "model", shards=1)
    engine = load(model, _config(tmp_path, store_dir="~/x", offload="disk"))
    try:
        assert list((tmp_path / "home" / "x").glob("*/store.json")) and not (tmp_path / "~").exists()
    finally:
        engine.close()
