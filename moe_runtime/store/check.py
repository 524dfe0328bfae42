"""Re-check a whole store against the checksums written when it was built (`store verify`/`info`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import xxhash

from . import DENSE_FILE, STORE_FILE, _data_start, _valid_sums, checksum, read_exactly, read_meta


def damaged_parts(folder: Path) -> list[str]:
    """What does not match its checksum: "layer L, expert E", "dense tensor NAME" or a missing file.
    Empty for an intact store. Reads every byte once, a layer of records at a time."""
    folder = Path(folder)
    meta = read_meta(folder)
    if meta is None:
        return [f"{folder / 'store.json'} is missing or unreadable (an incomplete store)"]
    layers, experts, stride = meta.get("num_layers"), meta.get("num_experts"), meta.get("stride")
    sums = meta.get("record_checksums")
    if not (isinstance(layers, int) and isinstance(experts, int) and isinstance(stride, int)
            and _valid_sums(sums, layers, experts)):
        return [f"{folder / 'store.json'} does not describe a store of this version"]
    file = folder / STORE_FILE
    if not file.exists():
        return [f"{file} is missing"]
    damaged = []
    start = _data_start(file)
    buf = torch.empty((experts, stride), dtype=torch.uint8)
    with open(file, "rb", buffering=0) as f:
        for layer in range(layers):
            try:
                read_exactly(f.fileno(), buf, start + layer * experts * stride, f"{file} at layer {layer}")
            except OSError:
                damaged += [f"layer {layer}, expert {e} (file too short)" for e in range(experts)]
                continue
            damaged += [f"layer {layer}, expert {e}" for e in range(experts) if checksum(buf[e]) != sums[layer][e]]
    if meta.get("dense"):
        damaged += _damaged_dense(folder / DENSE_FILE, meta.get("dense_checksums") or {})
    return damaged


def _damaged_dense(file: Path, sums: dict) -> list[str]:
    try:
        with open(file, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if 8 + length > file.stat().st_size:  # a corrupt length would otherwise allocate it
                return [f"{file} cannot be read: its header length runs past the end of the file"]
            header = json.loads(f.read(length))
            header.pop("__metadata__", None)
            bad = [f"dense tensor {name} (not in the file)" for name in sorted(set(sums) - set(header))]
            bad += [f"dense tensor {name} (no checksum in store.json)" for name in sorted(set(header) - set(sums))]
            for name in sorted(set(header) & set(sums)):
                begin, end = header[name]["data_offsets"]
                f.seek(8 + length + begin)
                data = f.read(end - begin)
                if len(data) != end - begin or xxhash.xxh3_64_hexdigest(data) != sums[name]:
                    bad.append(f"dense tensor {name}")
            return bad
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{file} cannot be read: {err}"]
