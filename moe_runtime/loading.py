"""`load()`: from a checkpoint folder or hub id to a transformers model with offloaded experts.

Steps, each failing with a ValueError before any heavy work where it can:
  1. resolve the model: a local folder, or a hub repo of which only the small files (config,
     index, tokenizer) are fetched; read config.json, pick the adapter, validate the settings;
  2. read the weight map: from the safetensors index alone when there is one (pickles are refused);
  3. the slow tier. A complete store for this model and these settings is used as is: no shard
     is opened or downloaded. Otherwise the store is built shard by shard (hub shards downloaded
     one at a time, deleted after use with `delete_shards`); only an unquantized RAM tier packs
     the experts straight from the checkpoint and writes no store (the fast path for small models);
  4. build the transformers model on the meta device, swap in the offloaded experts, then
     materialize only the dense part and fill it from the store (or the checkpoint on the fast path);
  5. optionally HQQ-quantize attention; attach the tokenizer.
"""

from __future__ import annotations

import json
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from .arch import adapter_for
from .checkpoint import INDEX_FILE, Checkpoint, ModelSource, WeightMap, open_model, open_safetensors, read_weight_map
from .config import OffloadConfig
from .device import Device, EmulatedDevice, make_device
from .engine import Engine
from .experts import build_offloaded_experts, link_speculators
from .host_cache import HostCache, plan_host_memory
from .kernels import choose_format
from .kernels.capability import choose_compute
from .kernels.hqq_linear import HQQLinear
from .policies import EvictionPolicy, make_host_policy
from .quant import MATRICES, ExpertCodec
from .speculation import build_speculators
from .stats import StatsCollector
from .store import (
    DENSE_FILE,
    DiskTier,
    RamTier,
    StoreDamaged,
    open_store,
    replace_legacy_store,
    round_up,
    store_folder,
)
from .store.build import JOURNAL, BuildReport, ResumableStoreWriter, StoreLock, store_bytes
from .store.hub import pull
from .store.identity import source_identity
from .store.model import find_built_from, is_store_model, open_store_model, package, settings_of, settle
from .types import ExpertWeights


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} is not available: no CUDA GPU found; use 'cpu' or 'auto'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={name!r} is not available: {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype for `device`: kernels.capability's rule (bf16 below sm_80 is a ValueError)."""
    return choose_compute(device, name).dtype


def _read_config(model_dir: Path):
    if not (model_dir / "config.json").exists():
        raise ValueError(f"{model_dir} has no config.json: is it a model folder?")
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as err:
        raise ValueError(f"cannot read {model_dir / 'config.json'}: {err}") from None


class ExpertReader:
    """One expert's `ExpertWeights`, read in whichever of its family's key layouts the checkpoint has.

    Indexed by MoE layer (0..num_layers-1, the store's order); `shape.moe_layers` maps that to the
    decoder layer the checkpoint's keys name. Each layer's layout is picked once: the first of the
    adapter's layouts whose keys are all in the checkpoint.
    """

    def __init__(self, checkpoint: Checkpoint, adapter, shape, hf_config) -> None:
        self.checkpoint = checkpoint
        self.decoder_layer = shape.moe_layers
        layouts = adapter.layouts(hf_config)
        self.layout = []
        missing = []
        for layer in self.decoder_layer:
            found = next((layout for layout in layouts if all(
                k in checkpoint for e in range(shape.num_experts) for k in layout.keys(layer, e))), None)
            if found is None:  # report what the first (preferred) layout lacks
                missing += [k for e in range(shape.num_experts) for k in layouts[0].keys(layer, e)
                            if k not in checkpoint]
            self.layout.append(found)
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise ValueError(f"checkpoint {checkpoint.model_dir} lacks expert tensors: {shown}")

    def keys(self, layer: int, expert: int) -> tuple[str, ...]:
        """The checkpoint tensors one expert is read from."""
        return self.layout[layer].keys(self.decoder_layer[layer], expert)

    def __call__(self, layer: int, expert: int) -> ExpertWeights:
        return self.layout[layer].read(self.checkpoint, self.decoder_layer[layer], expert)


def _listed(names: list[str], limit: int = 4) -> str:
    """'a, b, c, d and 7 more (11)': a few names and the count."""
    shown = ", ".join(names[:limit])
    return f"{shown} and {len(names) - limit} more ({len(names)} in all)" if len(names) > limit else shown


def _expert_module_names(model, adapter, shape) -> list[str]:
    """Names of the experts modules of the MoE layers in a built model (their parameters come from the store)."""
    name_of = {id(module): name for name, module in model.named_modules()}
    layers = adapter.layers(model)
    return [name_of[id(adapter.moe_block(layers[i]).experts)] for i in shape.moe_layers]


def _check_weight_names(weights: WeightMap, model, adapter, shape, hf_config) -> None:
    """Refuse a checkpoint that does not fit the model config.json describes, from the names alone
    (the index, before any shard is read): tensors the model has no place for (an extra layer, an
    expert past num_experts) and dense tensors the model needs that the checkpoint lacks. Missing
    experts are ExpertReader's to report; shapes are checked as tensors are read."""
    expert_keys = {key for layout in adapter.layouts(hf_config) for layer in shape.moe_layers
                   for expert in range(shape.num_experts) for key in layout.keys(layer, expert)}
    offloaded = tuple(name + "." for name in _expert_module_names(model, adapter, shape))
    params = {name for name, _ in model.named_parameters() if not name.startswith(offloaded)}
    buffers = {name for name, _ in model.named_buffers()}
    unexpected, present = [], set()
    for key in weights.key_to_file:
        if adapter.is_expert_key(key, hf_config):
            if key not in expert_keys:
                unexpected.append(key)
            continue
        name = adapter.dense_key(key)
        if name in params:
            present.add(name)
        elif name not in buffers:  # old checkpoints carry rotary buffers: harmless, ignored
            unexpected.append(key)
    missing = sorted(params - present)
    if getattr(model.config, "tie_word_embeddings", False):
        missing = [name for name in missing if name != "lm_head.weight"]
    if unexpected:
        raise ValueError(f"checkpoint {weights.folder} has tensors the model of its config.json has no place for: "
                         f"{_listed(sorted(unexpected))}; config.json and weights do not match")
    if missing:
        raise ValueError(f"checkpoint {weights.folder} lacks tensors the model needs: {_listed(missing)}; "
                         "config.json and weights do not match")


def _shape_checked(reader: ExpertReader, shape):
    """reader(layer, expert), refusing matrices of another shape than config.json says."""
    hidden, inter = shape.hidden_size, shape.intermediate_size
    wanted = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}

    def read(layer: int, expert: int) -> ExpertWeights:
        weights = reader(layer, expert)
        wrong = [f"{name} {tuple(t.shape)} (expected {want})"
                 for (name, want), t in zip(wanted.items(), weights[:3]) if tuple(t.shape) != want]
        if wrong:
            raise ValueError(f"checkpoint expert {expert} of layer {layer} has the wrong shape: {', '.join(wrong)}; "
                             "config.json and weights do not match")
        return weights

    return read


