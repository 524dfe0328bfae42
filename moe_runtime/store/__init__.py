"""The slow tier: every expert of every layer, each packed into one contiguous byte record.

A store is a folder, written once and reused (keyed by model and quant settings):
`experts.safetensors` with one uint8 tensor per expert (`layers.L.experts.E`), `dense.safetensors`
with the model's other tensors under transformers' parameter names, and `store.json` (written
last, after the records are fsynced: its presence marks a complete store). A complete store is all
a model needs besides config.json and the tokenizer. A store.json that cannot be read as what it
should be (null, a list, binary bytes, another layout) means "no store": it is rebuilt.

Integrity: store.json holds an xxh3-64 checksum of every record and of every dense tensor, taken
at build time. The dense tensors are checked when the store is opened (a mismatch: no store, so it
is rebuilt); a record is checked whenever it is read from disk (the whole file for the RAM tier,
each load for the disk tier). A record that does not match raises `StoreDamaged` naming the file,
layer and expert, and removes store.json, so the next load rebuilds the store; nothing computes
with it. Two tiers read the records:

- `RamTier` holds all records in host memory (pinned through the engine's `Device` when the experts
  compute on a GPU, one block of exactly E records per layer, so copies to the GPU are asynchronous DMA).
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
import shutil
import warnings
from pathlib import Path
from typing import ClassVar

import torch
import xxhash
from tqdm.auto import tqdm

from ..device import BufferPool, Device, device_guard
from ..quant import ExpertCodec

PAGE = 4096
STORE_VERSION = 3  # 2: checksums of records and dense tensors; 3: records in the target's form (codec.form_name)
CHECKSUM = "xxh3_64"
STORE_FILE = "experts.safetensors"
STORE_META = "store.json"
DENSE_FILE = "dense.safetensors"
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


class StoreDamaged(ValueError):
    """Bytes read from a store do not match the checksum written when it was built."""


def checksum(data: torch.Tensor) -> str:
    """xxh3-64 of a host tensor's bytes (16 hex digits)."""
    return xxhash.xxh3_64_hexdigest(memoryview(data.reshape(-1).view(torch.uint8).numpy()).cast("B"))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def invalidate(folder: Path) -> None:
    """Mark the store in `folder` incomplete, so the next load rebuilds it."""
    (folder / STORE_META).unlink(missing_ok=True)


def record_name(layer: int, expert: int) -> str:
    return f"layers.{layer}.experts.{expert}"


def _starts_with(file: Path, prefix: bytes) -> bool:
    try:
        with open(file, "rb") as f:
            return f.read(len(prefix)) == prefix
    except OSError:
        return False


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
    return Path(store_dir).expanduser() / f"{safe or 'model'}-{digest}"  # "~/x": the home folder's x


