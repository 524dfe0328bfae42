"""Bad settings and broken checkpoints give a clear ValueError, never a traceback from deep inside torch."""

import json
import shutil

import pytest

from moe_runtime import OffloadConfig, load


@pytest.mark.parametrize("settings,message", [
    (dict(cache_size=0), "cache_size=0 is not allowed"),
    (dict(prefetch=-1), "prefetch=-1 is not allowed"),
    (dict(expert_bits=5), "expert_bits=5 is not allowed: use one of None, 2, 3, 4, 8"),
    (dict(attn_bits=2), "attn_bits=2 is not allowed: use one of None, 4, 8"),
    (dict(offload="ssd"), "offload='ssd' is not allowed: use one of 'auto', 'ram', 'disk'"),
    (dict(device="tpu"), "device='tpu' is not allowed"),
    (dict(policy="fifo"), "policy='fifo' is not allowed"),
    (dict(expert_group_size=24), "expert_group_size=24 is not allowed"),
    (dict(dtype="float64"), "dtype='float64' is not allowed"),
])
def test_bad_settings_name_the_allowed_values(settings, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        OffloadConfig(**settings)


def test_cache_size_above_the_number_of_experts(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match=r"cache_size=5 is not allowed for this model: use 1..4"):
        load(tiny_dir, OffloadConfig(device="cpu", cache_size=5, store_dir=str(tmp_path)))


def test_cuda_without_a_gpu(tiny_dir, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        load(tiny_dir, OffloadConfig(device="cuda", store_dir=str(tmp_path)))


@pytest.fixture
def copy_dir(tiny_dir, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(tiny_dir, target)
    return target


def _shards(folder):
    return sorted(folder.glob("*.safetensors"))


def test_corrupt_safetensors(copy_dir, tmp_path):
    _shards(copy_dir)[0].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load(copy_dir, OffloadConfig(device="cpu", store_dir=str(tmp_path / "s")))


def test_truncated_safetensors(copy_dir, tmp_path):
    shard = _shards(copy_dir)[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load(copy_dir, OffloadConfig(device="cpu", store_dir=str(tmp_path / "s")))


def test_missing_shard(copy_dir, tmp_path):
    _shards(copy_dir)[0].unlink()
    with pytest.raises(ValueError, match="shards listed in model.safetensors.index.json are missing"):
        load(copy_dir, OffloadConfig(device="cpu", store_dir=str(tmp_path / "s")))


def test_pickle_only_folder_is_refused(copy_dir, tmp_path):
    for f in _shards(copy_dir):
        f.unlink()
    (copy_dir / "model.safetensors.index.json").unlink()
    (copy_dir / "pytorch_model.bin").write_bytes(b"not loaded, never unpickled")
    with pytest.raises(ValueError, match=r"only pickle checkpoints \(pytorch_model.bin\), which are refused"):
        load(copy_dir, OffloadConfig(device="cpu", store_dir=str(tmp_path / "s")))


def test_missing_expert_tensor(copy_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    shard = next(f for f in _shards(copy_dir) if any("experts.0.w1" in k for k in load_file(f)))
    tensors = {k: v for k, v in load_file(shard).items() if "experts.0.w1" not in k}
    save_file(tensors, str(shard))
    index = json.loads((copy_dir / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if "experts.0.w1" not in k}
    (copy_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="lacks expert tensors: model.layers.0.block_sparse_moe.experts.0.w1.weight"):
        load(copy_dir, OffloadConfig(device="cpu", store_dir=str(tmp_path / "s")))


def test_unsupported_architecture(copy_dir, tmp_path):
    config = json.loads((copy_dir / "config.json").read_text())
    config["model_type"] = "llama"
    config["architectures"] = ["LlamaForCausalLM"]
    (copy_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture 'llama': supported model types are .*mixtral"):
        load(copy_dir, OffloadConfig(device="cpu", store_dir=str(tmp_path / "s")))


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        load(tmp_path / "empty", OffloadConfig(device="cpu"))


def test_unknown_path_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="neither a local folder nor a hub repo id"):
        load(str(tmp_path / "no" / "such" / "dir"), OffloadConfig(device="cpu"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="cannot get model 'someone/not-downloaded' from the hub"):
        load("someone/not-downloaded", OffloadConfig(device="cpu"))


def test_group_size_must_divide_the_expert(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="expert_group_size=4096 does not divide"):
        load(tiny_dir, OffloadConfig(device="cpu", expert_bits=4, expert_group_size=4096, store_dir=str(tmp_path)))
