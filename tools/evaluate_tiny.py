"""Measure the embedded tiny Mixtral on its held-out split; every figure of its model card.

    python -m tools.evaluate_tiny                   # Markdown on stdout
    python -m tools.evaluate_tiny --json eval.json  # and the same figures as JSON

Language modelling: next-token loss, perplexity, bits per character (tokenizer-independent).
Routing, per MoE layer, over the same tokens (BOS positions left out):
  usage           fraction of the top-k assignments that went to each expert;
  usage entropy   entropy of that distribution, in bits (uniform over E experts: log2 E);
  router entropy  mean entropy of a token's router softmax, in bits;
  shared          fraction of a token's K experts also selected for the previous token — the
                  temporal locality an LRU expert cache relies on; "shuffled" is the same measure
                  against a token of another window, i.e. what usage imbalance alone gives.

Dimension names: N windows, T positions per window, L layers, E experts, K experts per token.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from tools.train_tiny import DATA_PATH, OUT_DIR, split_text, windows

SAMPLE_PROMPTS = ("ROMEO:\n", "First Citizen:\nWhat say you to the", "KING HENRY VI:\nNow, my lords,")
SAMPLE_CHAT = [
    {"role": "system", "content": "A street in Verona."},
    {"role": "user", "content": "Good morrow, friend. What news from the court?"},
]


def load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    return model.eval(), tokenizer


def validation_windows(tokenizer, data: Path, context: int) -> tuple[torch.Tensor, int]:
    """[N, context] windows over the held-out text, and how many characters their tokens cover."""
    _, val_text = split_text(data.read_text(encoding="utf-8"))
    ids = torch.tensor(tokenizer(val_text, add_special_tokens=False, verbose=False).input_ids)
    batches = windows(ids, context, tokenizer.bos_token_id)
    covered = batches[:, 1:].reshape(-1)
    return batches, len(tokenizer.decode(covered.tolist()))


@torch.no_grad()
def forward_all(model, batches: torch.Tensor, batch_size: int = 16):
    """Summed next-token loss, and per layer the router logits [N, T-1, E] of the text positions."""
    nll = 0.0
    logits_per_layer: list[list[torch.Tensor]] = [[] for _ in range(model.config.num_hidden_layers)]
    for chunk in batches.split(batch_size):
        out = model(input_ids=chunk, output_router_logits=True)
        logits = out.logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
        ).item()
        for layer, router_logits in enumerate(out.router_logits):  # [B*T, E]
            per_window = router_logits.view(len(chunk), chunk.shape[1], -1)[:, 1:]  # drop BOS
            logits_per_layer[layer].append(per_window.float())
    return nll, [torch.cat(parts) for parts in logits_per_layer]


def quantized_figures(model_dir: Path, batches: torch.Tensor, chars: int, bits: int, num_experts: int) -> dict:
    """Validation figures with HQQ-quantized experts, through the offloaded engine (moe_runtime.load).

    Attention stays unquantized, so the figure isolates what expert quantization costs. Every expert
    stays resident (cache_size = E), since only accuracy is measured here.
    """
    import tempfile

    from moe_runtime import OffloadConfig
    from moe_runtime import load as load_engine

    with tempfile.TemporaryDirectory() as store:
        engine = load_engine(model_dir, OffloadConfig(device="cpu", offload="ram", cache_size=num_experts, prefetch=0,
                                                      expert_bits=bits, store_dir=store, record_trace=False))
        try:
            nll, _ = forward_all(engine.model, batches)
            config = engine.config
            expert_bytes = engine.describe()["expert_bytes"]
        finally:
            engine.close()
    tokens = batches[:, 1:].numel()
    return {
        "expert_bits": bits, "group_size": config.expert_group, "meta_quantized": config.quantize_meta,
        "expert_bytes": expert_bytes,
        "val_loss": round(nll / tokens, 4), "perplexity": round(math.exp(nll / tokens), 2),
        "bits_per_char": round(nll / math.log(2) / chars, 4),
    }


def shared_fraction(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per token, the fraction of a's K experts that are also in b (both [..., K])."""
    return (a[..., :, None] == b[..., None, :]).any(-1).float().mean(-1)