class StoreWriter:
    """Writes a store whose experts arrive in any order (shard by shard), and its dense tensors.

    The records file is laid out in full up front (header, then one page-aligned slot per expert)
    and each record is written at its place; the dense tensors go to `dense.safetensors` as they
    come. Both are written under temporary names and renamed, and `store.json` is written last, so
    an interrupted build is never mistaken for a store; `abort` removes the temporary files.
    """

    def __init__(self, folder: Path, codec: ExpertCodec, num_layers: int, num_experts: int, identity: dict,
                 dense_names: list[str] | None = None, keep: bool = False) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / STORE_META).unlink(missing_ok=True)  # a stale store is not complete while it is rebuilt
        self.folder, self.codec, self.identity = folder, codec, identity
        self.num_layers, self.num_experts = num_layers, num_experts
        self.stride = stride = round_up(codec.nbytes)
        header = {
            record_name(layer, expert): {
                "dtype": "U8", "shape": [stride],
                "data_offsets": [(layer * num_experts + expert) * stride,
                                 (layer * num_experts + expert + 1) * stride],
            }
            for layer in range(num_layers)
            for expert in range(num_experts)
        }
        header["__metadata__"] = {"format": "moe-expert-store", "version": str(STORE_VERSION),
                                  "form": codec.form_name}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (round_up(8 + len(text)) - 8 - len(text))  # records start page-aligned
        self.start = 8 + len(text)
        self.tmp = folder / (STORE_FILE + ".partial")
        header = len(text).to_bytes(8, "little") + text
        # keep=True (store.build's resumable writer, under its lock): a partial file of this very layout
        # is kept, records and all, so the experts already in it need not be built again
        kept = keep and _starts_with(self.tmp, header)
        self.file = open(self.tmp, "r+b" if kept else "wb+")
        self.file.write(header)
        self.file.truncate(self.start + num_layers * num_experts * stride)
        self.todo = {(layer, expert) for layer in range(num_layers) for expert in range(num_experts)}
        self.sums = [[""] * num_experts for _ in range(num_layers)]
        self.record = torch.zeros(stride, dtype=torch.uint8)
        self.dense = None if dense_names is None else DenseWriter(folder / (DENSE_FILE + ".partial"), dense_names)

    def put(self, layer: int, expert: int, *weights: torch.Tensor | None) -> None:
        """Write one expert: (gate, up, down[, biases]), e.g. an unpacked `ExpertWeights`."""
        self.codec.encode(*weights, out=self.record)
        self.put_record(layer, expert, self.record)

    def put_record(self, layer: int, expert: int, record: torch.Tensor) -> None:
        """Write one expert's record as it is (uint8 [stride], already in the codec's form)."""
        if record.dtype != torch.uint8 or record.numel() != self.stride:
            raise ValueError(f"a record of this store is uint8 [{self.stride}], not {record.dtype} [{record.numel()}]")
        offset = self.start + (layer * self.num_experts + expert) * self.stride
        view = memoryview(record.numpy()).cast("B")
        done = 0
        while done < self.stride:
            done += os.pwrite(self.file.fileno(), view[done:], offset + done)
        self.sums[layer][expert] = checksum(record)
        self.todo.discard((layer, expert))

    def put_dense(self, name: str, tensor: torch.Tensor) -> None:
        self.dense.add(name, tensor)

    def finish(self) -> Path:
        if self.todo:
            raise RuntimeError(f"expert store {self.folder}: {len(self.todo)} experts were never written")
        meta = {"version": STORE_VERSION, "form": self.codec.form_name, "stride": self.stride,
                "expert_nbytes": self.codec.nbytes,
                "num_layers": self.num_layers, "num_experts": self.num_experts, "data_start": self.start,
                "identity": self.identity, "checksum": CHECKSUM, "record_checksums": self.sums}
        if self.dense is not None:
            self.dense.finish()
            meta["dense"] = DENSE_FILE
            meta["dense_checksums"] = self.dense.sums
        os.fsync(self.file.fileno())  # the records are on disk before store.json says they are
        self.file.close()
        os.replace(self.tmp, self.folder / STORE_FILE)
        if self.dense is not None:
            os.replace(self.dense.path, self.folder / DENSE_FILE)
        _fsync_dir(self.folder)
        tmp_meta = self.folder / f"{STORE_META}.{os.getpid()}.partial"  # unique: store.build's lock aside
        with open(tmp_meta, "w") as f:
            f.write(json.dumps(meta, indent=1, default=str))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_meta, self.folder / STORE_META)
        _fsync_dir(self.folder)
        return self.folder

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)
        if self.dense is not None:
            self.dense.abort()


