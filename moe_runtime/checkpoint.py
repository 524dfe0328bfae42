"""Reading checkpoints: a local folder or a hub repo id, safetensors only, tensor by tensor.

Nothing here unpickles: `.bin`/`.pt`/`.pth` checkpoints are refused. Tensors are read lazily
(`safe_open`), so a caller that streams expert by expert never holds more than one shard's worth.
A hub repo is fetched in two steps: the small files first (config, index, tokenizer), then the
weight shards one at a time, only when they are needed (`ModelSource.shard`), so a caller that
already has what it needs from the shards (the expert store) downloads none of them.
Every failure becomes a ValueError that names the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SMALL_PATTERNS = ["*.json", "tokenizer*", "*.model", "*.txt", "*.jinja"]  # config, index, tokenizer, generation
WEIGHT_PATTERNS = ["*.safetensors"]


def _hub_error(what: str, err: Exception) -> ValueError:
    offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
    hint = " (HF_HUB_OFFLINE is set)" if offline else ""
    return ValueError(
        f"cannot get {what} from the hub{hint}: {type(err).__name__}: {err}. "
        "Download it while online, or pass a local folder with config.json and *.safetensors."
    )


class ModelSource:
    """A model's folder, and where its weight shards come from.

    `folder` holds config.json, the tokenizer and the safetensors index (if any). For a local
    folder the shards are there too and are never deleted; for a hub repo each shard is downloaded
    by `shard()` (into the Hugging Face cache) and can be deleted again with `remove()`.
    """

    def __init__(self, folder: Path, repo_id: str | None = None, revision: str | None = None) -> None:
        self.folder, self.repo_id, self.revision = Path(folder), repo_id, revision

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None

    def shard(self, name: str) -> Path:
        """The local path of weight file `name`, downloading it first for a hub repo."""
        if self.repo_id is None:
            return self.folder / name
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(repo_id=self.repo_id, filename=name, revision=self.revision))
        except Exception as err:  # offline, deleted upstream, disk full, ...
            raise _hub_error(f"shard {name} of model {self.repo_id!r}", err) from None

    def remove(self, path: Path) -> None:
        """Delete a downloaded shard from the hub cache: the blob and the snapshot's link to it."""
        if self.repo_id is None:
            raise RuntimeError(f"refusing to delete {path}: files of a local folder are never deleted")
        path = Path(path)
        blob = path.resolve()
        for file in {blob, path}:
            file.unlink(missing_ok=True)


