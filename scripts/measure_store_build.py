"""What building a store costs, phase by phase, on a Mixtral-8x7B-shaped checkpoint of a few layers.

    python -m scripts.measure_store_build [--layers 2] [--dir /tmp] [--optimized-experts 1]

The checkpoint has Mixtral-8x7B's real shapes (hidden 4096, intermediate 14336, 8 experts, 32000
tokens), random bf16 weights and shards of Mixtral's size (<= 4.9 GB), only fewer layers. Per expert:
read (its three bf16 matrices from a shard evicted from the page cache), quantize to 2-bit group 32
on the CPU (round-to-nearest, and HQQ's optimizer on `--optimized-experts` of them), write (pwrite +
fdatasync), checksum (xxh3-64 of the record). Then the end-to-end `build_store` (CPU, round-to-nearest)
the read of every record back from the store (cold, checksummed), and `load(STORE_DIR)` from the
store folder alone with a first forward pass. One JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import MixtralConfig, PreTrainedTokenizerFast

from moe_runtime import OffloadConfig
from moe_runtime.checkpoint import open_safetensors
from moe_runtime.loading import build_store
from moe_runtime.quant import ExpertCodec
from moe_runtime.store import aligned_empty, checksum, read_exactly, round_up

HIDDEN, INTER, EXPERTS, VOCAB, HEADS, KV_HEADS = 4096, 14336, 8, 32000, 32, 8
SHARD_BYTES = int(4.9e9)


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_checkpoint(folder: Path, layers: int) -> list[Path]:
    """Mixtral's key names and shapes, `layers` layers, bf16 random weights, shards of <= 4.9 GB."""
    folder.mkdir(parents=True, exist_ok=True)
    MixtralConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers, num_local_experts=EXPERTS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=VOCAB).save_pretrained(folder)
    head = HIDDEN // HEADS
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
                       p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                       p + "self_attn.k_proj.weight": (KV_HEADS * head, HIDDEN),
                       p + "self_attn.v_proj.weight": (KV_HEADS * head, HIDDEN),
                       p + "block_sparse_moe.gate.weight": (EXPERTS, HIDDEN)})
        for e in range(EXPERTS):
            q = f"{p}block_sparse_moe.experts.{e}."
            shapes.update({q + "w1.weight": (INTER, HIDDEN), q + "w3.weight": (INTER, HIDDEN),
                           q + "w2.weight": (HIDDEN, INTER)})
    vocab = {f"t{i}": i for i in range(VOCAB)}  # a word-level tokenizer: load() needs one, its words do not matter
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0").save_pretrained(folder)
    shards, current, size = [], {}, 0
    for key, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[key] = shape
        size += nbytes
    shards.append(current)
    weight_map, files = {}, []
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: (torch.randn(s, dtype=torch.bfloat16) * 0.02) for k, s in shard.items()}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys(shard, name))
        files.append(folder / name)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


def per_expert(folder: Path, files: list[Path], layers: int, optimized: int) -> dict:
    rtn = ExpertCodec(HIDDEN, INTER, 2, 32, True, torch.float16, optimize=False)
    opt = ExpertCodec(HIDDEN, INTER, 2, 32, True, torch.float16, optimize=True)
    stride = round_up(rtn.nbytes)
    record = aligned_empty(stride, torch.device("cpu"))
    handles = {f.name: open_safetensors(f) for f in files}
    where = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    for f in files:
        evict(f)
    phases = {"read_s": [], "quantize_rtn_s": [], "quantize_hqq_optimizer_s": [], "write_s": [], "checksum_s": []}
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".records") as out:
        for i, (layer, expert) in enumerate((lay, e) for lay in range(layers) for e in range(EXPERTS)):
            keys = [f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight" for w in ("w1", "w3", "w2")]
            t = time.perf_counter()
            weights = [handles[where[k]].get_tensor(k).clone() for k in keys]
            phases["read_s"].append(time.perf_counter() - t)
            t = time.perf_counter()
            rtn.encode(*weights, out=record)
            phases["quantize_rtn_s"].append(time.perf_counter() - t)
            if i < optimized:
                t = time.perf_counter()
                opt.encode(*weights, out=record)
                phases["quantize_hqq_optimizer_s"].append(time.perf_counter() - t)
            t = time.perf_counter()
            view = memoryview(record.numpy()).cast("B")
            os.pwrite(out.fileno(), view, i * stride)
            os.fdatasync(out.fileno())
            phases["write_s"].append(time.perf_counter() - t)
            t = time.perf_counter()
            checksum(record)
            phases["checksum_s"].append(time.perf_counter() - t)
    return {name: round(statistics.median(v), 3) for name, v in phases.items() if v} | {
        "record_bytes": rtn.nbytes, "expert_bf16_bytes": 3 * 2 * HIDDEN * INTER}


def read_back(store: Path, layers: int) -> float:
    """Seconds per expert to read a record from the store (evicted from the page cache first) and check it."""
    meta = json.loads((store / "store.json").read_text())
    file = store / "experts.safetensors"
    evict(file)
    buf = aligned_empty(meta["stride"], torch.device("cpu"))
    t = time.perf_counter()
    with open(file, "rb", buffering=0) as f:
        for i in range(layers * EXPERTS):
            read_exactly(f.fileno(), buf, meta["data_start"] + i * meta["stride"], str(file))
            assert checksum(buf) == meta["record_checksums"][i // EXPERTS][i % EXPERTS]
    return (time.perf_counter() - t) / (layers * EXPERTS)


def load_and_first_token(store: Path) -> dict:
    """`load(STORE_DIR)` from the store folder alone (page cache evicted), then one token's forward pass."""
    from moe_runtime import load

    for name in ("experts.safetensors", "dense.safetensors"):
        evict(store / name)
    t = time.perf_counter()
    engine = load(store, OffloadConfig(device="cpu", offload="disk", host_cache_gb=0, cache_size=2, prefetch=0))
    loaded = time.perf_counter() - t
    try:
        t = time.perf_counter()
        with torch.no_grad():
            engine.model(torch.tensor([[1, 2, 3, 4]]))
        first = time.perf_counter() - t
    finally:
        engine.close()
    return {"load_from_store_s": round(loaded, 2), "first_forward_4_tokens_s": round(first, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--optimized-experts", type=int, default=1)
    ap.add_argument("--no-phases", dest="phases", action="store_false", help="skip the per-expert phases")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp) / "mixtral-shaped"
        t = time.perf_counter()
        files = write_checkpoint(folder, args.layers)
        written = time.perf_counter() - t
        result = {"layers": args.layers, "shards": [round(f.stat().st_size / 1e9, 2) for f in files],
                  "checkpoint_write_s": round(written, 1), "torch_threads": torch.get_num_threads()}
        if args.phases:
            result |= per_expert(folder, files, args.layers, args.optimized_experts)
        for f in files:
            evict(f)
        config = OffloadConfig(device="cpu", expert_bits=2, hqq_optimize=False, dtype="float16")
        report = build_store(folder, config, Path(tmp) / "store")
        result |= {"build_store_s": report.seconds, "build_store_experts": report.experts_built,
                   "store_bytes": report.bytes, "read_back_per_expert_s": round(read_back(Path(tmp) / "store",
                                                                                         args.layers), 3)}
        result |= load_and_first_token(Path(tmp) / "store")
    result["loadavg"] = open("/proc/loadavg").read().split()[:3]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