def _deletes_shards(config: OffloadConfig, source: ModelSource, weights: WeightMap) -> bool:
    if not config.delete_shards:
        return False
    if source.is_hub and weights.indexed:
        return True
    why = (f"without {INDEX_FILE} the store is found by the weight files' sizes, so they must stay"
           if source.is_hub else "the files of a local folder are never deleted")
    warnings.warn(f"delete_shards=True is ignored for {source.folder}: {why}", stacklevel=3)
    return False


def _build_store(folder: Path, codec: ExpertCodec, shape, adapter, hf_config, source: ModelSource,
                 weights: WeightMap, identity: dict, delete: bool) -> tuple[int, int]:
    """Write the store shard by shard: each shard's experts into records, its other tensors into the dense file.

    Resumable (store.build): what an interrupted build of the same store left and still matches its
    checksums is kept; only the shards holding a missing expert or dense tensor are read (downloaded).
    Returns (experts built, experts reused).

    An expert whose tensors span shards is written when its last shard is processed; its parts in
    earlier shards are read from there, or, when `delete` removed those shards, from memory, where
    they were copied just before the deletion. The next shard downloads while this one is
    processed (hub repos), so with `delete` at most two shards are on disk at any time.
    """
    if not source.is_hub:
        weights.require_files()
    checkpoint = Checkpoint(weights)
    reader = ExpertReader(checkpoint, adapter, shape, hf_config)  # before any download
    read = _shape_checked(reader, shape)
    dense = {key: adapter.dense_key(key) for key in weights.key_to_file if not adapter.is_expert_key(key, hf_config)}
    writer = ResumableStoreWriter(folder, codec, shape.num_layers, shape.num_experts, identity, list(dense.values()))
    dense = {key: name for key, name in dense.items() if name in writer.dense.missing()}
    todo = sorted(writer.todo)
    order = {name: i for i, name in enumerate(weights.files)}
    completes: dict[str, list[tuple[int, int]]] = {name: [] for name in weights.files}
    uses: Counter[str] = Counter()
    for layer, expert in todo:
        keys = reader.keys(layer, expert)
        uses.update(keys)
        completes[max((weights.key_to_file[k] for k in keys), key=order.__getitem__)].append((layer, expert))
    in_file: dict[str, list[str]] = {name: [] for name in weights.files}
    for key, name in weights.key_to_file.items():
        in_file[name].append(key)
    needed = {weights.key_to_file[k] for k in [*uses, *dense]}
    files = [name for name in weights.files if name in needed]  # a resumed build skips finished shards
    shards = _shards_in_turn(source, files)
    try:
        with tqdm(total=shape.num_layers * shape.num_experts, initial=writer.reused, desc="building expert store",
                  unit="expert") as bar:  # starts at what an interrupted build left; the phase in its postfix
            fetch = "downloading" if source.is_hub else "reading"
            bar.set_postfix_str(f"shard 1/{len(files)}: {fetch}")
            for i, (name, path) in enumerate(shards):
                bar.set_postfix_str(f"shard {i + 1}/{len(files)}: quantizing and writing")
                checkpoint.add(name, path)
                for key in in_file[name]:
                    if key in dense:
                        writer.put_dense(dense[key], checkpoint.get(key))
                for layer, expert in completes[name]:
                    writer.put(layer, expert, *read(layer, expert))
                    for key in reader.keys(layer, expert):
                        uses[key] -= 1
                        if not uses[key]:
                            checkpoint.forget(key)
                    bar.update()
                if delete:
                    checkpoint.release(name, keep=[k for k in in_file[name] if uses[k] > 0])
                    source.remove(path)
                if i + 1 < len(files):
                    bar.set_postfix_str(f"shard {i + 2}/{len(files)}: {fetch}")
        writer.finish()
    except BaseException as err:
        shards.close()
        writer.abort(keep=not isinstance(err, ValueError))  # bad weights: nothing worth resuming
        raise
    return len(todo), writer.reused


