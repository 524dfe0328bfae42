"""Train the embedded default model: a tiny Mixtral on Tiny Shakespeare, CPU only.

    python -m tools.train_tiny                      # full run into assets/tiny-mixtral
    python -m tools.train_tiny --quick --out /tmp/t  # seconds-long smoke run (baby config)

Pipeline: split the text (last 10% held out) → train a byte-level BPE tokenizer on the train part →
train `MixtralForCausalLM` on random windows (BOS + context-1 tokens) with the router
load-balancing loss on → save with `save_pretrained` (the hub's key layout) → reload with transformers
and check the logits are identical. Deterministic given --seed (fixed thread count, seeded sampler).

Dimension names: E experts, I expert intermediate size, H hidden size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm

from moe_runtime.paths import EMBEDDED_MODEL_DIR, TRAINING_TEXT

DATA_PATH = TRAINING_TEXT
OUT_DIR = EMBEDDED_MODEL_DIR
VAL_FRACTION = 0.1
BOS, EOS, UNK = "<s>", "</s>", "<unk>"
# End of a speech in the corpus (and of a chat turn): one token, so a chat UI can stop on it.
TURN_END = "\n\n"
# GPT-2-like pre-tokenization, except that runs of newlines stay together: "\n\n" (end of a
# speech) then becomes a single token the model learns to emit.
PRETOKENIZE_PATTERN = r"'(?:s|t|re|ve|m|ll|d)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\n+|[^\S\n]+"

# Play-script turns in the corpus' own format ("NAME:\nspeech\n\n"); the system message is an
# opening paragraph without a speaker.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ message['content'] | trim }}{{ '\\n\\n' }}"
    "{%- elif message['role'] == 'user' %}{{ 'USER:\\n' }}{{ message['content'] | trim }}{{ '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{ 'ASSISTANT:\\n' }}{{ message['content'] | trim }}{{ '\\n\\n' }}"
    "{%- else %}{{ raise_exception('roles are system, user and assistant, not ' + message['role']) }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ 'ASSISTANT:\\n' }}{%- endif %}"
)


@dataclass
class TrainArgs:
    """Everything that determines the shipped model (written to training.json beside it)."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    num_experts: int = 8
    top_k: int = 2
    context: int = 256
    router_aux_loss_coef: float = 0.01
    steps: int = 600
    batch_size: int = 16
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_windows: int = 32
    seed: int = 0


QUICK = dict(vocab_size=512, hidden_size=64, intermediate_size=64, num_heads=2, num_kv_heads=1,
             steps=3, batch_size=2, warmup=1, eval_every=2, eval_windows=2)


def split_text(text: str) -> tuple[str, str]:
    """Train / validation split: the last 10% of the text, starting at a speech boundary."""
    cut = text.find(TURN_END, int(len(text) * (1 - VAL_FRACTION))) + len(TURN_END)
    return text[:cut], text[cut:]


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[UNK, BOS, EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([text], trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def windows(ids: torch.Tensor, context: int, bos_id: int) -> torch.Tensor:
    """Non-overlapping evaluation windows [N, context]: BOS then context-1 text tokens."""
    n = (len(ids) // (context - 1)) * (context - 1)
    body = ids[:n].view(-1, context - 1)
    return torch.cat([torch.full((len(body), 1), bos_id), body], dim=1)


def mixtral_config(args: TrainArgs, tokenizer: Tokenizer):
    from transformers import MixtralConfig

    config = MixtralConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size, num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads, num_key_value_heads=args.num_kv_heads,
        num_local_experts=args.num_experts, num_experts_per_tok=args.top_k,
        max_position_embeddings=args.context, output_router_logits=True,
        router_aux_loss_coef=args.router_aux_loss_coef, tie_word_embeddings=False,
        bos_token_id=tokenizer.token_to_id(BOS), eos_token_id=tokenizer.token_to_id(EOS),
    )
    # Measured on 2 CPU cores (H=256, batch 16x256): sdpa attention + the eager per-expert loop
    # ~1.0 s/step, grouped_mm experts ~1.05, batched_mm ~1.6, eager attention ~1.3.
    config._attn_implementation = "sdpa"
    config._experts_implementation = "eager"
    return config


def lr_at(step: int, args: TrainArgs) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)


def sample_batch(ids: torch.Tensor, args: TrainArgs, bos_id: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(ids) - args.context, (args.batch_size,), generator=gen)
    body = torch.stack([ids[s : s + args.context - 1] for s in starts.tolist()])
    return torch.cat([torch.full((args.batch_size, 1), bos_id), body], dim=1)  # [B, context]


@torch.no_grad()
def mean_loss(model, batches: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats/token, without the aux loss) over [N, context] windows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in batches.split(batch_size):
        logits = model(input_ids=chunk, output_router_logits=False).logits[:, :-1]
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), chunk[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += chunk[:, 1:].numel()
    model.train(was_training)
    return total / count


def save_model(model, tokenizer: Tokenizer, out: Path, context: int) -> None:
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    # Off in the shipped config: with it on, every generate() step computes the aux loss, and
    # transformers' aux loss rejects an attention mask longer than the decoded token.
    config.output_router_logits = False
    model.save_pretrained(out)  # the hub's key layout (per-expert w1/w2/w3), as transformers writes it
    config.output_router_logits = True
    bos_id, eos_id = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    # A speech ends with a blank line: generation stops there too, so a chat reply is one speech.
    turn_end = tokenizer.encode(TURN_END, add_special_tokens=False).ids
    if len(turn_end) != 1:
        raise RuntimeError(f"the tokenizer splits the turn end {TURN_END!r} into {turn_end}")
    GenerationConfig(bos_token_id=bos_id, eos_token_id=[eos_id, turn_end[0]], pad_token_id=eos_id).save_pretrained(out)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=EOS,
        model_max_length=context, chat_template=CHAT_TEMPLATE,
    ).save_pretrained(out, save_jinja_files=False)  # the template inside tokenizer_config.json
    # The generic class name, so transformers 4.x (which lacks "TokenizersBackend") loads it too.
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def check_reload(model, out: Path, probe: torch.Tensor) -> None:
    """The saved folder must re-load with plain transformers to bit-identical logits.

    Same kernels as in training: transformers' default experts kernel on CPU (grouped_mm) sums in
    another order and differs by ~1e-7, which would hide nothing but make "identical" untestable.
    """
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(
        out, local_files_only=True, dtype=torch.float32,
        attn_implementation=model.config._attn_implementation, experts_implementation="eager",
    )
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=probe, output_router_logits=False).logits
        actual = reloaded(input_ids=probe).logits
    if not torch.equal(expected, actual):
        diff = (expected - actual).abs().max().item()
        raise RuntimeError(f"re-loaded checkpoint in {out} differs from the trained model (max |diff| {diff})")


