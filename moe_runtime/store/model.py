"""A store folder as a model: `load(STORE_DIR)` works with the original checkpoint gone.

Beside the store's own files (experts.safetensors, dense.safetensors, store.json) the folder gets
the source's config, generation config, tokenizer and chat template, its licence files, `offload.json`
(the settings the store was built with, and the source it came from) and a model card (README.md).
Loading such a folder takes the store's settings: a setting left at its default is taken from the
store, one set to something else is refused with the store's settings named (nothing is rebuilt:
the weights it would be rebuilt from are not there).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
from pathlib import Path

from ..config import OffloadConfig
from . import DENSE_FILE, STORE_META, STORE_VERSION, DiskTier, RamTier, open_store, read_meta, round_up, stale_reason

SETTINGS_FILE = "offload.json"
CARD = "README.md"
FORMAT = "moe-offload-store"
MODEL_FILES = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "chat_template*",
               "*.jinja", "vocab*", "merges.txt", "added_tokens.json", "LICENSE*", "LICENCE*", "NOTICE*",
               "USE_POLICY*"]
STORE_SETTINGS = ("expert_bits", "expert_group_size", "quantize_meta", "hqq_optimize", "dtype")
LOAD_SETTINGS = ("attn_bits", "attn_group_size")  # not in the store (the dense part is kept as is): defaults


def settings_of(config: OffloadConfig, dtype) -> dict:
    """The settings a store records: those its records depend on, and the attention ones to load it with."""
    return {"expert_bits": config.expert_bits, "expert_group_size": config.expert_group,
            "quantize_meta": config.quantize_meta, "hqq_optimize": config.hqq_optimize,
            "dtype": str(dtype).removeprefix("torch."), "attn_bits": config.attn_bits,
            "attn_group_size": config.attn_group_size}


def package(folder: Path, source_folder: Path, source: dict, settings: dict) -> None:
    """Make the store in `folder` a loadable model: copy the model's small files, write offload.json and the card."""
    folder, source_folder = Path(folder), Path(source_folder)
    for stale in folder.glob(f"{SETTINGS_FILE}.*.partial"):  # left by a killed process (callers hold the lock)
        stale.unlink(missing_ok=True)
    for file in sorted(source_folder.iterdir()):
        if file.is_file() and any(fnmatch.fnmatch(file.name, p) for p in MODEL_FILES):
            shutil.copyfile(file, folder / file.name)
    licence = _licence(source_folder)
    info = {"format": FORMAT, "source": source, "settings": settings, "licence": licence}
    (folder / CARD).write_text(_card(folder, info))
    tmp = folder / f"{SETTINGS_FILE}.{os.getpid()}.partial"  # offload.json last, whole or not at all: it marks a store model
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp, folder / SETTINGS_FILE)


def is_store_model(folder: Path) -> bool:
    folder = Path(folder)
    return all((folder / name).is_file() for name in (SETTINGS_FILE, STORE_META, "config.json"))


def read_info(folder: Path) -> dict:
    try:
        info = json.loads((Path(folder) / SETTINGS_FILE).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder / SETTINGS_FILE} cannot be read: {err}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or not isinstance(info.get("settings"), dict):
        raise ValueError(f"{folder / SETTINGS_FILE} is not a {FORMAT} settings file")
    return info


def settle(folder: Path, config: OffloadConfig) -> OffloadConfig:
    """`config` with the store's settings where it leaves them at their defaults; ValueError where it
    asks for other ones, naming the store's."""
    stored = read_info(folder)["settings"]
    default = OffloadConfig()
    wanted = {name: getattr(config, name) for name in (*STORE_SETTINGS, *LOAD_SETTINGS)}
    if config.expert_group_size is None and config.expert_bits is not None:
        wanted["expert_group_size"] = config.expert_group
    conflicts = [f"{name}={wanted[name]!r}" for name in STORE_SETTINGS
                 if wanted[name] != getattr(default, name) and wanted[name] != stored[name]
                 and not (name == "expert_group_size" and config.expert_bits == stored["expert_bits"]
                          and config.expert_group_size is None)]
    if conflicts:
        shown = ", ".join(f"{name}={stored[name]!r}" for name in STORE_SETTINGS)
        raise ValueError(f"{folder} is an expert store built with {shown}; it cannot be loaded with "
                         f"{', '.join(conflicts)} (its source checkpoint is not here to rebuild from): leave "
                         "those settings at their defaults, or build a store with them from the original "
                         "(python -m moe_runtime.store build MODEL ...)")
    adopted = {name: stored[name] for name in (*STORE_SETTINGS, *LOAD_SETTINGS)
               if getattr(config, name) == getattr(default, name) and name in stored}
    return OffloadConfig.from_dict({**config.to_dict(), **adopted})