def _shards_in_turn(source: ModelSource, files: list[str]):
    """(name, local path) of each shard in turn. For a hub repo the next shard downloads while the
    caller works on this one: at most two are on disk when the caller deletes each after use."""
    if not source.is_hub or not files:
        yield from ((name, source.shard(name)) for name in files)
        return
    pool = ThreadPoolExecutor(1, thread_name_prefix="shard-download")
    try:
        fetching = pool.submit(source.shard, files[0])
        for i, name in enumerate(files):
            path = fetching.result()
            if i + 1 < len(files):
                fetching = pool.submit(source.shard, files[i + 1])
            yield name, path
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _full_checkpoint(source: ModelSource, weights: WeightMap) -> Checkpoint:
    if not source.is_hub:
        weights.require_files()
    return Checkpoint.opened(weights, {name: source.shard(name) for name in weights.files})


def _slow_tier(config: OffloadConfig, offload: str, codec: ExpertCodec, shape, adapter, hf_config,
               source: ModelSource,
               weights: WeightMap, model_name: str, dev: Device | None):
    """(tier, store folder or None, dense tensors by parameter name -> reader). `dev`: the engine's Device
    (the RAM tier's records and the disk tier's staging buffers are pinned by it), None on a CPU.

    A complete store (experts + dense tensors) is used whenever there is one: the checkpoint's
    shards are then not opened, nor downloaded. Without one, an unquantized RAM tier packs the
    experts straight from the checkpoint and writes no store (the fast path for small models);
    every other setting, and `delete_shards`, builds the store first.
    """
    delete = _deletes_shards(config, source, weights)
    identity = _identity(config, codec, source, weights)
    folder = store_folder(config.store_dir, model_name, identity)
    if not source.is_hub and weights.missing():  # shards gone: the store built from this folder, if any
        folder = find_built_from(Path(config.store_dir), source.folder, identity) or folder
    # store version 2 (one record format for every device, converted at run time) lived under this name
    replace_legacy_store(store_folder(config.store_dir, model_name, _version2_identity(identity, weights)),
                         folder)
    stride = round_up(codec.nbytes)
    for attempt in range(2):  # a store found damaged while its records are read is rebuilt once
        if open_store(folder, shape.num_layers, shape.num_experts, codec, dense=True) is None:
            if offload == "ram" and config.expert_bits is None and not delete:
                checkpoint = _full_checkpoint(source, weights)
                reader = ExpertReader(checkpoint, adapter, shape, hf_config)
                tier = RamTier.from_encoder(codec, shape.num_layers, shape.num_experts,
                                            _shape_checked(reader, shape), dev)
                dense = {adapter.dense_key(key): partial(checkpoint.get, key)
                         for key in checkpoint.keys() if not adapter.is_expert_key(key, hf_config)}
                return tier, None, dense
            _ensure_store(folder, config, codec, shape, adapter, hf_config, source, weights, identity, delete)
        try:
            if offload == "ram":
                tier = RamTier.from_file(folder, shape.num_layers, shape.num_experts, stride, codec.nbytes, dev)
            else:
                tier = DiskTier(folder, shape.num_experts, stride, codec.nbytes, dev)
            break
        except StoreDamaged as err:
            if attempt:
                raise
            warnings.warn(f"{err}: rebuilding it now", stacklevel=3)
    handle = open_safetensors(folder / DENSE_FILE)
    return tier, folder, {name: partial(handle.get_tensor, name) for name in handle.keys()}