def train(args: TrainArgs, data: Path, out: Path, threads: int) -> dict:
    """Train, save into `out`, verify the reload; returns the metrics written to training.json."""
    from transformers import MixtralForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    train_text, val_text = split_text(data.read_text(encoding="utf-8"))
    tokenizer = train_tokenizer(train_text, args.vocab_size)
    bos_id = tokenizer.token_to_id(BOS)
    train_ids = torch.tensor(tokenizer.encode(train_text, add_special_tokens=False).ids)
    val_ids = torch.tensor(tokenizer.encode(val_text, add_special_tokens=False).ids)
    val_batches = windows(val_ids, args.context, bos_id)[: args.eval_windows]

    model = MixtralForCausalLM(mixtral_config(args, tokenizer))
    params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(args.seed)
    history = []
    tqdm.write(f"{params / 1e6:.2f} M parameters, {len(train_ids)} train / {len(val_ids)} val tokens")
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="train", unit="step")
    model.train()
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        batch = sample_batch(train_ids, args, bos_id, gen)
        output = model(input_ids=batch, labels=batch, output_router_logits=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ce = output.loss.item() - args.router_aux_loss_coef * output.aux_loss.item()
        bar.set_postfix(loss=f"{ce:.3f}", aux=f"{output.aux_loss.item():.3f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val = mean_loss(model, val_batches)
            history.append({"step": step + 1, "train_loss": round(ce, 4), "val_loss": round(val, 4)})
            tqdm.write(f"step {step + 1}: train {ce:.3f}  val {val:.3f}  ({time.perf_counter() - start:.0f} s)")
    train_seconds = time.perf_counter() - start

    save_model(model, tokenizer, out, args.context)
    check_reload(model, out, val_batches[:1])
    metrics = {
        "args": asdict(args), "parameters": params, "train_seconds": round(train_seconds, 1),
        "threads": threads, "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "history": history,
        "val_loss_eval_windows": history[-1]["val_loss"],
    }
    (out / "training.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA_PATH, help="training text (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--steps", type=int, help=f"optimizer steps (default: {TrainArgs.steps})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="baby config and 3 steps: a smoke test")
    ns = parser.parse_args(argv)
    args = TrainArgs(seed=ns.seed, **(QUICK if ns.quick else {}))
    if ns.steps is not None:
        if ns.steps < 1:
            parser.error(f"--steps={ns.steps} is not allowed: use 1 or more")
        args.steps = ns.steps
    metrics = train(args, ns.data, ns.out, ns.threads)
    history = metrics["history"][-1]
    print(f"saved {ns.out}: {metrics['parameters'] / 1e6:.2f} M parameters, "
          f"{metrics['train_seconds']:.0f} s, val loss {history['val_loss']:.3f} (re-load checked)")


if __name__ == "__main__":
    main()