def routing_stats(router_logits: torch.Tensor, top_k: int) -> dict:
    """Usage, entropies and temporal locality of one layer's routing ([N, T, E] router logits)."""
    num_experts = router_logits.shape[-1]
    probs = router_logits.softmax(-1)
    selected = probs.topk(top_k, dim=-1).indices  # [N, T, K]
    usage = torch.bincount(selected.reshape(-1), minlength=num_experts).float()
    usage /= usage.sum()
    bits = lambda p: -(p * p.clamp_min(1e-12).log2()).sum(-1)  # noqa: E731
    shared = shared_fraction(selected[:, 1:], selected[:, :-1])  # [N, T-1]
    shuffled = shared_fraction(selected, selected.roll(1, dims=0))  # same position, other window
    return {
        "usage": [round(u, 4) for u in usage.tolist()],
        "usage_entropy_bits": round(bits(usage).item(), 4),
        "router_entropy_bits": round(bits(probs).mean().item(), 4),
        "shared_with_previous": round(shared.mean().item(), 4),
        "any_shared_with_previous": round((shared > 0).float().mean().item(), 4),
        "all_shared_with_previous": round((shared == 1).float().mean().item(), 4),
        "shared_shuffled": round(shuffled.mean().item(), 4),
    }


def sample(model, tokenizer, seed: int, max_new_tokens: int = 60) -> list[dict]:
    """Seeded samples (temperature 0.8, top-k 40) for the prompts and the chat example."""
    prompts = [(p, tokenizer(p, return_tensors="pt").input_ids) for p in SAMPLE_PROMPTS]
    chat = tokenizer.apply_chat_template(SAMPLE_CHAT, add_generation_prompt=True, tokenize=False)
    prompts.append((chat, tokenizer(chat, add_special_tokens=False, return_tensors="pt").input_ids))
    results = []
    for i, (text, ids) in enumerate(prompts):
        # plain continuations run on over several speeches; the chat reply stops at its turn's end
        is_chat = i == len(prompts) - 1
        stop = model.generation_config.eos_token_id if is_chat else tokenizer.eos_token_id
        torch.manual_seed(seed)
        out = model.generate(ids, do_sample=True, temperature=0.8, top_k=40, max_new_tokens=max_new_tokens,
                             eos_token_id=stop)
        completion = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        results.append({"prompt": text.removeprefix(tokenizer.bos_token), "completion": completion})
    return results


def evaluate(model_dir: Path, data: Path, max_windows: int | None, samples: bool, seed: int,
             expert_bits: tuple[int, ...] = ()) -> dict:
    """All figures of the model card, as plain Python values."""
    model, tokenizer = load(model_dir)
    config = model.config
    batches, chars = validation_windows(tokenizer, data, config.max_position_embeddings)
    if max_windows is not None:
        batches = batches[:max_windows]
        chars = len(tokenizer.decode(batches[:, 1:].reshape(-1).tolist()))
    nll, router_logits = forward_all(model, batches)
    tokens = batches[:, 1:].numel()
    result = {
        "model": str(model_dir),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": config.vocab_size,
        "windows": len(batches), "context": batches.shape[1], "tokens": tokens, "characters": chars,
        "val_loss": round(nll / tokens, 4),
        "perplexity": round(math.exp(nll / tokens), 2),
        "bits_per_char": round(nll / math.log(2) / chars, 4),
        "chance_loss": round(math.log(config.vocab_size), 4),
        "num_experts": config.num_local_experts, "top_k": config.num_experts_per_tok,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "uniform_entropy_bits": round(math.log2(config.num_local_experts), 4),
        "random_shared_with_previous": round(config.num_experts_per_tok / config.num_local_experts, 4),
        "layers": [routing_stats(r, config.num_experts_per_tok) for r in router_logits],
    }
    if samples:
        result["samples"] = sample(model, tokenizer, seed)
    result["quantized"] = [quantized_figures(model_dir, batches, chars, bits, config.num_local_experts)
                           for bits in expert_bits]
    return result


