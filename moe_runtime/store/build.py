"""A store build that survives interruption, and that two processes can run at once.

Resumable: the records file and the dense file are written under `.partial` names, and every
expert record and dense tensor, once written and synced, is appended as one JSON line to
`build.journal` with its checksum. A build that finds a journal of the same layout (the same
identity, codec and model shape) keeps the partial files, re-reads and re-checks every record and
dense tensor the journal names (what does not match is built again) and builds only what is
missing. A record being written when the build died has no journal line, so it is never used; a
torn last journal line is ignored. The journal goes once `store.json` is written.

Concurrent: a build holds `StoreLock` on the store folder (an `flock` on `.<folder>.lock` beside
it, released by the kernel if the process dies). A second process waits for it, with a message,
and then finds the store complete and reuses it. The records' and dense tensors' `.partial` names
are fixed on purpose (a resumed build must find them) and only the lock holder touches them; the
temporary store.json and offload.json carry the writer's process id, and a build removes those a
killed process left.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import xxhash

from ..quant import ExpertCodec
from . import DENSE_FILE, STORE_FILE, STORE_META, DenseWriter, StoreWriter, checksum, read_exactly

JOURNAL = "build.journal"


@dataclass
class BuildReport:
    """What one build did: the CLI's JSON line."""

    store: str
    experts_built: int
    experts_reused: int
    bytes: int
    seconds: float


def lock_path(folder: Path) -> Path:
    folder = Path(folder).resolve()
    return folder.parent / f".{folder.name}.lock"


class StoreLock:
    """An exclusive `flock` on a store folder; a second holder waits, saying so once on stderr."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.path, self.fd = Path(folder), lock_path(folder), None

    def __enter__(self) -> StoreLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"another process is building the expert store {self.folder}: waiting for it to finish",
                  file=sys.stderr, flush=True)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


class BuildJournal:
    """`build.journal`: a first line naming the layout, then one line per expert / dense tensor done."""

    def __init__(self, path: Path, layout: str) -> None:
        self.path = path
        self.experts: dict[tuple[int, int], str] = {}
        self.dense: list[dict] = []
        lines = path.read_bytes().split(b"\n") if path.exists() else []
        self.resumed = bool(lines) and _json(lines[0]) == {"layout": layout}
        if self.resumed:
            for line in lines[1:]:
                entry = _json(line)  # a torn last line (killed mid-append) is not JSON: ignored
                if isinstance(entry, dict) and "expert" in entry:
                    self.experts[tuple(entry["expert"])] = entry["sum"]
                elif isinstance(entry, dict) and "dense" in entry:
                    self.dense.append(entry)
        else:
            path.write_text(json.dumps({"layout": layout}) + "\n")
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND)

    def add(self, entry: dict) -> None:
        os.write(self.fd, (json.dumps(entry, separators=(",", ":")) + "\n").encode())

    def close(self, remove: bool = False) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if remove:
            self.path.unlink(missing_ok=True)


def _json(line: bytes):
    try:
        return json.loads(line)
    except ValueError:
        return None


class ResumableStoreWriter(StoreWriter):
    """`StoreWriter` that keeps what an interrupted build of the same layout left, checked.

    `todo` is then only what is missing; `dense.missing()` the dense tensors still to write. The
    records are encoded by `StoreWriter.put` (the codec), so the format stays the codec's.
    """

    def __init__(self, folder: Path, codec: ExpertCodec, num_layers: int, num_experts: int, identity: dict,
                 dense_names: list[str] | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        layout = hashlib.sha256(json.dumps(
            {"identity": identity, "nbytes": codec.nbytes, "layers": num_layers, "experts": num_experts,
             "dense": sorted(dense_names or [])}, sort_keys=True, default=str).encode()).hexdigest()
        self.journal = BuildJournal(folder / JOURNAL, layout)
        for stale in folder.glob(f"{STORE_META}.*.partial"):  # a killed build's; we hold the lock
            stale.unlink(missing_ok=True)
        if self.journal.resumed:  # killed between renaming the files and writing store.json: take them back
            for name in (STORE_FILE, DENSE_FILE):
                if (folder / name).exists() and not (folder / (name + ".partial")).exists():
                    os.replace(folder / name, folder / (name + ".partial"))
        else:
            for name in (STORE_FILE, DENSE_FILE):
                (folder / (name + ".partial")).unlink(missing_ok=True)
        super().__init__(folder, codec, num_layers, num_experts, identity, None, keep=self.journal.resumed)
        self.reused = self._keep_checked_records()
        self.dense = None if dense_names is None else ResumableDenseWriter(
            folder / (DENSE_FILE + ".partial"), dense_names, self.journal)

    def _keep_checked_records(self) -> int:
        kept = 0
        for (layer, expert), digest in self.journal.experts.items():
            if (layer, expert) not in self.todo:
                continue
            offset = self.start + (layer * self.num_experts + expert) * self.stride
            read_exactly(self.file.fileno(), self.record, offset, f"{self.tmp} at layer {layer} expert {expert}")
            if checksum(self.record) == digest:
                self.sums[layer][expert] = digest
                self.todo.discard((layer, expert))
                kept += 1
        return kept

    def put(self, layer: int, expert: int, *weights) -> None:
        super().put(layer, expert, *weights)
        os.fdatasync(self.file.fileno())  # on disk before the journal says so
        self.journal.add({"expert": [layer, expert], "sum": self.sums[layer][expert]})

    def finish(self) -> Path:
        folder = super().finish()
        self.journal.close(remove=True)
        return folder

    def abort(self, keep: bool = True) -> None:
        """Stop; with `keep` the partial files and the journal stay for the next build to resume."""
        self.journal.close(remove=not keep)
        if keep:
            self.file.close()
            if self.dense is not None:
                self.dense.file.close()
        else:
            super().abort()


class ResumableDenseWriter(DenseWriter):
    """`DenseWriter` that keeps the longest run of journalled tensors that still match their checksums."""

    def __init__(self, path: Path, names: list[str], journal: BuildJournal) -> None:
        super().__init__(path, names, keep=journal.resumed)
        self.journal = journal
        for entry in journal.dense:
            begin, end = entry["offsets"]
            if entry["dense"] not in self.names or begin != self.offset or not self._matches(begin, end, entry["sum"]):
                break
            self.entries[entry["dense"]] = {"dtype": entry["dtype"], "shape": entry["shape"], "data_offsets": [begin, end]}
            self.sums[entry["dense"]] = entry["sum"]
            self.offset = end
        self.file.truncate(self.data_start + self.offset)
        self.file.seek(self.data_start + self.offset)

    def _matches(self, begin: int, end: int, digest: str) -> bool:
        self.file.seek(self.data_start + begin)
        hasher, left = xxhash.xxh3_64(), end - begin
        while left > 0:
            chunk = self.file.read(min(left, 16 << 20))
            if not chunk:
                return False
            hasher.update(chunk)
            left -= len(chunk)
        return hasher.hexdigest() == digest

    def missing(self) -> set[str]:
        return self.names - set(self.entries)

    def add(self, name: str, tensor) -> None:
        super().add(name, tensor)
        self.file.flush()
        os.fdatasync(self.file.fileno())
        entry = self.entries[name]
        self.journal.add({"dense": name, "dtype": entry["dtype"], "shape": entry["shape"],
                          "offsets": entry["data_offsets"], "sum": self.sums[name]})


def store_bytes(folder: Path) -> int:
    """Bytes of the store's files (records, dense tensors, store.json)."""
    return sum((folder / name).stat().st_size for name in (STORE_FILE, DENSE_FILE, STORE_META)
               if (folder / name).exists())