class DenseWriter:
    """A safetensors file written one tensor at a time, in each tensor's own dtype.

    The names are known up front (from the checkpoint's index), the shapes and dtypes only as the
    tensors arrive; so room for the header is reserved first (enough for any tensor of rank <= 8)
    and the header is written into it at the end, padded with spaces as the format allows.
    """

    def __init__(self, path: Path, names: list[str], keep: bool = False) -> None:
        self.path, self.names = path, set(names)
        room = sum(len(json.dumps(name)) + 300 for name in self.names) + 200
        self.data_start = round_up(8 + room)
        self.file = open(path, "r+b" if keep and path.exists() else "wb+")  # keep: store.build resumes it
        self.file.seek(self.data_start)
        self.entries: dict[str, dict] = {}
        self.sums: dict[str, str] = {}
        self.offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.names or name in self.entries:
            raise RuntimeError(f"dense tensor {name!r} is unexpected or written twice")
        if tensor.dim() > 8 or tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"dense tensor {name!r} ({tensor.dtype}, rank {tensor.dim()}) cannot be stored")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self.file.write(memoryview(data.numpy()).cast("B"))
        self.sums[name] = checksum(data)
        self.entries[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self.offset, self.offset + data.numel()]}
        self.offset += data.numel()

    def finish(self) -> None:
        missing = sorted(self.names - set(self.entries))
        if missing:
            raise RuntimeError(f"dense tensors never written: {', '.join(missing[:6])}")
        header = {**self.entries, "__metadata__": {"format": "pt"}}
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) > self.data_start - 8:  # cannot happen for rank <= 8 and 20-digit offsets
            raise RuntimeError(f"{self.path}: the header outgrew the room reserved for it")
        text += b" " * (self.data_start - 8 - len(text))
        self.file.seek(0)
        self.file.write(len(text).to_bytes(8, "little") + text)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def abort(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


def write_store(folder: Path, codec: ExpertCodec, num_layers: int, num_experts: int,
                expert_weights, identity: dict) -> Path:
    """Encode every expert (streamed: one expert in memory at a time) into `folder`.

    `expert_weights(layer, expert)` returns (gate, up, down). The file is written under a temporary
    name and renamed when complete, so an interrupted build is never mistaken for a store.
    """
    writer = StoreWriter(folder, codec, num_layers, num_experts, identity)
    try:
        with tqdm(total=num_layers * num_experts, desc="building expert store", unit="expert") as bar:
            for layer in range(num_layers):
                for expert in range(num_experts):
                    writer.put(layer, expert, *expert_weights(layer, expert))
                    bar.update()
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def read_meta(folder: Path) -> dict | None:
    """store.json as a dict, or None when it is absent or not a JSON object (null, a list, binary)."""
    try:
        meta = json.loads((folder / STORE_META).read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # ValueError: JSON and UnicodeDecodeError; nested too deep
        return None
    return meta if isinstance(meta, dict) else None


def open_store(folder: Path, num_layers: int, num_experts: int, codec: ExpertCodec,
               dense: bool = False) -> dict | None:
    """The store's metadata if a complete, matching, undamaged store is in `folder`; otherwise None.

    `dense=True` also asks for the model's dense tensors (`dense.safetensors`), which make the
    store all a model needs besides config.json and the tokenizer; they are checked against their
    checksums here (a damaged dense file warns and returns None, so the store is rebuilt).
    """
    meta = read_meta(folder)
    if meta is None:
        return None
    if meta.get("version") != STORE_VERSION or meta.get("form") != codec.form_name:
        warnings.warn(f"{folder}: {stale_reason(meta, codec)}; rebuilding it", stacklevel=2)
        return None
    expected = (num_layers, num_experts, codec.nbytes, round_up(codec.nbytes), CHECKSUM)
    found = (meta.get("num_layers"), meta.get("num_experts"),
             meta.get("expert_nbytes"), meta.get("stride"), meta.get("checksum"))
    file = folder / STORE_FILE
    if found != expected or not file.exists() or not _valid_sums(meta.get("record_checksums"), num_layers, num_experts):
        return None
    try:
        if _data_start(file) != meta.get("data_start"):  # a damaged header would misplace every record
            return None
        if file.stat().st_size < meta["data_start"] + num_layers * num_experts * meta["stride"]:
            return None
    except OSError:
        return None
    if dense and not (meta.get("dense") == DENSE_FILE and _complete_safetensors(folder / DENSE_FILE)
                      and _dense_intact(folder / DENSE_FILE, meta.get("dense_checksums"))):
        return None
    return meta


def stale_reason(meta: dict, codec: ExpertCodec) -> str:
    """Why a store's records cannot be read by this version with `codec`: another store version, or
    records in another form than the one this device computes from."""
    version, form = meta.get("version"), meta.get("form")
    if version != STORE_VERSION:
        return (f"it was built by an earlier version of moe-offload (store version {version}, one record "
                f"format converted at run time; this version: {STORE_VERSION}, records in the form "
                f"{codec.form_name!r} the device computes from)")
    return f"its records are in the form {form!r}, this device computes from {codec.form_name!r}"


def replace_legacy_store(legacy: Path, folder: Path) -> bool:
    """A store an earlier version built for the same model and settings, under the folder name it
    computed (`legacy`), cannot be read by this one: warn, naming it and its replacement `folder`, and
    remove it (the disk may not hold both). Returns whether there was one."""
    meta = read_meta(legacy)
    if legacy == folder or meta is None or meta.get("version") == STORE_VERSION:
        return False
    warnings.warn(f"the expert store {legacy} was built by an earlier version of moe-offload (store version "
                  f"{meta.get('version')}): this version stores records in the form the device computes from; "
                  f"removing it and building {folder}", stacklevel=3)
    shutil.rmtree(legacy, ignore_errors=True)
    return True


def _valid_sums(sums, num_layers: int, num_experts: int) -> bool:
    return (isinstance(sums, list) and len(sums) == num_layers
            and all(isinstance(row, list) and len(row) == num_experts and all(isinstance(h, str) for h in row)
                    for row in sums))


def _complete_safetensors(file: Path) -> bool:
    """Whether `file` has a readable header and all the bytes it announces (cheap: header only)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if 8 + length > size:
                return False
            header = json.loads(f.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return size == 8 + length + end
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return False


def _dense_intact(file: Path, sums) -> bool:
    """Whether every tensor of the dense file matches its build-time checksum (reads the file once)."""
    try:
        with open(file, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
            header.pop("__metadata__", None)
            if not isinstance(sums, dict) or set(sums) != set(header):
                warnings.warn(f"{file}: its tensors do not match the checksums of store.json; rebuilding the store",
                              stacklevel=3)
                return False
            for name, entry in header.items():
                begin, end = entry["data_offsets"]
                f.seek(8 + length + begin)
                digest = xxhash.xxh3_64()
                left = end - begin
                while left > 0:
                    chunk = f.read(min(left, 16 << 20))
                    if not chunk:
                        break
                    digest.update(chunk)
                    left -= len(chunk)
                if digest.hexdigest() != sums[name]:
                    warnings.warn(f"{file}: tensor {name} does not match its checksum (damaged); rebuilding the store",
                                  stacklevel=3)
                    return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return True


def read_exactly(fd: int, dst: torch.Tensor, offset: int, what: str) -> None:
    """Fill the host buffer `dst` from `offset`. One read() returns at most ~2 GiB on Linux (a
    layer of 16-bit Mixtral experts is 2.8 GB), so this loops until the buffer is full."""
    view = memoryview(dst.numpy()).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"short read from {what}")
        done += n


def _record_sums(folder: Path) -> list[list[str]]:
    meta = read_meta(folder)
    sums = None if meta is None else meta.get("record_checksums")
    if not isinstance(sums, list):
        raise StoreDamaged(f"{folder / STORE_META} is missing or has no record checksums: the store is incomplete")
    return sums


def _verify(folder: Path, sums: list[list[str]], layer: int, expert: int, record: torch.Tensor) -> None:
    if checksum(record) != sums[layer][expert]:
        invalidate(folder)
        raise StoreDamaged(f"{folder / STORE_FILE}: the record of layer {layer}, expert {expert} does not match "
                           "its checksum (the file is damaged); the store will be rebuilt on the next load")


def _data_start(file: Path) -> int:
    with open(file, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


class SlowTier:
    """Where expert records come from when they are not in a device slot (the base of every tier).

    `copy_to(layer, expert, dst)` fills `dst` (uint8 [nbytes] or larger, on the compute device or the
    host) with the record of one expert; it may be called from the demand path and the prefetch worker
    at once. `nbytes` is one record's size as moved; `close()` lets go of files and buffers.
    `level_of(layer, expert)` names where the record is now ("ram", "disk", "host"), for the app's
    timeline and cache map.

    Capabilities, declared per class (False by default) and checked where the plan needs them
    (`require`), never discovered:
    - `exchanges`: `exchange(layer, expert, evicted, dst)` takes the device slot's evicted record back
      (exclusive levels, CUDA) with the load that overwrites it;
    - `shares_memory`: the device computes from the tier's own memory (CPU): `attach(layer, expert)`
      pins the record where it lies and returns a view of it (read from disk into RAM first if needed),
      `detach(layer, expert)` lets it go; no device slot holds a second copy.
    `direct_io`: whether disk reads bypass the page cache (None: this tier reads no disk).
    """

    nbytes: int
    exchanges: ClassVar[bool] = False
    shares_memory: ClassVar[bool] = False
    direct_io: bool | None = None

    def copy_to(self, layer: int, expert: int, dst: torch.Tensor) -> None:
        raise NotImplementedError

    def level_of(self, layer: int, expert: int) -> str:
        return "slow tier"

    def exchange(self, layer: int, expert: int, evicted: int, dst: torch.Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not take evicted experts back")

    def attach(self, layer: int, expert: int) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not share its memory with the device")

    def detach(self, layer: int, expert: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not share its memory with the device")

    def close(self) -> None:
        pass

    def require(self, capability: str, why: str) -> None:
        """Refuse a plan that needs `capability` ("exchanges", "shares_memory") of a tier without it."""
        if not getattr(self, capability):
            raise ValueError(f"{why} needs a slow tier that {capability.replace('_', ' ')}; "
                             f"{type(self).__name__} does not")


class RamTier(SlowTier):
    """All expert records in host memory: `copy_to` is a copy (non-blocking, on the device's current
    stream, where there is a `dev`); on a CPU device the experts compute where they lie (`attach`
    returns the record itself).

    `dev`: the Device the records are pinned by (`dev.pin`, exactly E * stride bytes per layer) and
    copied with; None on a CPU (pageable records, plain copies)."""

    def __init__(self, records: list[torch.Tensor], nbytes: int, shares_memory: bool = False,
                 dev: Device | None = None) -> None:
        self.records = records  # per layer: uint8 [E, stride]
        self.nbytes = nbytes
        self.shares_memory = shares_memory  # the device is the CPU: experts compute from these records
        self.dev = dev

    @staticmethod
    def _layer_block(num_experts: int, stride: int, dev: Device | None) -> torch.Tensor:
        """uint8 [E, stride] for one layer's records: pinned by `dev` (no rounding beyond the page), or pageable."""
        if dev is None:
            return torch.empty((num_experts, stride), dtype=torch.uint8)
        with device_guard(dev):
            return dev.pin(num_experts * stride).view(num_experts, stride)

    @classmethod
    def from_file(cls, folder: Path, num_layers: int, num_experts: int, stride: int, nbytes: int,
                  dev: Device | None = None) -> RamTier:
        """Every record of the store in `folder`, each checked against its checksum (`StoreDamaged`
        names the first that does not match, and the store is marked for a rebuild)."""
        file = folder / STORE_FILE
        sums = _record_sums(folder)
        start = _data_start(file)
        records = []
        with open(file, "rb", buffering=0) as f:
            for layer in tqdm(range(num_layers), desc="loading experts to RAM", unit="layer"):
                buf = cls._layer_block(num_experts, stride, dev)
                records.append(buf)  # released by close() (or below) even when a check fails
                try:
                    read_exactly(f.fileno(), buf, start + layer * num_experts * stride, f"{file} at layer {layer}")
                    for expert in range(num_experts):
                        _verify(folder, sums, layer, expert, buf[expert])
                except BaseException:
                    cls(records, nbytes, dev=dev).close()  # what was pinned is released
                    raise
        return cls(records, nbytes, shares_memory=dev is None, dev=dev)

    @classmethod
    def from_encoder(cls, codec: ExpertCodec, num_layers: int, num_experts: int, expert_weights,
                     dev: Device | None = None) -> RamTier:
        stride = round_up(codec.nbytes)
        records = []
        try:
            with tqdm(total=num_layers * num_experts, desc="packing experts", unit="expert") as bar:
                for layer in range(num_layers):
                    buf = cls._layer_block(num_experts, stride, dev).zero_()
                    records.append(buf)
                    for expert in range(num_experts):
                        codec.encode(*expert_weights(layer, expert), out=buf[expert])
                        bar.update()
        except BaseException:
            cls(records, codec.nbytes, dev=dev).close()
            raise
        return cls(records, codec.nbytes, shares_memory=dev is None, dev=dev)

    def copy_to(self, layer: int, expert: int, dst: torch.Tensor) -> None:
        src = self.records[layer][expert, : dst.numel()]
        if self.dev is None:
            dst.copy_(src)
        else:
            self.dev.copy(dst, src, non_blocking=True)

    def attach(self, layer: int, expert: int) -> torch.Tensor:
        return self.records[layer][expert]

    def detach(self, layer: int, expert: int) -> None:
        pass

    def level_of(self, layer: int, expert: int) -> str:
        return "ram"

    def close(self) -> None:
        records, self.records = self.records, []
        if self.dev is not None:
            for block in records:  # unpin waits for the copies queued from it
                self.dev.unpin(block.view(-1))


STAGING_BUFFERS = 2  # the disk tier's pinned staging buffers: one per thread that loads (demand, prefetch worker)


class DiskTier(SlowTier):
    """Expert records read from the store file on every load (O_DIRECT where allowed).

    `dev`: the Device a record read for a device slot is copied with, from one of `STAGING_BUFFERS`
    page-aligned staging buffers pinned by `dev` (exactly `stride` bytes each, pinned here, as the plan
    counts them, released on `close`); None on a CPU (pageable staging made on first need, plain copies)."""

    def __init__(self, folder: Path, num_experts: int, stride: int, nbytes: int, dev: Device | None = None) -> None:
        self.folder, self.file = folder, folder / STORE_FILE
        self.sums = _record_sums(folder)
        self.start = _data_start(self.file)
        self.num_experts, self.stride, self.nbytes = num_experts, stride, nbytes
        self.dev = dev
        self.fd, self.direct_io = self._open()
        if dev is None:
            self.staging = BufferPool(lambda: aligned_empty(stride, torch.device("cpu")), None, STAGING_BUFFERS)
        else:
            self.staging = BufferPool(lambda: dev.pin(stride), dev.unpin, STAGING_BUFFERS)
            with device_guard(dev):
                self.staging.fill()

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

    def read(self, layer: int, expert: int, dst: torch.Tensor) -> None:
        """Read one whole record into `dst` (host, page-aligned, `stride` bytes) and check it."""
        offset = self.start + (layer * self.num_experts + expert) * self.stride
        read_exactly(self.fd, dst, offset, f"{self.file} at layer {layer} expert {expert}")
        if not self.direct_io:
            os.posix_fadvise(self.fd, offset, self.stride, os.POSIX_FADV_DONTNEED)
        _verify(self.folder, self.sums, layer, expert, dst)

    def copy_to(self, layer: int, expert: int, dst: torch.Tensor) -> None:
        # straight into host memory (the arena); never into device memory, which a CPU tensor can be under
        # an emulated device: the read would overtake copies queued on the slot
        host = dst.device.type == "cpu" and (self.dev is None or self.dev.is_pinned(dst))
        if host and dst.numel() == self.stride and dst.data_ptr() % PAGE == 0:
            self.read(layer, expert, dst)
            return
        staging, _ = self.staging.take()  # copies out of it are blocking: it is free when given back
        try:
            self.read(layer, expert, staging)
            if self.dev is None:
                dst.copy_(staging[: dst.numel()])
            else:
                self.dev.copy(dst, staging[: dst.numel()], non_blocking=False)
        finally:
            self.staging.give(staging)

    def level_of(self, layer: int, expert: int) -> str:
        return "disk"

    def close(self) -> None:
        self.staging.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