def to_markdown(r: dict, command: str) -> str:
    lines = [
        f"Measured with `{command}` on {r['windows']} held-out windows of {r['context']} tokens "
        f"({r['tokens']} predicted tokens, {r['characters']} characters).",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| parameters | {r['parameters']:,} |",
        f"| validation loss (nats/token) | {r['val_loss']:.3f} (chance: ln {r['vocab_size']} = {r['chance_loss']:.3f}) |",
        f"| perplexity (per token) | {r['perplexity']:.1f} |",
        f"| bits per character | {r['bits_per_char']:.3f} |",
        "",
        f"Routing per layer ({r['num_experts']} experts, top-{r['top_k']}; uniform entropy "
        f"log2 {r['num_experts']} = {r['uniform_entropy_bits']:.0f} bits; random routing shares "
        f"{r['random_shared_with_previous']:.2f} of a token's experts with the previous token):",
        "",
        "| layer | expert usage % (e0 … e7) | usage entropy (bits) | router entropy (bits) "
        "| shared with previous token | ≥1 shared | both shared | shuffled baseline |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, layer in enumerate(r["layers"]):
        usage = " ".join(f"{100 * u:.1f}" for u in layer["usage"])
        lines.append(
            f"| {i} | {usage} | {layer['usage_entropy_bits']:.3f} | {layer['router_entropy_bits']:.3f} "
            f"| {layer['shared_with_previous']:.3f} | {layer['any_shared_with_previous']:.3f} "
            f"| {layer['all_shared_with_previous']:.3f} | {layer['shared_shuffled']:.3f} |"
        )
    if r.get("quantized"):
        fp32_bytes = 3 * 4 * r["hidden_size"] * r["intermediate_size"]
        lines += [
            "",
            "With HQQ-quantized experts (attention unquantized), through `moe_runtime.load`:",
            "",
            "| experts | group | bytes per expert | validation loss | perplexity | bits per character |",
            "| --- | --- | --- | --- | --- | --- |",
            f"| fp32 (as shipped) | – | {fp32_bytes:,} | {r['val_loss']:.3f} | {r['perplexity']:.1f} "
            f"| {r['bits_per_char']:.3f} |",
        ]
        for q in r["quantized"]:
            lines.append(
                f"| {q['expert_bits']}-bit | {q['group_size']} | {q['expert_bytes']:,} | {q['val_loss']:.3f} "
                f"| {q['perplexity']:.1f} | {q['bits_per_char']:.3f} |"
            )
    for s in r.get("samples", []):
        lines += ["", "```text", s["prompt"] + s["completion"], "```"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=OUT_DIR, help="model folder (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=DATA_PATH, help="corpus (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON to this path")
    parser.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    parser.add_argument("--no-samples", action="store_true", help="skip the sampled continuations")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    parser.add_argument("--expert-bits", default="", help="also measure with HQQ experts at these bits, "
                        "comma-separated from 2, 3, 4, 8 (e.g. 4,3,2)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    ns = parser.parse_args(argv)
    if ns.max_windows is not None and ns.max_windows < 1:
        parser.error(f"--max-windows={ns.max_windows} is not allowed: use 1 or more")
    try:
        bits = tuple(int(b) for b in ns.expert_bits.split(",") if b.strip())
    except ValueError:
        parser.error(f"--expert-bits={ns.expert_bits!r} is not allowed: use comma-separated bits from 2, 3, 4, 8")
    if any(b not in (2, 3, 4, 8) for b in bits):
        parser.error(f"--expert-bits={ns.expert_bits!r} is not allowed: use comma-separated bits from 2, 3, 4, 8")
    torch.set_num_threads(ns.threads)
    result = evaluate(ns.model, ns.data, ns.max_windows, not ns.no_samples, ns.seed, bits)
    command = "python -m tools.evaluate_tiny" + (f" --model {ns.model}" if ns.model != OUT_DIR else "")
    command += f" --expert-bits {ns.expert_bits}" if bits else ""
    print(to_markdown(result, command))
    if ns.json:
        ns.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
