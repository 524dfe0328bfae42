"""What a store's weights are: its identity comes from content, not from the checkpoint's name.

- A hub repo: the commit id of the revision its files were fetched at (content-addressed by git).
- A local folder: a digest of every safetensors header (names, dtypes, shapes, offsets) and of a
  sample of every tensor's bytes (4 KiB from the middle of each), read at each load: cheap (one
  small read per tensor, ~4 MB for Mixtral's 995 tensors) and different for two fine-tunes of one
  base in same-named folders, since training changes every tensor of them. A change confined to
  bytes outside every sample is not seen: that is what "sampled" means.
- A hub repo without a commit id (an odd cache) keeps the older identity: its safetensors index.

`derived_from` says which; `store info` prints it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import xxhash

SAMPLE_BYTES = 4096


def source_identity(source, weights) -> dict:
    """The identity of a checkpoint's weights (`source`: checkpoint.ModelSource, `weights`: WeightMap)."""
    if source.is_hub and source.revision:
        return {"derived_from": "hub commit", "repo": source.repo_id, "revision": source.revision}
    if source.is_hub or weights.missing():
        return {"derived_from": "safetensors index" if weights.indexed else "file sizes", **weights.identity}
    headers, sample = hashlib.sha256(), xxhash.xxh3_128()
    for name in weights.files:
        header, start = _header(weights.folder / name)
        headers.update(name.encode() + b"\0" + json.dumps(header, sort_keys=True).encode())
        with open(weights.folder / name, "rb") as f:
            for key in sorted(k for k in header if k != "__metadata__"):
                begin, end = header[key]["data_offsets"]
                middle = begin + max(0, (end - begin) // 2 - SAMPLE_BYTES // 2)
                f.seek(start + middle)
                sample.update(f.read(min(SAMPLE_BYTES, end - begin)))
    return {"derived_from": "safetensors headers + sampled content", "headers": headers.hexdigest(),
            "content_sample": sample.hexdigest()}


def _header(file: Path) -> tuple[dict, int]:
    try:
        with open(file, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if 8 + length > file.stat().st_size:  # a corrupt length would otherwise allocate it
                raise ValueError(f"its header length {length} runs past the end of the file")
            return json.loads(f.read(length)), 8 + length
    except (OSError, ValueError) as err:
        raise ValueError(f"{file} is not a readable safetensors file (corrupt or truncated?): {err}") from None
