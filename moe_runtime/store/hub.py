"""Sharing a store through the Hugging Face Hub: push a store folder, pull a store repository.

A store repository is recognized by its `offload.json` (fetched with the small files, like any
config): `load("USER/NAME")` then downloads the store's two files (not any original checkpoint)
and checks every record and dense tensor against store.json's checksums once, right after the
download. The upload is huggingface_hub's `upload_large_folder` (resumable, in parallel).
"""

from __future__ import annotations

from pathlib import Path

from . import DENSE_FILE, STORE_FILE
from .build import JOURNAL
from .check import damaged_parts
from .model import CARD, is_store_model

STORE_PATTERNS = [STORE_FILE, DENSE_FILE, CARD]
NEVER_UPLOADED = ["*.partial", JOURNAL, ".*"]


def push(folder: Path, repo: str, private: bool = False) -> str:
    """Upload the store folder to the model repository `repo` (created if needed); its URL."""
    folder = Path(folder)
    if not is_store_model(folder):
        raise ValueError(f"{folder} is not a store folder (no offload.json, store.json or config.json): "
                         "build one with `python -m moe_runtime.store build MODEL --out DIR`")
    damaged = damaged_parts(folder)
    if damaged:
        raise ValueError(f"{folder} is damaged ({'; '.join(damaged[:4])}): not uploading it")
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
    api.upload_large_folder(repo_id=repo, folder_path=str(folder), repo_type="model", ignore_patterns=NEVER_UPLOADED)
    return f"https://huggingface.co/{repo}"


def pull(repo: str, small_files: Path, revision: str | None) -> Path:
    """The local folder of store repository `repo` with its store files downloaded and checked."""
    from huggingface_hub import snapshot_download

    fresh = not (Path(small_files) / STORE_FILE).exists()
    folder = Path(snapshot_download(repo, revision=revision, allow_patterns=STORE_PATTERNS))
    if fresh:
        damaged = damaged_parts(folder)
        if damaged:
            for name in (STORE_FILE, DENSE_FILE):  # so the next try downloads them again
                (folder / name).unlink(missing_ok=True)
            raise ValueError(f"store repository {repo!r}: the download does not match its checksums "
                             f"({'; '.join(damaged[:4])}); it was removed, try again")
    return folder
