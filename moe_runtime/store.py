"""The slow tier: every expert of every layer, each packed into one contiguous byte record.

Two tiers share one on-disk format, a safetensors file with one uint8 tensor per expert
(`layers.L.experts.E`), written once and reused (keyed by model and quant settings):

- `RamTier` holds all records in host memory (pinned when the compute device is CUDA, so copies
  to the GPU are asynchronous DMA).
- `DiskTier` reads a record from the file each time it is needed. Records start on 4 KiB
  boundaries and are padded to a multiple of 4 KiB, so they can be read with O_DIRECT, which
  bypasses the OS page cache: a disk-tier load really costs a disk read, and the store never
  crowds the page cache. Where O_DIRECT is refused (tmpfs, some overlay filesystems), reads are
  plain `pread`s followed by `posix_fadvise(DONTNEED)` on the record, which drops it from the page
  cache so the next load of that expert is again a real read. `DiskTier.direct_io` tells which.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .quant import ExpertCodec

PAGE = 4096
STORE_VERSION = 1
STORE_FILE = "experts.safetensors"
STORE_META = "store.json"


def record_name(layer: int, expert: int) -> str:
    return f"layers.{layer}.experts.{expert}"


def round_up(n: int, multiple: int = PAGE) -> int:
    return -(-n // multiple) * multiple


def aligned_empty(nbytes: int, device: torch.device, pin: bool = False) -> torch.Tensor:
    """A uint8 buffer whose first byte sits on a page boundary (O_DIRECT needs aligned memory)."""
    if device.type == "cuda":
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    raw = torch.empty(nbytes + PAGE, dtype=torch.uint8, pin_memory=pin)
    start = (-raw.data_ptr()) % PAGE
    return raw[start : start + nbytes]


def store_folder(store_dir: str | Path, model_name: str, identity: dict) -> Path:
    """The store of one model + quant settings: `store_dir/<model>-<hash of identity>`."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in model_name.strip("/").split("/")[-1])
    return Path(store_dir) / f"{safe or 'model'}-{digest}"


def write_store(folder: Path, codec: ExpertCodec, num_layers: int, num_experts: int,
                expert_weights, identity: dict) -> Path:
    """Encode every expert (streamed: one expert in memory at a time) into `folder`.

    `expert_weights(layer, expert)` returns (gate, up, down). The file is written under a temporary
    name and renamed when complete, so an interrupted build is never mistaken for a store.
    """
    folder.mkdir(parents=True, exist_ok=True)
    stride = round_up(codec.nbytes)
    header = {
        record_name(layer, expert): {
            "dtype": "U8", "shape": [stride],
            "data_offsets": [(layer * num_experts + expert) * stride, (layer * num_experts + expert + 1) * stride],
        }
        for layer in range(num_layers)
        for expert in range(num_experts)
    }
    header["__metadata__"] = {"format": "moe-expert-store", "version": str(STORE_VERSION)}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (round_up(8 + len(text)) - 8 - len(text))  # records start page-aligned
    tmp = folder / (STORE_FILE + ".partial")
    with open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        record = torch.zeros(stride, dtype=torch.uint8)
        total = num_layers * num_experts
        with tqdm(total=total, desc="building expert store", unit="expert") as bar:
            for layer in range(num_layers):
                for expert in range(num_experts):
                    record[: codec.nbytes] = codec.encode(*expert_weights(layer, expert))
                    f.write(record.numpy().tobytes())
                    bar.update()
    os.replace(tmp, folder / STORE_FILE)
    meta = {"version": STORE_VERSION, "stride": stride, "expert_nbytes": codec.nbytes,
            "num_layers": num_layers, "num_experts": num_experts, "identity": identity}
    (folder / STORE_META).write_text(json.dumps(meta, indent=1, default=str))
    return folder


