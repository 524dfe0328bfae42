"""The Colab notebook runs all, top to bottom, on a CPU: its code cells are executed in one namespace,
as a kernel would, with only what exists on Colab alone stubbed (google.colab's secrets, the pip
install, the public share link) and the embedded tiny model in place of Mixtral."""

import json
import shutil
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest

from moe_runtime.paths import EMBEDDED_MODEL_DIR, REPO_ROOT

NOTEBOOK = REPO_ROOT / "notebooks" / "colab_t4.ipynb"


def _cells() -> list[str]:
    nb = json.loads(NOTEBOOK.read_text())
    return ["".join(cell["source"]) for cell in nb["cells"] if cell["cell_type"] == "code"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def colab(monkeypatch, tmp_path):
    """Colab's secrets (a token), pip recorded instead of run; the working directory restored after."""
    secrets = types.ModuleType("google.colab.userdata")
    secrets.get = lambda name: {"HF_TOKEN": "hf_notebook_test_token"}[name]
    colab_module = types.ModuleType("google.colab")
    colab_module.userdata = secrets
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab_module)
    monkeypatch.setitem(sys.modules, "google.colab.userdata", secrets)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    installs = []
    run = subprocess.run

    def run_or_record(args, *rest, **kw):
        if list(args[1:3]) == ["-m", "pip"]:
            installs.append(list(args))
            return subprocess.CompletedProcess(args, 0)
        return run(args, *rest, **kw)

    monkeypatch.setattr(subprocess, "run", run_or_record)
    return installs


def test_every_cell_is_python():
    for source in _cells():
        compile(source, str(NOTEBOOK), "exec")  # no shell escapes (!, %): a kernel and this test run the same code


def test_the_notebook_runs_all_with_a_tiny_model(colab, tmp_path):
    model = tmp_path / "tiny-mixtral"
    shutil.copytree(EMBEDDED_MODEL_DIR, model)
    cells = _cells()
    namespace = {"__name__": "__main__"}
    exec(cells[0], namespace)
    assert namespace["QUANT_FLAGS"][:4] == ["--expert-bits", "2", "--expert-group-size", "32"]  # the 2-bit default
    namespace.update(REPO_URL=str(REPO_ROOT), MODEL=str(model), STORE_DIR=str(tmp_path / "stores"), SHARE=False,
                     PORT=_free_port())
    try:
        for source in cells[1:]:
            exec(source, namespace)
        assert namespace["os"].environ["HF_TOKEN"] == "hf_notebook_test_token"
        [pip] = colab
        assert pip[3:5] == ["install", "-q"] and any(r.startswith("torch") for r in pip)
        assert not {"pytest", "ruff", "playwright", "openai"} & {r.split(">")[0].split("=")[0] for r in pip[5:]}
        store = Path(namespace["STORE_PATH"])
        assert (store / "store.json").exists() and (store / "offload.json").exists()
        assert namespace["MODEL_ARG"] == str(store) and namespace["demo"].local_url  # serving the store
    finally:
        if "demo" in namespace:
            namespace["demo"].close()


def test_an_unset_repository_url_stops_at_once_saying_what_to_set(colab):
    namespace = {}
    cells = _cells()
    exec(cells[0], namespace)
    exec(cells[1], namespace)
    with pytest.raises(ValueError, match="REPO_URL is not set: in the first cell"):
        exec(cells[2], namespace)
    assert not colab  # nothing was installed


def test_a_gated_model_without_access_stops_with_what_to_do(colab, monkeypatch):
    import httpx
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(repo_id, **kw):
        raise GatedRepoError("403", response=httpx.Response(403, request=httpx.Request("GET", "https://hf.co")))

    monkeypatch.setattr(huggingface_hub, "auth_check", gated)
    cells = _cells()
    namespace = {}
    exec(cells[0], namespace)
    exec(cells[1], namespace)
    token_cell = next(c for c in cells if "google.colab" in c)
    with pytest.raises(RuntimeError, match=r"mistralai/Mixtral-8x7B-Instruct-v0.1 is gated and this token cannot "
                                           r"read it \(GatedRepoError\): accept its conditions"):
        exec(token_cell, namespace)
    assert namespace["os"].environ["HF_TOKEN"] == "hf_notebook_test_token"  # set before the check