def _identity(config: OffloadConfig, codec: ExpertCodec, source: ModelSource, weights: WeightMap) -> dict:
    """What a store is made from and with: its folder's name is a digest of this (store.identity)."""
    return {
        "config": json.loads((source.folder / "config.json").read_text()),
        "weights": source_identity(source, weights),
        "expert_bits": config.expert_bits, "group_size": config.expert_group,
        "quantize_meta": config.quantize_meta, "hqq_optimize": config.hqq_optimize, "dtype": str(codec.dtype),
        "form": codec.form_name,  # the records are in the form this device computes from (kernels.forms)
    }


def _version2_identity(identity: dict, weights: WeightMap) -> dict:
    """The identity store version 2 was named by: this one without the form, its weights named by file
    sizes or the index (WeightMap.identity); to find and replace such a store."""
    return {**{k: v for k, v in identity.items() if k != "form"}, "weights": weights.identity}


def _ensure_store(folder: Path, config: OffloadConfig, codec: ExpertCodec, shape, adapter, hf_config,
                  source: ModelSource, weights: WeightMap, identity: dict, delete: bool) -> BuildReport:
    """Under the folder's lock: a complete store is reused (a second process waits for the first's);
    otherwise it is built, or resumed, and made a loadable model (store.model)."""
    start = time.perf_counter()
    total = shape.num_layers * shape.num_experts
    with StoreLock(folder):
        if open_store(folder, shape.num_layers, shape.num_experts, codec, dense=True) is not None:
            built, reused = 0, total
            (folder / JOURNAL).unlink(missing_ok=True)  # left by a build killed right after its store.json
        else:
            built, reused = _build_store(folder, codec, shape, adapter, hf_config, source, weights, identity, delete)
        if built or not is_store_model(folder):
            origin = ({"repo": source.repo_id, "revision": source.revision} if source.is_hub
                      else {"path": str(source.folder.resolve())})
            package(folder, source.folder, {**origin, "identity": identity["weights"]}, settings_of(config, codec.dtype))
    return BuildReport(str(folder), built, reused, store_bytes(folder), round(time.perf_counter() - start, 3))


