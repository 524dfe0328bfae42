"""Throughput model: predicted decode tokens/s of an offloaded MoE model on named hardware.

A model's shape (bytes of an expert and of the dense part, from its dimensions and quantization)
and a machine's assumed bandwidths (slow tier -> device, and device memory) turn mean expert loads
per layer and token — from a simulated or measured run — into a time per token, split by cause.

Compute per layer is what the engine's GPU path does, in device-memory traffic: HQQ dequantizes each
quantized matrix to fp16 (reads the record, writes the fp16 matrix) and the matmul reads that matrix
back, so an active 2-bit Mixtral expert costs its 66 MB record plus 2 x 352 MB of fp16 traffic, not
66 MB; 4-bit attention likewise. Bandwidths are spec-sheet peaks (sources beside `HARDWARE`). What
traffic does not explain — kernel launches, Python dispatch, synchronisation, per layer — is one
constant, `LAYER_OVERHEAD_S`, fitted to ONE paper figure (Table 2, T4, full method) and then checked
against every other row of Table 2 (`paper_errors`, printed by `python -m moe_runtime.sim calibrate`).
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9  # bandwidths and sizes are decimal, as spec sheets give them


@dataclass(frozen=True)
class ModelShape:
    """What the throughput model needs to know of a model; bits=16 means unquantized fp16.

    Quantized weights cost `bits + 2 * meta_bits / group_size` bits each: HQQ keeps a scale and a zero
    per group, themselves quantized to 8 bits (the paper's setting); their own fp16 meta (< 1%) is ignored.
    `num_layers` counts MoE layers; leading dense layers (DeepSeek's `first_k_dense_replace`) and
    shared experts are resident fp16, as the engine keeps them; expert biases (gpt-oss, < 0.1%) are ignored.
    """

    name: str
    num_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    expert_bits: int = 2
    expert_group_size: int = 16
    attn_bits: int = 4
    attn_group_size: int = 64
    meta_bits: int = 8
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    attention_params: int | None = None  # per layer, where the projections are not q/k/v/o (DeepSeek's MLA)
    shared_intermediate_size: int = 0  # the shared experts' FFN size per MoE layer (resident)
    dense_layers: int = 0  # leading layers with a dense FFN instead of experts
    dense_intermediate_size: int = 0

    def _bits_per_weight(self, bits: int, group_size: int) -> float:
        return 16.0 if bits >= 16 else bits + 2 * self.meta_bits / group_size

    @property
    def expert_bytes(self) -> int:
        params = 3 * self.hidden_size * self.intermediate_size  # w1, w3: D->F; w2: F->D
        return int(params * self._bits_per_weight(self.expert_bits, self.expert_group_size) / 8)

    @property
    def expert_compute_bytes(self) -> int:
        """Device traffic of computing one active expert for one token: its record is read; when
        quantized, each matrix is dequantized to fp16 (written) and read back by the matmul."""
        if self.expert_bits >= 16:
            return self.expert_bytes
        return self.expert_bytes + 2 * 2 * 3 * self.hidden_size * self.intermediate_size

    @property
    def _attn_params(self) -> int:
        head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        q, kv = self.num_attention_heads * head_dim, self.num_key_value_heads * head_dim
        return self.attention_params or 2 * self.hidden_size * (q + kv)  # q, o: D x q; k, v: D x kv

    @property
    def attention_bytes(self) -> int:
        """One layer's attention projections, quantized."""
        return int(self._attn_params * self._bits_per_weight(self.attn_bits, self.attn_group_size) / 8)

    @property
    def layer_dense_bytes(self) -> int:
        """Attention projections (quantized), router, norms and shared experts (fp16) of one MoE layer."""
        fp16 = self.hidden_size * (self.num_experts + 2 + 3 * self.shared_intermediate_size)
        return self.attention_bytes + 2 * fp16

    @property
    def layer_dense_compute_bytes(self) -> int:
        """Device traffic of one MoE layer's dense part for one token (attention dequantized to fp16
        and read back when quantized, as for experts)."""
        fp16_dequant = 0 if self.attn_bits >= 16 else 2 * 2 * self._attn_params
        return self.layer_dense_bytes + fp16_dequant

    @property
    def dense_layers_bytes(self) -> int:
        """All leading dense layers: attention (quantized), FFN and norms (fp16)."""
        fp16 = self.hidden_size * (3 * self.dense_intermediate_size + 2)
        return self.dense_layers * (self.attention_bytes + 2 * fp16)

    @property
    def head_bytes(self) -> int:
        """The fp16 LM head, read once per token (the embedding reads one row: not counted)."""
        return 2 * self.vocab_size * self.hidden_size

    @property
    def resident_dense_bytes(self) -> int:
        """Device memory taken by everything but the expert cache (embedding and LM head included)."""
        return self.num_layers * self.layer_dense_bytes + self.dense_layers_bytes + 2 * self.head_bytes


def mla_params(hidden: int, heads: int, q_lora_rank: int | None, kv_lora_rank: int, nope: int, rope: int,
                v_head: int) -> int:
    """DeepSeek MLA projections of one layer: q (or q_a + q_b), kv_a_proj_with_mqa, kv_b_proj, o_proj."""
    q_out = heads * (nope + rope)
    q = hidden * q_out if q_lora_rank is None else q_lora_rank * (hidden + q_out)
    return q + hidden * (kv_lora_rank + rope) + kv_lora_rank * heads * (nope + v_head) + heads * v_head * hidden


# Each from the hub repo's config.json (transcribed; this machine cannot reach the hub). Defaults =
# the paper's mixed quantization: 2-bit experts (group 16), 4-bit attention (group 64).
MODELS = {m.name: m for m in (
    # mistralai/Mixtral-8x7B-v0.1
    ModelShape("mixtral-8x7b", num_layers=32, num_experts=8, top_k=2, hidden_size=4096, intermediate_size=14336,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
    # mistralai/Mixtral-8x22B-Instruct-v0.1
    ModelShape("mixtral-8x22b", num_layers=56, num_experts=8, top_k=2, hidden_size=6144, intermediate_size=16384,
               num_attention_heads=48, num_key_value_heads=8, vocab_size=32768),
    # Qwen/Qwen3-30B-A3B: every layer MoE (decoder_sparse_step 1), moe_intermediate_size 768, head_dim 128
    ModelShape("qwen3-30b-a3b", num_layers=48, num_experts=128, top_k=8, hidden_size=2048, intermediate_size=768,
               num_attention_heads=32, num_key_value_heads=4, vocab_size=151936, head_dim=128),
    # Qwen/Qwen1.5-MoE-A2.7B: 60 experts of 1408, a shared expert of 5632
    ModelShape("qwen1.5-moe-a2.7b", num_layers=24, num_experts=60, top_k=4, hidden_size=2048,
               intermediate_size=1408, num_attention_heads=16, num_key_value_heads=16, vocab_size=151936,
               shared_intermediate_size=5632),
    # allenai/OLMoE-1B-7B-0924
    ModelShape("olmoe-1b-7b", num_layers=16, num_experts=64, top_k=8, hidden_size=2048, intermediate_size=1024,
               num_attention_heads=16, num_key_value_heads=16, vocab_size=50304),
    # microsoft/Phi-3.5-MoE-instruct
    ModelShape("phi-3.5-moe", num_layers=32, num_experts=16, top_k=2, hidden_size=4096, intermediate_size=6400,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=32064),
    # deepseek-ai/DeepSeek-V2-Lite: 27 layers, first_k_dense_replace 1 (dense FFN 10944), 64 routed experts
    # of 1408 + 2 shared, MLA with kv_lora_rank 512, no q LoRA, qk_nope 128, qk_rope 64, v_head 128
    ModelShape("deepseek-v2-lite", num_layers=26, num_experts=64, top_k=6, hidden_size=2048, intermediate_size=1408,
               num_attention_heads=16, num_key_value_heads=16, vocab_size=102400,
               attention_params=mla_params(2048, 16, None, 512, 128, 64, 128), shared_intermediate_size=2 * 1408,
               dense_layers=1, dense_intermediate_size=10944),
    # openai/gpt-oss-20b: 32 experts of 2880, top-4, head_dim 64 (its hub experts are MXFP4, ~4.25 bits;
    # the store dequantizes them, then quantizes to expert_bits)
    ModelShape("gpt-oss-20b", num_layers=24, num_experts=32, top_k=4, hidden_size=2880, intermediate_size=2880,
               num_attention_heads=64, num_key_value_heads=8, vocab_size=201088, head_dim=64),
)}


@dataclass(frozen=True)
class HardwareProfile:
    """Assumed bandwidths of a machine: link = slow tier -> device; device = reading resident weights."""

    name: str
    link_gbs: float
    device_gbs: float
    memory_gb: float
    reserve_gb: float
    notes: str


# Assumptions, not measurements. Device bandwidths are spec-sheet peaks, so predictions are optimistic
# upper bounds: real kernels (HQQ dequantization, Python dispatch) reach a fraction of them.
HARDWARE = {h.name: h for h in (
    # NVIDIA T4 datasheet: 16 GB GDDR6, 320 GB/s, PCIe Gen3 x16 (15.75 GB/s per direction in theory);
    # ~12 GB/s is a typical pinned host->device copy. Colab shows 15 GB usable.
    HardwareProfile("t4-pcie3", 12.0, 320.0, 15.0, 2.0, "Colab T4, PCIe 3.0 x16"),
    # NVIDIA GeForce RTX 3060 spec page: 12 GB GDDR6, 192-bit at 15 Gbps = 360 GB/s, PCIe 4.0 x16
    # (31.5 GB/s per direction in theory); ~24 GB/s effective assumed.
    HardwareProfile("rtx3060", 24.0, 360.0, 12.0, 2.0, "desktop RTX 3060 12 GB, PCIe 4.0 x16"),
    # NVIDIA A100 datasheet: A100 40GB PCIe, HBM2 1,555 GB/s, PCIe Gen4 64 GB/s (both directions);
    # ~25 GB/s effective one way assumed.
    HardwareProfile("a100", 25.0, 1555.0, 40.0, 2.0, "A100 40 GB PCIe"),
    # Hugging Face Spaces hardware list: free "CPU basic" = 2 vCPU, 16 GB RAM. No spec sheet gives the
    # bandwidths of a 2-vCPU share: ~20 GB/s memory and ~2 GB/s from the expert store (memcpy / page
    # cache / NVMe) are guesses; 3 GB is left for the OS and Python.
    HardwareProfile("cpu-space", 2.0, 20.0, 16.0, 3.0, "2 vCPU Hugging Face Space, experts read from disk"),
)}


@dataclass(frozen=True)
class PaperFigure:
    """One measured row of the paper: its machine, method, experts kept per layer on the GPU
    (0: accelerate's offloading, which moves every expert of a layer each token)."""

    hardware: str
    method: str
    tokens_per_second: float
    cache_size: int = 0


# Eliseev & Mazur 2023, Table 2: Mixtral-8x7B-Instruct, 2-bit experts, 4-bit attention, measured by the
# authors. Cache per layer: 4 of 8 on a 16 GB T4 and on the A100, 3 on the 12 GB RTX 3060 (the paper's
# setting for each card).
PAPER_TABLE2 = (
    PaperFigure("t4-pcie3", "full method: LRU cache + speculative prefetch", 2.09, 4),
    PaperFigure("t4-pcie3", "naive offloading: accelerate", 0.66),
    PaperFigure("rtx3060", "full method: LRU cache + speculative prefetch", 2.28, 3),
    PaperFigure("rtx3060", "naive offloading: accelerate", 0.92),
    PaperFigure("a100", "full method: LRU cache + speculative prefetch", 3.06, 4),
    PaperFigure("a100", "naive offloading: accelerate", 1.39),
)
CALIBRATION_FIGURE = PAPER_TABLE2[0]  # the one row LAYER_OVERHEAD_S is fitted to


@dataclass(frozen=True)
class Throughput:
    """Predicted decode time per token, split by cause."""

    hardware: str
    compute_s: float  # device traffic (dense part + K active experts, dequantization included) / bandwidth + overhead
    demand_stall_s: float  # misses x expert bytes / link bandwidth
    prefetch_stall_s: float  # prefetch load time not hidden behind one layer's compute

    @property
    def token_s(self) -> float:
        return self.compute_s + self.demand_stall_s + self.prefetch_stall_s

    @property
    def tokens_per_second(self) -> float:
        return 1.0 / self.token_s


def layer_compute_s(model: ModelShape, hardware: HardwareProfile, overhead_s: float | None = None) -> float:
    """One layer's compute for one token: its device traffic at the device's bandwidth, plus the
    fixed per-layer overhead (LAYER_OVERHEAD_S unless given)."""
    traffic = model.layer_dense_compute_bytes + model.top_k * model.expert_compute_bytes
    return traffic / (hardware.device_gbs * GB) + (LAYER_OVERHEAD_S if overhead_s is None else overhead_s)


def predict_from_loads(model: ModelShape, hardware: HardwareProfile, misses_per_layer: float,
                       prefetch_loads_per_layer: float = 0.0, overhead_s: float | None = None) -> Throughput:
    """Time per token from mean loads per layer and token.

    A layer computes for `layer_compute_s`; its misses stall on the link; the next layer's prefetch
    loads overlap with that compute and only the excess stalls. Using means (not per-token values)
    makes this a mean-field estimate.
    """
    layer_compute = layer_compute_s(model, hardware, overhead_s)
    load = model.expert_bytes / (hardware.link_gbs * GB)
    prefetch_excess = max(0.0, prefetch_loads_per_layer * load - layer_compute)
    return Throughput(
        hardware.name,
        compute_s=model.num_layers * layer_compute
        + (model.head_bytes + model.dense_layers_bytes) / (hardware.device_gbs * GB),
        demand_stall_s=model.num_layers * misses_per_layer * load,
        prefetch_stall_s=model.num_layers * prefetch_excess,
    )


def fitting_cache_size(model: ModelShape, hardware: HardwareProfile) -> int:
    """Experts per layer that fit next to the dense weights (0: not even one)."""
    free = (hardware.memory_gb - hardware.reserve_gb) * GB - model.resident_dense_bytes
    return max(0, min(model.num_experts, int(free // (model.num_layers * model.expert_bytes))))


def _paper_loads(model: ModelShape, figure: PaperFigure, lru_hit_rates: dict) -> float:
    """Mean experts moved per layer and token in a paper row's setting: accelerate moves all E;
    the full method misses (1 - LRU hit rate at its cache size) of its K experts."""
    if not figure.cache_size:
        return float(model.num_experts)
    return model.top_k * (1.0 - lru_hit_rates[str(figure.cache_size)])


def fit_layer_overhead(model: ModelShape, lru_hit_rates: dict, figure: PaperFigure = CALIBRATION_FIGURE) -> float:
    """The per-layer overhead (s) that makes the model reproduce `figure` exactly, given the LRU hit
    rates of real Mixtral routing by cache size ({"4": 0.612, ...})."""
    hardware = HARDWARE[figure.hardware]
    without = predict_from_loads(model, hardware, _paper_loads(model, figure, lru_hit_rates), overhead_s=0.0)
    return (1.0 / figure.tokens_per_second - without.token_s) / model.num_layers


def paper_errors(model: ModelShape, lru_hit_rates: dict, overhead_s: float | None = None) -> list[dict]:
    """The model against every row of Table 2: predicted tok/s, the paper's, and the relative error.
    Speculative prefetch is not modelled (its loads are counted as misses), so full-method rows
    are predicted without what prefetch hides."""
    rows = []
    for figure in PAPER_TABLE2:
        hardware = HARDWARE[figure.hardware]
        tp = predict_from_loads(model, hardware, _paper_loads(model, figure, lru_hit_rates), overhead_s=overhead_s)
        rows.append({"hardware": figure.hardware, "method": figure.method, "cache_size": figure.cache_size,
                     "paper": figure.tokens_per_second, "predicted": tp.tokens_per_second,
                     "error": tp.tokens_per_second / figure.tokens_per_second - 1.0,
                     "fitted": figure == CALIBRATION_FIGURE})
    return rows


# LRU hit rates of real Mixtral-8x7B-Instruct decode routing at 2..6 cached experts of 8 (cold cache per
# generation; assets/mixtral-routing-stats.json, "reference_hit_rates"): the loads of the paper's rows.
MIXTRAL_LRU_HIT_RATES = {"2": 0.373, "3": 0.496, "4": 0.612, "5": 0.713, "6": 0.809}
# Kernel launches, Python dispatch and synchronisation per layer and token, fitted so that the model
# reproduces the paper's T4 full-method figure (2.09 tok/s, cache 4); every other Table 2 row checks it.
LAYER_OVERHEAD_S = fit_layer_overhead(MODELS["mixtral-8x7b"], MIXTRAL_LRU_HIT_RATES)
