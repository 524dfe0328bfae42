"""`python -m moe_runtime.store build|info|verify|push`: the expert store as a thing of its own.

  build MODEL [FLAGS] --out DIR   build (or resume, or reuse) a store without making a model to
                                  generate with; FLAGS are app.py's quantization flags. Ends with
                                  one JSON line: store, experts_built, experts_reused, bytes, seconds.
  info DIR                        what the store is: source, identity, settings, checksum status.
  verify DIR                      re-check every checksum; exit status 1 naming what is damaged.
  push DIR --repo USER/NAME       upload it to the Hugging Face Hub (resumable large-folder upload);
                                  `load("USER/NAME")` then downloads and uses it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from ..config import DTYPES, OffloadConfig

BITS = {"none": None, "2": 2, "3": 3, "4": 4, "8": 8}


def _bits(text: str) -> int | None:
    if text.lower() not in BITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: use one of {', '.join(BITS)}")
    return BITS[text.lower()]


def parser() -> argparse.ArgumentParser:
    doc = OffloadConfig.field_docs()
    d = OffloadConfig()
    p = argparse.ArgumentParser(prog="python -m moe_runtime.store", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build, resume or reuse a store (no model is made to generate with)")
    b.add_argument("model", help="a local checkpoint folder or a hub repo id")
    b.add_argument("--out", default=None, help="the store folder (default: under --store-dir, named as load() names it)")
    b.add_argument("--expert-bits", type=_bits, default=d.expert_bits, metavar="{none,2,3,4,8}",
                   help=doc["expert_bits"])
    b.add_argument("--expert-group-size", type=int, default=d.expert_group_size, help=doc["expert_group_size"])
    b.add_argument("--attn-bits", type=_bits, default=d.attn_bits, metavar="{none,4,8}",
                   help="recorded in the store as the attention setting it loads with: " + doc["attn_bits"])
    b.add_argument("--attn-group-size", type=int, default=d.attn_group_size, help=doc["attn_group_size"])
    b.add_argument("--no-quantize-meta", dest="quantize_meta", action="store_false", help="see --help of app.py")
    b.add_argument("--no-hqq-optimize", dest="hqq_optimize", action="store_false", help=doc["hqq_optimize"])
    b.add_argument("--device", default=d.device, help="where HQQ quantizes: " + doc["device"])
    b.add_argument("--dtype", default=d.dtype, choices=DTYPES, help=doc["dtype"])
    b.add_argument("--store-dir", default=d.store_dir, help=doc["store_dir"])
    b.add_argument("--delete-shards", action="store_true", help=doc["delete_shards"])
    for name, text in (("info", "the store's identity, settings and checksum status"),
                       ("verify", "re-check every record and dense tensor against its checksum")):
        c = sub.add_parser(name, help=text)
        c.add_argument("store", help="a store folder")
    u = sub.add_parser("push", help="upload a store folder to the Hugging Face Hub")
    u.add_argument("store", help="a store folder")
    u.add_argument("--repo", required=True, help="the model repository, USER/NAME (created if it does not exist)")
    u.add_argument("--private", action="store_true", help="create the repository private")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _build(args) -> int:
    from ..loading import build_store

    config = OffloadConfig.from_dict(vars(args))
    report = build_store(args.model, config, args.out)
    print(json.dumps(asdict(report)))
    return 0


def _info(args) -> int:
    from . import read_meta
    from .check import damaged_parts
    from .model import read_info

    folder = Path(args.store)
    meta = read_meta(folder)
    if meta is None:
        raise ValueError(f"{folder} has no readable store.json: not a complete store")
    info = read_info(folder) if (folder / "offload.json").exists() else {}
    identity = meta.get("identity", {})
    damaged = damaged_parts(folder)
    shown = {
        "store": str(folder),
        "source": info.get("source", {}).get("repo") or info.get("source", {}).get("path"),
        "revision": info.get("source", {}).get("revision"),
        "identity derived from": (identity.get("weights") or {}).get("derived_from", "file sizes or index (older store)"),
        "model type": (identity.get("config") or {}).get("model_type"),
        "layers x experts": f"{meta.get('num_layers')} x {meta.get('num_experts')}",
        "expert bits": identity.get("expert_bits"), "group size": identity.get("group_size"),
        "form": identity.get("form", "records as the codec writes them"),
        "dtype": identity.get("dtype"), "hqq optimize": identity.get("hqq_optimize"),
        "licence": info.get("licence"),
        "checksums": "all match" if not damaged else f"{len(damaged)} damaged: {'; '.join(damaged[:8])}",
    }
    for key, value in shown.items():
        print(f"{key:>22}: {value}")
    return 1 if damaged else 0


def _verify(args) -> int:
    from .check import damaged_parts

    damaged = damaged_parts(Path(args.store))
    for part in damaged:
        print(f"damaged: {part}")
    print(f"{args.store}: {'damaged' if damaged else 'every checksum matches'}")
    return 1 if damaged else 0


def _push(args) -> int:
    from .hub import push

    print(push(Path(args.store), args.repo, args.private))
    return 0


COMMANDS = {"build": _build, "info": _info, "verify": _verify, "push": _push}