def build_store(model: str | Path, config: OffloadConfig | None = None, out: str | Path | None = None) -> BuildReport:
    """Build (or resume, or reuse) the store of `model` with `config`'s settings, without making a model
    to generate with: `python -m moe_runtime.store build`. `out`: the store folder (default: under
    `config.store_dir`, named as `load` names it)."""
    config = config or OffloadConfig()
    config.validate()
    source = open_model(str(model), pull_store=pull)
    if is_store_model(source.folder):
        raise ValueError(f"{model} is a store already: load it, or build from the original checkpoint")
    hf_config = _read_config(source.folder)
    adapter = adapter_for(hf_config)
    shape = adapter.shape(hf_config)
    device = resolve_device(config.device)
    codec = expert_codec(shape, config, device, resolve_dtype(config.dtype, device))
    weights = read_weight_map(source.folder)
    meta_model = _build_model(hf_config, codec.dtype, adapter.attn_implementation)
    _check_weight_names(weights, meta_model, adapter, shape, hf_config)
    _check_dense_shapes(weights, meta_model, adapter, hf_config)  # before any store is written
    identity = _identity(config, codec, source, weights)
    folder = Path(out) if out is not None else store_folder(config.store_dir, str(model), identity)
    return _ensure_store(folder, config, codec, shape, adapter, hf_config, source, weights, identity,
                         _deletes_shards(config, source, weights))


def _build_model(hf_config, dtype: torch.dtype, attn_implementation: str):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation=attn_implementation)


def _moe_blocks(adapter, layers, shape) -> list:
    """The MoE blocks of `shape.moe_layers`, checked against the built model: exactly those layers have experts."""
    has_experts = [i for i, layer in enumerate(layers) if hasattr(_block_or_none(adapter, layer), "experts")]
    if has_experts != list(shape.moe_layers):
        raise ValueError(f"{adapter.model_type}: the config's MoE layers are {list(shape.moe_layers)} but the "
                         f"model built from it has experts in layers {has_experts}")
    return [adapter.moe_block(layers[i]) for i in shape.moe_layers]


def _block_or_none(adapter, layer):
    try:
        return adapter.moe_block(layer)
    except AttributeError:
        return None


def _check_dense_shapes(weights: WeightMap, model, adapter, hf_config) -> None:
    """Refuse dense tensors of the wrong shape from the shards' headers (no tensor data is read),
    before a store is built from them. Shards not on disk yet (a hub download in progress) are
    checked as they are read (`_load_dense`)."""
    targets = dict(model.named_parameters())
    by_file: dict[str, list[str]] = {}
    for key, file in weights.key_to_file.items():
        if not adapter.is_expert_key(key, hf_config) and adapter.dense_key(key) in targets:
            by_file.setdefault(file, []).append(key)
    wrong = []
    for file, keys in by_file.items():
        path = weights.folder / file
        if not path.exists():
            continue
        handle = open_safetensors(path)
        for key in keys:
            found, expected = tuple(handle.get_slice(key).get_shape()), tuple(targets[adapter.dense_key(key)].shape)
            if found != expected:
                wrong.append(f"{adapter.dense_key(key)} {found} (expected {expected})")
    if wrong:
        raise ValueError(f"checkpoint {weights.folder} has tensors of the wrong shape: {_listed(sorted(wrong))}; "
                         "config.json and weights do not match")


def _load_dense(model, tensors: dict, where: Path, device) -> None:
    """Fill the model's dense parameters from `tensors` (parameter name -> reader), one at a time."""
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    loaded = set()
    wrong = []
    for name, read in tensors.items():
        target = params.get(name)
        if target is None:  # a buffer the checkpoint carries (names were checked before any work)
            continue
        tensor = read()
        if tuple(tensor.shape) != tuple(target.shape):
            wrong.append(f"{name} {tuple(tensor.shape)} (expected {tuple(target.shape)})")
            continue
        with torch.no_grad():
            target.copy_(tensor.to(device=device, dtype=target.dtype))
        loaded.add(name)
    if wrong:
        raise ValueError(f"checkpoint {where} has tensors of the wrong shape: {_listed(wrong)}; "
                         "config.json and weights do not match")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
        loaded.add("lm_head.weight")
    missing = [n for n, _ in model.named_parameters() if n not in loaded]
    if missing:
        raise ValueError(f"checkpoint {where} lacks tensors for: {', '.join(missing[:6])}")
    for module in model.modules():  # non-persistent buffers (rotary frequencies) are not in checkpoints
        if "RotaryEmbedding" in type(module).__name__:
            model._init_weights(module)


