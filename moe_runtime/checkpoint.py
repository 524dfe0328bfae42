"""Reading checkpoints: a local folder or a hub repo id, safetensors only, tensor by tensor.

Nothing here unpickles: `.bin`/`.pt`/`.pth` checkpoints are refused. Tensors are read lazily
(`safe_open`), so a caller that streams expert by expert never holds more than one shard's worth.
Every failure becomes a ValueError that names the file and what is wrong.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def resolve_model_dir(name_or_path: str) -> Path:
    """A local folder as is; otherwise a hub repo id, fetched (safetensors and configs only)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"model path {name_or_path!r} is a file: give the folder holding config.json")
    if name_or_path.count("/") != 1 or name_or_path.startswith((".", "/", "~")):
        raise ValueError(
            f"model {name_or_path!r} is neither a local folder nor a hub repo id like 'org/name'"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, allow_patterns=HUB_PATTERNS))
    except Exception as err:  # offline, unknown repo, gated repo, ...
        offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
        hint = " (HF_HUB_OFFLINE is set)" if offline else ""
        raise ValueError(
            f"cannot get model {name_or_path!r} from the hub{hint}: {type(err).__name__}: {err}. "
            "Download it while online, or pass a local folder with config.json and *.safetensors."
        ) from None


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index} is not a valid safetensors index: {err}") from None
        files = sorted({model_dir / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ValueError(f"{model_dir}: shards listed in {INDEX_FILE} are missing: {', '.join(missing)}")
        return files
    single = model_dir / SINGLE_FILE
    if single.exists():
        return [single]
    shards = sorted(model_dir.glob("*.safetensors"))
    if shards:
        return shards
    pickled = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ValueError(
            f"{model_dir} holds only pickle checkpoints ({', '.join(pickled)}), which are refused "
            "because loading them can run arbitrary code. Convert them to safetensors first."
        )
    raise ValueError(f"{model_dir} has no *.safetensors weights")


class Checkpoint:
    """Lazy access to every tensor of a safetensors checkpoint, by key.

    safetensors memory-maps each shard, and the pages a read touches count as resident memory for
    as long as the shard stays mapped; at most `max_open` shards stay open, so streaming through a
    93 GB checkpoint keeps about one or two shards resident, not the whole model.
    """

    def __init__(self, model_dir: Path, max_open: int = 2) -> None:
        self.model_dir = Path(model_dir)
        self.files = _weight_files(self.model_dir)
        self.max_open = max_open
        self._handles: OrderedDict[Path, object] = OrderedDict()
        self.key_to_file: dict[str, Path] = {}
        for file in self.files:
            handle = self._open(file)
            for key in handle.keys():
                self.key_to_file[key] = file

    def _open(self, file: Path):
        if file in self._handles:
            self._handles.move_to_end(file)
            return self._handles[file]
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as err:
            raise ValueError(f"{file} is not a readable safetensors file (corrupt or truncated?): {err}") from None
        self._handles[file] = handle
        while len(self._handles) > self.max_open:
            self._handles.popitem(last=False)
        return handle

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def get(self, key: str) -> torch.Tensor:
        file = self.key_to_file.get(key)
        if file is None:
            raise ValueError(f"checkpoint {self.model_dir} has no tensor {key!r}")
        try:
            return self._open(file).get_tensor(key)
        except Exception as err:
            raise ValueError(f"cannot read {key!r} from {file} (corrupt or truncated?): {err}") from None

    def get_slice(self, key: str, index: int) -> torch.Tensor:
        """`tensor[index]` without reading the rest of the tensor (one expert of a fused tensor)."""
        file = self.key_to_file.get(key)
        if file is None:
            raise ValueError(f"checkpoint {self.model_dir} has no tensor {key!r}")
        try:
            return self._open(file).get_slice(key)[index]
        except Exception as err:
            raise ValueError(f"cannot read {key!r}[{index}] from {file} (corrupt or truncated?): {err}") from None

    def fingerprint(self) -> dict:
        """What identifies these weights for the expert store's cache key."""
        return {f.name: f.stat().st_size for f in self.files}
