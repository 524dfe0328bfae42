"""A store folder is a model: loaded with its source checkpoint gone, refused with other settings,
pushed to the hub (the upload mocked) and pulled from a repository in the hub cache layout."""

import hashlib
import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from baby_families import save_baby
from huggingface_hub import constants
from transformers import AutoModelForCausalLM

import app
from moe_runtime import OffloadConfig, load
from moe_runtime.loading import build_store
from moe_runtime.paths import EMBEDDED_MODEL_DIR
from moe_runtime.store import DENSE_FILE, STORE_FILE
from moe_runtime.store.cli import main as store_cli
from webapp.service import EngineService

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def _logits(model, vocab: int) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def embedded_store(tmp_path_factory):
    """The embedded tiny Mixtral's store (unquantized), built by load(), with the source copy deleted after."""
    root = tmp_path_factory.mktemp("embedded")
    source = root / "tiny-mixtral"
    shutil.copytree(EMBEDDED_MODEL_DIR, source)
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    expected = _logits(reference, reference.config.vocab_size)
    engine = load(source, OffloadConfig(device="cpu", offload="disk", store_dir=str(root / "stores")))
    store = engine.store_path
    engine.close()
    shutil.rmtree(source)
    return store, expected


def test_the_embedded_model_loads_from_its_store_with_the_checkpoint_gone(embedded_store):
    store, expected = embedded_store
    assert {"config.json", "tokenizer.json", "generation_config.json", "README.md", "offload.json"} <= {
        p.name for p in store.iterdir()}
    engine = load(store, OffloadConfig(device="cpu", offload="ram"))
    try:
        torch.testing.assert_close(_logits(engine.model, expected.shape[-1]), expected, atol=1e-4, rtol=1e-4)
        assert engine.tokenizer("To be").input_ids  # the tokenizer came along
    finally:
        engine.close()


def test_app_starts_on_a_store_folder(embedded_store):
    store, expected = embedded_store
    args = app.parse_args(["--model", str(store), "--device", "cpu", "--allow-local-paths"])
    service = EngineService(args.model, app.config_from_args(args))
    engine = service.start()
    try:
        torch.testing.assert_close(_logits(engine.model, expected.shape[-1]), expected, atol=1e-4, rtol=1e-4)
    finally:
        service.close()