def _quantize_attention(model, adapter, config: OffloadConfig) -> None:
    layers = adapter.layers(model)
    for layer in tqdm(layers, desc=f"quantizing attention to {config.attn_bits} bits", unit="layer"):
        for name, linear in adapter.attention_linears(layer).items():
            setattr(layer.self_attn, name, HQQLinear(linear, config.attn_bits, config.attn_group_size,
                                                     config.quantize_meta, config.hqq_optimize))


def expert_codec(shape, config: OffloadConfig, device: torch.device, dtype: torch.dtype) -> ExpertCodec:
    """The experts' record layout, in the matrix format `device` computes from (kernels.forms)."""
    fmt = None
    if config.expert_bits is not None:
        inter, hidden = shape.intermediate_size, shape.hidden_size
        matrices = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
        fmt = choose_format(config.expert_bits, config.expert_group, [matrices[n] for n in MATRICES], device)
    return ExpertCodec(shape.hidden_size, shape.intermediate_size, config.expert_bits, config.expert_group,
                       config.quantize_meta, dtype, optimize=config.hqq_optimize, quant_device=str(device),
                       biases=shape.expert_bias, fmt=fmt)


def host_policy(config: OffloadConfig, num_layers: int, num_experts: int, slots: int) -> EvictionPolicy:
    """The host level's eviction policy over (layer, expert) keys (`host_policy`, policies.HOST_POLICIES)."""
    return make_host_policy(config.host_policy, num_layers=num_layers, num_experts=num_experts, slots=slots)


def host_level(disk: DiskTier, num_layers: int, num_experts: int, host_slots: int, stride: int,
               config: OffloadConfig, exclusive: bool, shared: bool, dev: Device | None,
               stats: StatsCollector) -> HostCache:
    """The host cache over the disk tier: exclusive with GPU slots on CUDA (its arena pinned by `dev`); on a
    CPU shared with the device level (the experts compute in the arena, which adds the device level's
    cache_size per layer)."""
    return HostCache(disk, num_layers, host_slots, stride, host_policy(config, num_layers, num_experts, host_slots),
                     exclusive, stats=stats, shared=shared, device_slots=num_layers * config.cache_size,
                     max_records=num_layers * num_experts, dev=dev)


LEVELS = ("shared", "exclusive")


