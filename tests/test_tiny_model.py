"""The embedded default model (assets/tiny-mixtral) loads offline with plain transformers and is a
real language model; its training command runs end to end on a baby config."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import pytest
import torch
from safetensors import safe_open

from moe_runtime.paths import EMBEDDED_MODEL_DIR, TRAINING_TEXT
from tools import train_tiny
from tools.evaluate_tiny import validation_windows

MODEL_DIR = EMBEDDED_MODEL_DIR
DATA = TRAINING_TEXT
# Measured by `python -m tools.evaluate_tiny --max-windows 4 --no-samples`: 4.03 nats/token
# on these windows (chance: ln 4096 = 8.32). The margin is for retrained models (another seed or
# thread count), not for kernel noise, which is ~1e-6.
VAL_LOSS_MAX = 4.5
EVAL_WINDOWS = 4


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True, dtype=torch.float32).eval()


def test_loads_offline_as_a_small_mixtral(model):
    config = model.config
    assert type(model).__name__ == "MixtralForCausalLM"
    assert (config.num_local_experts, config.num_experts_per_tok) == (8, 2)
    assert config.num_hidden_layers >= 4 and config.max_position_embeddings >= 256
    assert 2_000 <= config.vocab_size <= 8_000
    assert 5e6 <= sum(p.numel() for p in model.parameters()) <= 15e6


def test_folder_fits_the_size_budget():
    assert sum(f.stat().st_size for f in MODEL_DIR.iterdir()) <= 40 * 2**20


def test_checkpoint_uses_the_original_per_expert_layout(model):
    config = model.config
    hidden, inter = config.hidden_size, config.intermediate_size
    with safe_open(MODEL_DIR / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    assert not [k for k in keys if ".mlp." in k], "fused transformers-5 keys leaked into the checkpoint"
    for layer in range(config.num_hidden_layers):
        moe = f"model.layers.{layer}.block_sparse_moe"
        assert shapes[f"{moe}.gate.weight"] == (config.num_local_experts, hidden)
        for e in range(config.num_local_experts):
            assert shapes[f"{moe}.experts.{e}.w1.weight"] == (inter, hidden)
            assert shapes[f"{moe}.experts.{e}.w3.weight"] == (inter, hidden)
            assert shapes[f"{moe}.experts.{e}.w2.weight"] == (hidden, inter)


def test_chat_template_makes_play_script_turns(tokenizer):
    chat = [{"role": "system", "content": "A hall."}, {"role": "user", "content": "Who is there?"}]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text == "<s>A hall.\n\nUSER:\nWho is there?\n\nASSISTANT:\n"
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, Mapping) else ids
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text.removeprefix("<s>")
    # A turn (and a speech in the corpus) ends with one token, so a chat UI can stop on it.
    assert len(tokenizer(train_tiny.TURN_END, add_special_tokens=False).input_ids) == 1


def test_validation_loss_is_far_better_than_chance(model, tokenizer):
    batches, _ = validation_windows(tokenizer, DATA, model.config.max_position_embeddings)
    loss = train_tiny.mean_loss(model, batches[:EVAL_WINDOWS])
    assert loss < VAL_LOSS_MAX < 0.65 * math.log(model.config.vocab_size)


def test_greedy_generation_is_deterministic(model, tokenizer):
    ids = tokenizer("ROMEO:\n", return_tensors="pt").input_ids
    runs = [model.generate(ids, do_sample=False, max_new_tokens=24) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert len(set(runs[0][0, ids.shape[1] :].tolist())) > 3, "greedy output is a single repeated token"


def test_validation_split_is_the_last_tenth_from_a_speech_boundary():
    text = DATA.read_text(encoding="utf-8")
    train, val = train_tiny.split_text(text)
    assert train + val == text and train.endswith("\n\n")
    assert 0.09 < len(val) / len(text) <= 0.1


def test_quick_training_runs_are_reloadable_and_deterministic(tmp_path):
    # --quick: baby config, 3 steps; train() itself re-loads each folder and compares logits.
    for name in ("a", "b"):
        train_tiny.main(["--quick", "--seed", "1", "--out", str(tmp_path / name), "--data", str(DATA)])
    names = {p.name for p in (tmp_path / "a").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    for name in ("model.safetensors", "tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_evaluate_command_prints_the_cards_figures_including_quantized(capsys, tmp_path):
    from tools import evaluate_tiny

    evaluate_tiny.main(["--max-windows", "2", "--no-samples", "--expert-bits", "4", "--json", str(tmp_path / "e.json")])
    out = capsys.readouterr().out
    assert "| validation loss (nats/token) |" in out and "| 4-bit | 64 |" in out
    result = json.loads((tmp_path / "e.json").read_text())
    quantized = result["quantized"][0]
    assert quantized["expert_bits"] == 4 and quantized["expert_bytes"] < 0.2 * 3 * 4 * 256 * 256
    assert abs(quantized["val_loss"] - result["val_loss"]) < 0.1  # 4-bit experts barely move the loss