def open_model(name_or_path: str, pull_store: Callable[[str, Path, str | None], Path]) -> ModelSource:
    """A local folder as is; otherwise a hub repo id, of which only the small files are fetched now.

    A hub checkpoint without a safetensors index cannot say which shards it has without them, so
    its weights are fetched here too (such checkpoints are small: one file). A store repository's
    files are fetched by `pull_store(repo, small_files_folder, revision) -> folder` (store.hub.pull).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return ModelSource(path)
    if path.exists():
        raise ValueError(f"model path {name_or_path!r} is a file: give the folder holding config.json")
    if name_or_path.count("/") != 1 or name_or_path.startswith((".", "/", "~")):
        raise ValueError(
            f"model {name_or_path!r} is neither a local folder nor a hub repo id like 'org/name'"
        )
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(name_or_path, allow_patterns=SMALL_PATTERNS))
        # pin the shards to the snapshot just fetched, even if the repo changes meanwhile
        revision = folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else None
        is_store = (folder / "offload.json").exists()  # a store repository (moe_runtime.store.hub)
        if not is_store and not (folder / INDEX_FILE).exists():
            folder = Path(snapshot_download(name_or_path, revision=revision, allow_patterns=WEIGHT_PATTERNS))
    except Exception as err:  # offline, unknown repo, gated repo, ...
        raise _hub_error(f"model {name_or_path!r}", err) from None
    if is_store:  # its store's files, not any original checkpoint's shards
        try:
            folder = pull_store(name_or_path, folder, revision)
        except ValueError:
            raise
        except Exception as err:
            raise _hub_error(f"the store of {name_or_path!r}", err) from None
    return ModelSource(folder, name_or_path, revision)


@dataclass
class WeightMap:
    """Which file holds each tensor, and what identifies the weights.

    With an index (`model.safetensors.index.json`) both come from the index alone, so they are
    known while no shard is on disk; the identity is then a digest of the index's weight map and
    metadata. Without one, the files are read for their keys and identified by their sizes.
    """

    folder: Path
    files: list[str]  # weight file names, in processing order
    key_to_file: dict[str, str]
    identity: dict
    indexed: bool

    def missing(self) -> list[str]:
        return [name for name in self.files if not (self.folder / name).exists()]

    def require_files(self) -> None:
        missing = self.missing()
        if missing:
            listed = f"listed in {INDEX_FILE} " if self.indexed else ""
            raise ValueError(f"{self.folder}: shards {listed}are missing: {', '.join(missing)}")


def read_weight_map(folder: Path) -> WeightMap:
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.exists():
        try:
            content = json.loads(index.read_text())
            weight_map = content["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map is not a mapping of tensor names to file names")
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index} is not a valid safetensors index: {err}") from None
        outside = sorted({name for name in weight_map.values() if not _inside(name)})
        if outside:
            raise ValueError(f"{index} names shard files outside its folder ({', '.join(map(repr, outside[:3]))}): "
                             "shard names must be plain file names in the model's folder")
        canonical = json.dumps({"metadata": content.get("metadata"), "weight_map": weight_map}, sort_keys=True)
        identity = {"index": hashlib.sha256(canonical.encode()).hexdigest()}
        return WeightMap(folder, sorted(set(weight_map.values())), dict(weight_map), identity, indexed=True)
    if (folder / SINGLE_FILE).exists():
        files = [SINGLE_FILE]
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise ValueError(
                f"{folder} holds only pickle checkpoints ({', '.join(pickled)}), which are refused "
                "because loading them can run arbitrary code. Convert them to safetensors first."
            )
        raise ValueError(f"{folder} has no *.safetensors weights")
    key_to_file = {}
    for name in files:
        key_to_file.update(dict.fromkeys(open_safetensors(folder / name).keys(), name))
    identity = {name: (folder / name).stat().st_size for name in files}
    return WeightMap(folder, files, key_to_file, identity, indexed=False)


def _inside(name: str) -> bool:
    """Whether a shard name from an index stays inside the model folder (no '..', no absolute path)."""
    path = PurePosixPath(name.replace("\\", "/"))
    return bool(name) and not path.is_absolute() and ".." not in path.parts and ":" not in name \
        and "\x00" not in name


def open_safetensors(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as err:
        raise ValueError(f"{file} is not a readable safetensors file (corrupt or truncated?): {err}") from None


class Checkpoint:
    """Lazy access to every tensor of a safetensors checkpoint, by key.

    safetensors memory-maps each shard, and the pages a read touches count as resident memory for
    as long as the shard stays mapped; at most `max_open` shards stay open, so streaming through a
    93 GB checkpoint keeps about one or two shards resident, not the whole model.

    Shards can arrive one by one (`add`) and leave again (`release`): a tensor still needed after
    its shard is gone is read into memory first and served from there until `forget`.
    """

    def __init__(self, weights: WeightMap, paths: dict[str, Path] | None = None, max_open: int = 2) -> None:
        self.weights, self.model_dir = weights, weights.folder
        self.key_to_file = dict(weights.key_to_file)
        self.paths: dict[str, Path] = dict(paths or {})
        self.max_open = max_open
        self._handles: OrderedDict[str, object] = OrderedDict()
        self._held: dict[str, torch.Tensor] = {}

    @classmethod
    def opened(cls, weights: WeightMap, paths: dict[str, Path], max_open: int = 2) -> Checkpoint:
        """Every shard at hand; each is opened once and its own header says which keys it holds."""
        checkpoint = cls(weights, paths, max_open)
        checkpoint.key_to_file = {}
        for name in weights.files:
            checkpoint.key_to_file.update(dict.fromkeys(checkpoint._open(name).keys(), name))
        return checkpoint

    def add(self, name: str, path: Path) -> None:
        self.paths[name] = Path(path)

    def release(self, name: str, keep: list[str]) -> None:
        """Stop using shard `name` (it is about to be deleted), reading the tensors `keep` first."""
        for key in keep:
            self._held[key] = self.get(key).clone()  # a copy: nothing may point into the deleted file
        self._handles.pop(name, None)
        self.paths.pop(name, None)

    def forget(self, key: str) -> None:
        self._held.pop(key, None)

    def _open(self, name: str):
        if name in self._handles:
            self._handles.move_to_end(name)
            return self._handles[name]
        path = self.paths.get(name)
        if path is None:
            raise RuntimeError(f"shard {name} of {self.model_dir} is not at hand")
        handle = open_safetensors(path)
        self._handles[name] = handle
        while len(self._handles) > self.max_open:
            self._handles.popitem(last=False)
        return handle

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def _file(self, key: str) -> str:
        name = self.key_to_file.get(key)
        if name is None:
            raise ValueError(f"checkpoint {self.model_dir} has no tensor {key!r}")
        return name

    def get(self, key: str) -> torch.Tensor:
        if key in self._held:
            return self._held[key]
        name = self._file(key)
        handle = self._open(name)
        try:
            return handle.get_tensor(key)
        except Exception as err:
            raise ValueError(f"cannot read {key!r} from {self.paths[name]} (corrupt or truncated?): {err}") from None

    def get_slice(self, key: str, index: int) -> torch.Tensor:
        """`tensor[index]` without reading the rest of the tensor (one expert of a fused tensor)."""
        if key in self._held:
            return self._held[key][index]
        name = self._file(key)
        handle = self._open(name)
        try:
            return handle.get_slice(key)[index]
        except Exception as err:
            raise ValueError(
                f"cannot read {key!r}[{index}] from {self.paths[name]} (corrupt or truncated?): {err}"
            ) from None