def test_a_baby_family_store_built_by_the_cli_loads_without_its_source(tmp_path, capsys):
    source = save_baby("qwen2_moe", tmp_path / "qwen2_moe")
    (source / "README.md").write_text("---\nlicense: apache-2.0\n---\n# baby\n")
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    expected = _logits(reference, reference.config.vocab_size)
    out, out8 = tmp_path / "store", tmp_path / "store-attn8"
    assert store_cli(["build", str(source), "--out", str(out), "--device", "cpu"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["experts_built"] > 0 and line["experts_reused"] == 0
    assert store_cli(["build", str(source), "--out", str(out8), "--device", "cpu", "--attn-bits", "8"]) == 0
    shutil.rmtree(source)
    card = (out8 / "README.md").read_text()
    assert "license: apache-2.0" in card and "| `attn_bits` | `8` |" in card
    engine = load(out, OffloadConfig(device="cpu", offload="disk"))
    try:
        torch.testing.assert_close(_logits(engine.model, expected.shape[-1]), expected, atol=1e-4, rtol=1e-4)
    finally:
        engine.close()
    engine = load(out8, OffloadConfig(device="cpu", offload="disk"))
    try:
        assert engine.config.attn_bits == 8  # the store's setting, as the default was left alone
    finally:
        engine.close()


def test_other_settings_are_refused_naming_the_stores(embedded_store):
    store, _ = embedded_store
    with pytest.raises(ValueError, match=r"built with expert_bits=None, expert_group_size=64, .*cannot be loaded "
                                         r"with expert_bits=4"):
        load(store, OffloadConfig(device="cpu", expert_bits=4))


def test_push_uploads_the_store_folder_with_huggingface_hub(embedded_store, monkeypatch, capsys):
    store, _ = embedded_store
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_large_folder(self, **kw):
            calls.append(("upload_large_folder", kw))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert store_cli(["push", str(store), "--repo", "someone/tiny-store"]) == 0
    assert capsys.readouterr().out.strip() == "https://huggingface.co/someone/tiny-store"
    assert calls[0] == ("create_repo", "someone/tiny-store", {"repo_type": "model", "private": False, "exist_ok": True})
    upload = calls[1][1]
    assert upload["repo_id"] == "someone/tiny-store" and upload["folder_path"] == str(store)
    assert {"*.partial", "build.journal"} <= set(upload["ignore_patterns"])


def _damaged_copy(store: Path, to: Path) -> Path:
    """A copy of `store` with one byte of its last record (layer 3, expert 7) flipped."""
    shutil.copytree(store, to)
    data = bytearray((to / STORE_FILE).read_bytes())
    data[-10] ^= 0xFF
    (to / STORE_FILE).write_bytes(bytes(data))
    return to


def test_push_refuses_a_damaged_store(embedded_store, tmp_path, monkeypatch, capsys):
    store, _ = embedded_store
    copy = _damaged_copy(store, tmp_path / "store")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: pytest.fail("a damaged store was uploaded"))
    assert store_cli(["push", str(copy), "--repo", "someone/tiny-store"]) == 2
    assert "damaged (layer 3, expert 7)" in capsys.readouterr().err


def _cache_file(snapshot: Path, file: Path) -> None:
    """`file` as the hub cache holds a downloaded file: a blob by hash and the snapshot's link to it."""
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    shutil.copyfile(file, snapshot.parent.parent / "blobs" / digest)
    (snapshot / file.name).symlink_to(Path("..", "..", "blobs", digest))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A store repository in the hub cache layout, offline: the first snapshot_download finds its small
    files there, the second "downloads" the store files into the cache (recorded: what was asked)."""
    def install(folder: Path, repo: str = "someone/tiny-store"):
        root = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
        snapshot = root / "snapshots" / COMMIT
        (root / "blobs").mkdir(parents=True)
        snapshot.mkdir(parents=True)
        (root / "refs").mkdir()
        (root / "refs" / "main").write_text(COMMIT)
        for file in folder.iterdir():
            if file.is_file() and file.name not in (STORE_FILE, DENSE_FILE):
                _cache_file(snapshot, file)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        requested = []
        real = huggingface_hub.snapshot_download

        def download(repo_id, allow_patterns=None, **kw):
            requested.append(allow_patterns)
            for name in (STORE_FILE, DENSE_FILE):
                if name in (allow_patterns or []) and not (snapshot / name).exists():
                    _cache_file(snapshot, folder / name)
            return real(repo_id, allow_patterns=allow_patterns, **kw)

        monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
        return snapshot, requested
    return install


def test_load_pulls_a_store_repository_from_the_hub_cache(embedded_store, hub):
    store, expected = embedded_store
    snapshot, requested = hub(store)
    for _ in range(2):  # downloaded and checked, then found in the cache
        engine = load("someone/tiny-store", OffloadConfig(device="cpu", offload="disk"))
        try:
            assert engine.store_path == snapshot
            torch.testing.assert_close(_logits(engine.model, expected.shape[-1]), expected, atol=1e-4, rtol=1e-4)
        finally:
            engine.close()
    assert requested[1] == ["experts.safetensors", "dense.safetensors", "README.md"]  # the store, nothing else


def test_a_pulled_store_that_does_not_match_its_checksums_is_refused(embedded_store, tmp_path, hub):
    store, _ = embedded_store
    origin = _damaged_copy(store, tmp_path / "origin")
    snapshot, _ = hub(origin)
    with pytest.raises(ValueError, match=r"does not match its checksums \(layer 3, expert 7\)"):
        load("someone/tiny-store", OffloadConfig(device="cpu", offload="disk"))
    assert not (snapshot / STORE_FILE).exists()  # removed, so the next try downloads it again


def test_build_reuses_a_complete_store(embedded_store, tmp_path):
    source = tmp_path / "tiny"
    shutil.copytree(EMBEDDED_MODEL_DIR, source)
    first = build_store(source, OffloadConfig(device="cpu", expert_bits=4, hqq_optimize=False), tmp_path / "s")
    again = build_store(source, OffloadConfig(device="cpu", expert_bits=4, hqq_optimize=False), tmp_path / "s")
    assert (first.experts_built, again.experts_built, again.experts_reused) == (32, 0, 32)


def test_a_store_built_for_another_device_is_refused_naming_both_forms(tmp_path):
    """A store's records are in the form of the device it was built for: a 4-bit store built on this CPU
    (int4-cpu records) is refused where another form is computed from (the CUDA record, triton-hqq) —
    stood in for here by rewriting its store.json — with both forms named, never misread."""
    source = tmp_path / "tiny-mixtral"
    shutil.copytree(EMBEDDED_MODEL_DIR, source)
    report = build_store(source, OffloadConfig(device="cpu", expert_bits=4, hqq_optimize=False), out=tmp_path / "s")
    store = Path(report.store)
    meta = json.loads((store / "store.json").read_text())
    assert meta["form"] == "int4-cpu"
    meta["form"] = "triton-hqq"
    (store / "store.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"'triton-hqq', this device computes from 'int4-cpu'.*store build"):
        load(store, OffloadConfig(device="cpu"))