def load(model: str | Path, config: OffloadConfig | None = None, *, levels: str | None = None,
         device_ops: EmulatedDevice | None = None) -> Engine:
    """Load a Mixture-of-Experts checkpoint with its experts offloaded as `config` says.

    `levels`: how the host cache stacks under the device slots, the device's own by default: "shared" on
    a CPU (experts compute in the host arena), "exclusive" on CUDA (separate slots, write-back).
    "exclusive" on a CPU runs the GPU's path on CPU tensors (tests). It applies to the host cache of
    offload="disk"; a CPU computes from the RAM tier's records in place either way.

    `device_ops` (tests): an `device.EmulatedDevice` through which the hierarchy's device memory goes on a
    CPU: device slots, pinned RAM records / arena / staging, side streams, events, deferred copies, each
    thread's device, all with CUDA's semantics on CPU tensors (levels "exclusive"). On CUDA the engine
    always uses a `CudaDevice` of its own device; on a CPU without it there is none (nothing is pinned)."""
    config = config or OffloadConfig()
    config.validate()
    if levels is not None and levels not in LEVELS:
        raise ValueError(f"levels={levels!r} is not allowed: use one of {', '.join(LEVELS)} (or None)")
    if device_ops is not None and not isinstance(device_ops, EmulatedDevice):
        raise ValueError(f"device_ops={type(device_ops).__name__} is not allowed: pass an EmulatedDevice "
                         "(on CUDA the engine makes its CudaDevice itself)")
    if device_ops is not None and levels == "shared":
        raise ValueError("device_ops emulates a GPU's separate device memory: levels='shared' computes in host RAM; "
                         "use levels='exclusive' (or None)")
    model_name = str(model)
    source = open_model(model_name, pull_store=pull)
    model_dir = source.folder
    packaged = is_store_model(model_dir)  # a store folder or repository: its own settings (store.model)
    if packaged:
        config = settle(model_dir, config)
    hf_config = _read_config(model_dir)
    adapter = adapter_for(hf_config)
    shape = adapter.shape(hf_config)
    config.validate_for_model(shape.num_experts, shape.top_k)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if device_ops is not None and device.type != "cpu":
        raise ValueError(f"device_ops emulates CUDA on a CPU: device={config.device!r} is not the CPU; use "
                         "device='cpu'")
    levels = levels or ("shared" if device.type == "cpu" and device_ops is None else "exclusive")
    if levels == "shared" and device.type != "cpu":
        raise ValueError(f"levels='shared' needs a CPU device (the experts compute in host RAM), not {device}")
    dev = device_ops if device_ops is not None else make_device(device) if device.type == "cuda" else None
    weights = None if packaged else read_weight_map(model_dir)
    codec = expert_codec(shape, config, device, dtype)
    if config.attn_bits is not None and (hf_config.hidden_size * shape.hidden_size) % config.attn_group_size:
        raise ValueError(f"attn_group_size={config.attn_group_size} does not divide the attention projections "
                         f"(hidden_size={hf_config.hidden_size}): use a smaller power of two")
    stride = round_up(codec.nbytes)
    host = plan_host_memory(config.offload, config.host_cache_gb, num_layers=shape.num_layers,
                            num_experts=shape.num_experts, cache_size=config.cache_size, stride=stride,
                            exclusive=levels == "exclusive", pinned=dev is not None)  # refused here, if so
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as err:
        raise ValueError(f"cannot load the tokenizer of {model_dir}: {err}") from None

    hf_model = _build_model(hf_config, dtype, adapter.attn_implementation)  # meta device: names and shapes only
    if packaged:
        tier, store_path, dense = open_store_model(model_dir, host.offload, shape, codec, device, dev)
    else:
        _check_weight_names(weights, hf_model, adapter, shape, hf_config)
        _check_dense_shapes(weights, hf_model, adapter, hf_config)  # before any store is written
        tier, store_path, dense = _slow_tier(config, host.offload, codec, shape, adapter, hf_config, source, weights,
                                             model_name, dev)
    stats = StatsCollector(shape.num_layers, shape.num_experts, shape.top_k, config.cache_size,
                           config.prefetch, config.record_trace, model_name)
    host_cache = None
    if isinstance(tier, DiskTier):  # the host level between the device slots and the disk
        host_cache = tier = host_level(tier, shape.num_layers, shape.num_experts, host.host_slots, stride, config,
                                       host.exclusive, levels == "shared", dev, stats)
        if host.exclusive:  # evicted device experts go back to the arena, not away
            host_cache.require("exchanges", "exclusive levels")
    layers = adapter.layers(hf_model)
    blocks = _moe_blocks(adapter, layers, shape)
    transfer, modules = build_offloaded_experts(
        tier, codec, num_layers=shape.num_layers, num_experts=shape.num_experts, top_k=shape.top_k,
        cache_size=config.cache_size, prefetch=config.prefetch, policy=config.policy,
        stats=stats, expert_fn=adapter.expert_fn(hf_config), device=device, dev=dev)
    for block, experts in zip(blocks, modules):
        block.experts = experts
    hf_model.to_empty(device=device)
    _load_dense(hf_model, dense, store_path or model_dir, device)
    del dense  # lets go of the dense file (or the checkpoint's shards)
    moe_layers = [layers[i] for i in shape.moe_layers]
    disk_prefetch = host_cache is not None and config.disk_prefetch_layers and host.host_slots
    link_speculators(modules, build_speculators(
        adapter, hf_config, moe_layers, [module.cache for module in modules], config.prefetch,
        host=host_cache if disk_prefetch else None, ahead=config.disk_prefetch_layers,
        per_layer=max(config.prefetch, shape.top_k)))
    if config.attn_bits is not None:
        _quantize_attention(hf_model, adapter, config)
    if (model_dir / "generation_config.json").exists():
        hf_model.generation_config = GenerationConfig.from_pretrained(model_dir)
    hf_model.eval()
    return Engine(hf_model, tokenizer, config, shape, device, model_name, modules, transfer, tier, stats,
                  store_path, host_cache=host_cache, host_plan=host, dev=dev)