def open_store(folder: Path, num_layers: int, num_experts: int, codec: ExpertCodec) -> dict | None:
    """The store's metadata if a complete, matching store is in `folder`; otherwise None."""
    try:
        meta = json.loads((folder / STORE_META).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    expected = (STORE_VERSION, num_layers, num_experts, codec.nbytes, round_up(codec.nbytes))
    found = (meta.get("version"), meta.get("num_layers"), meta.get("num_experts"),
             meta.get("expert_nbytes"), meta.get("stride"))
    file = folder / STORE_FILE
    if found != expected or not file.exists():
        return None
    if file.stat().st_size < _data_start(file) + num_layers * num_experts * meta["stride"]:
        return None
    return meta


def _data_start(file: Path) -> int:
    with open(file, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


class RamTier:
    """All expert records in host memory; `copy_to` is a (non-blocking on CUDA) copy."""

    kind = "ram"

    def __init__(self, records: list[torch.Tensor], nbytes: int) -> None:
        self.records = records  # per layer: uint8 [E, stride]
        self.nbytes = nbytes

    @classmethod
    def from_file(cls, folder: Path, num_layers: int, num_experts: int, stride: int, nbytes: int,
                  pin: bool) -> RamTier:
        file = folder / STORE_FILE
        start = _data_start(file)
        records = []
        with open(file, "rb", buffering=0) as f:
            for layer in tqdm(range(num_layers), desc="loading experts to RAM", unit="layer"):
                buf = torch.empty((num_experts, stride), dtype=torch.uint8, pin_memory=pin)
                f.seek(start + layer * num_experts * stride)
                f.readinto(memoryview(buf.numpy()).cast("B"))
                records.append(buf)
        return cls(records, nbytes)

    @classmethod
    def from_encoder(cls, codec: ExpertCodec, num_layers: int, num_experts: int, expert_weights,
                     pin: bool) -> RamTier:
        stride = round_up(codec.nbytes)
        records = []
        with tqdm(total=num_layers * num_experts, desc="packing experts", unit="expert") as bar:
            for layer in range(num_layers):
                buf = torch.zeros((num_experts, stride), dtype=torch.uint8, pin_memory=pin)
                for expert in range(num_experts):
                    buf[expert, : codec.nbytes] = codec.encode(*expert_weights(layer, expert))
                    bar.update()
                records.append(buf)
        return cls(records, codec.nbytes)

    def copy_to(self, layer: int, expert: int, dst: torch.Tensor) -> None:
        dst.copy_(self.records[layer][expert, : dst.numel()], non_blocking=True)

    def record(self, layer: int, expert: int) -> torch.Tensor:
        return self.records[layer][expert]


class DiskTier:
    """Expert records read from the store file on every load (O_DIRECT where allowed)."""

    kind = "disk"

    def __init__(self, folder: Path, num_experts: int, stride: int, nbytes: int, device: torch.device) -> None:
        self.file = folder / STORE_FILE
        self.start = _data_start(self.file)
        self.num_experts, self.stride, self.nbytes = num_experts, stride, nbytes
        self.device = device
        self.fd, self.direct_io = self._open()
        self._local = threading.local()

    def _open(self) -> tuple[int, bool]:
        direct = getattr(os, "O_DIRECT", 0)
        if direct:
            try:
                fd = os.open(self.file, os.O_RDONLY | direct)
                probe = aligned_empty(PAGE, torch.device("cpu"))
                os.preadv(fd, [memoryview(probe.numpy()).cast("B")], self.start)
                return fd, True
            except OSError:
                try:
                    os.close(fd)
                except (OSError, UnboundLocalError):
                    pass
        return os.open(self.file, os.O_RDONLY), False

    def _staging(self) -> torch.Tensor:
        """One aligned host buffer per thread (demand loads and the prefetch worker)."""
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = aligned_empty(self.stride, torch.device("cpu"), pin=self.device.type == "cuda")
            self._local.buf = buf
        return buf

    def read(self, layer: int, expert: int, dst: torch.Tensor) -> None:
        """Read one whole record into `dst` (host, page-aligned, `stride` bytes)."""
        offset = self.start + (layer * self.num_experts + expert) * self.stride
        view = memoryview(dst.numpy()).cast("B")
        done = 0
        while done < self.stride:
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(f"short read from {self.file} at layer {layer} expert {expert}")
            done += n
        if not self.direct_io:
            os.posix_fadvise(self.fd, offset, self.stride, os.POSIX_FADV_DONTNEED)

    def copy_to(self, layer: int, expert: int, dst: torch.Tensor) -> None:
        aligned_cpu = dst.device.type == "cpu" and dst.numel() == self.stride and dst.data_ptr() % PAGE == 0
        if aligned_cpu:
            self.read(layer, expert, dst)
            return
        staging = self._staging()
        self.read(layer, expert, staging)
        dst.copy_(staging[: dst.numel()], non_blocking=False)

    def record(self, layer: int, expert: int) -> torch.Tensor:
        buf = aligned_empty(self.stride, torch.device("cpu"))
        self.read(layer, expert, buf)
        return buf

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
