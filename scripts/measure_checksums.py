"""What the store's checksums cost: xxh3-64 of one expert record vs reading that record from disk.

    python -m scripts.measure_checksums [--records 6] [--dir .]

Records are Mixtral-8x7B-shaped (2-bit HQQ, group 16: 66.7 MB; 16-bit: 352 MB); their content does
not change the cost, so they are random bytes. Reads are O_DIRECT where the filesystem allows it, as
the disk tier's, so they really hit the disk. Loading a store checks every record once (RAM tier)
or each record at every load (disk tier), and the dense file once: cost = bytes / hash speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from moe_runtime.quant import ExpertCodec
from moe_runtime.store import PAGE, aligned_empty, checksum, read_exactly, round_up


def measure(nbytes: int, records: int, folder: str) -> dict:
    stride = round_up(nbytes)
    buf = aligned_empty(stride, torch.device("cpu"))
    buf.random_(0, 256)
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".records") as f:
        for _ in range(records):
            f.write(memoryview(buf.numpy()).cast("B"))
        f.flush()
        os.fsync(f.fileno())
        try:
            fd, direct = os.open(f.name, os.O_RDONLY | os.O_DIRECT), True
        except OSError:
            fd, direct = os.open(f.name, os.O_RDONLY), False
        reads, sums = [], []
        try:
            for i in range(records):
                if not direct:
                    os.posix_fadvise(fd, i * stride, stride, os.POSIX_FADV_DONTNEED)
                start = time.perf_counter()
                read_exactly(fd, buf, i * stride, f.name)
                reads.append(time.perf_counter() - start)
                start = time.perf_counter()
                checksum(buf)
                sums.append(time.perf_counter() - start)
        finally:
            os.close(fd)
    read, digest = statistics.median(reads), statistics.median(sums)
    return {"record_mb": stride / 1e6, "direct_io": direct, "read_ms": read * 1e3, "checksum_ms": digest * 1e3,
            "checksum_gb_s": stride / digest / 1e9, "overhead_pct": 100 * digest / read}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=6)
    parser.add_argument("--dir", default=".")
    args = parser.parse_args()
    torch.set_num_threads(1)
    assert PAGE == 4096
    print("| record | O_DIRECT | read (median) | xxh3-64 (median) | hash speed | cost per disk-tier load |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, bits, group in (("2-bit Mixtral expert", 2, 16), ("16-bit Mixtral expert", None, None)):
        nbytes = ExpertCodec(4096, 14336, bits, group, True, torch.float16).nbytes
        r = measure(nbytes, args.records, args.dir)
        print(f"| {name} ({r['record_mb']:.1f} MB) | {r['direct_io']} | {r['read_ms']:.1f} ms | "
              f"{r['checksum_ms']:.2f} ms | {r['checksum_gb_s']:.1f} GB/s | +{r['overhead_pct']:.1f}% |")


if __name__ == "__main__":
    main()