def open_store_model(folder: Path, offload: str, shape, codec, device, dev=None):
    """(tier, folder, dense tensors by name -> reader) of a store folder; ValueError if it is incomplete.
    `dev`: the engine's Device (device.py) the tier pins and copies with, None on a CPU."""
    from ..checkpoint import open_safetensors

    meta = read_meta(folder) or {}
    if meta and (meta.get("version") != STORE_VERSION or meta.get("form") != codec.form_name):
        raise ValueError(f"the store {folder.name} cannot run here: {stale_reason(meta, codec)} (a store is written "
                         f"in the form of the device it was built for); build one for this device from the original "
                         f"checkpoint: python -m moe_runtime.store build MODEL --device {device.type} ...")
    if open_store(folder, shape.num_layers, shape.num_experts, codec, dense=True) is None:
        raise ValueError(f"{folder} holds no complete, undamaged store for its own settings: "
                         f"`python -m moe_runtime.store verify {folder}` says what is wrong")
    stride = round_up(codec.nbytes)
    if offload == "ram":
        tier = RamTier.from_file(folder, shape.num_layers, shape.num_experts, stride, codec.nbytes, dev)
    else:
        tier = DiskTier(folder, shape.num_experts, stride, codec.nbytes, dev)
    handle = open_safetensors(folder / DENSE_FILE)
    return tier, folder, {name: (lambda n=name: handle.get_tensor(n)) for name in handle.keys()}


def find_built_from(store_dir: Path, source_path: Path, identity: dict) -> Path | None:
    """A store in `store_dir` built from the local folder `source_path` with the settings of `identity`
    (all but its weights' part, which needs the shards): how a folder whose shards are gone finds its store."""
    wanted = str(Path(source_path).resolve())
    settings = {k: v for k, v in identity.items() if k != "weights"}
    for info_file in sorted(Path(store_dir).glob(f"*/{SETTINGS_FILE}")):
        try:
            built_from = json.loads(info_file.read_text()).get("source", {}).get("path")
        except (OSError, ValueError, AttributeError):
            continue
        meta = read_meta(info_file.parent) or {}
        stored = {k: v for k, v in (meta.get("identity") or {}).items() if k != "weights"}
        if built_from == wanted and stored == json.loads(json.dumps(settings, default=str)):
            return info_file.parent
    return None


def _licence(folder: Path) -> str | None:
    """The source's licence: the `license:` of its model card's front matter, else a LICENSE file's name."""
    card = folder / CARD
    if card.exists():
        match = re.search(r"^---\s*\n(.*?)\n---", card.read_text(errors="replace"), re.S)
        found = match and re.search(r"^licen[cs]e:\s*(\S.*)$", match.group(1), re.M)
        if found:
            return found.group(1).strip().strip("'\"")
    files = sorted(p.name for p in folder.glob("LICEN[CS]E*"))
    return f"see {files[0]}" if files else None


def _card(folder: Path, info: dict) -> str:
    source, settings = info["source"], info["settings"]
    origin = source.get("repo") or Path(str(source.get("path"))).name  # no local path in a card that may be pushed
    front = ["---", "library_name: moe-offload", "tags: [moe-offload, mixture-of-experts, hqq]"]
    if info["licence"] and not info["licence"].startswith("see "):
        front.append(f"license: {info['licence']}")
    if source.get("repo"):
        front.append(f"base_model: {source['repo']}")
    bits = settings["expert_bits"]
    rows = "\n".join(f"| `{name}` | `{value}` |" for name, value in settings.items())
    revision = f" at revision `{source['revision']}`" if source.get("revision") else ""
    return "\n".join(front + ["---", "", f"# {Path(str(origin)).name}: expert store for moe-offload", "",
        f"The experts of `{origin}`{revision}, {'HQQ ' + str(bits) + '-bit' if bits else 'unquantized'}, "
        "packed one record per expert for offloaded inference with moe-offload, beside the model's dense "
        "weights, config and tokenizer. Load it with `moe_runtime.load(\"<this folder or repo id>\")` or "
        "`python app.py --model <this folder or repo id>`; the original checkpoint is not needed.", "",
        f"Licence: {info['licence'] or 'not stated by the source'} (carried over from the source checkpoint).",
        "", f"Weights identity: {source.get('identity', {}).get('derived_from', 'unknown')}.", "",
        "| setting | value |", "| --- | --- |", rows, ""])
