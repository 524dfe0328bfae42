"""Per-request randomness: every reply samples from its own torch.Generator (moe_runtime.sampling).
The draw is transformers' own sampling with a generator in the same state (token for token), a
seeded request is reproducible wherever it runs, and no request changes another's output or the
process-wide RNG."""

from __future__ import annotations

import pytest
import torch

from moe_runtime import GenerationSettings
from moe_runtime.sampling import MAX_SEED

PROMPT = [{"role": "user", "content": "To be, or not to be"}]


def reply(service, seed=None, tokens=16, temperature=1.0, top_p=1.0) -> str:
    updates = list(service.chat(PROMPT, GenerationSettings(tokens, temperature, top_p, seed=seed)))
    return updates[-1].text


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9), (1.5, 0.5)])
def test_a_seeded_reply_is_transformers_sampling_with_that_seed(service, temperature, top_p):
    engine = service.engine
    ids = engine.chat_prompt(PROMPT)
    torch.manual_seed(1234)  # transformers samples from the process-wide generator
    with torch.inference_mode():
        out = engine.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=True,
                                    temperature=temperature, top_p=top_p, top_k=0,
                                    pad_token_id=engine.tokenizer.eos_token_id)
    expected = engine.tokenizer.decode(out[0, ids.shape[-1]:], skip_special_tokens=True)
    assert reply(service, seed=1234, tokens=12, temperature=temperature, top_p=top_p) == expected


def test_a_seeded_request_between_two_unseeded_ones_changes_neither(service):
    alone = reply(service, seed=1234)
    state = torch.get_rng_state()
    first, seeded, second = reply(service), reply(service, seed=1234), reply(service)
    assert seeded == alone  # the same seed gives the same reply, whatever ran before
    assert torch.equal(torch.get_rng_state(), state)  # no request touched the process-wide RNG
    # the seed does not carry over: before the fix, every reply after seed=1234 was the same one
    after = [reply(service) for _ in range(2)]
    assert len({second, *after}) == 3, (first, second, after)


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True, "7"])
def test_seeds_outside_the_range_are_refused(seed):
    with pytest.raises(ValueError, match=r"seed=.* is not allowed: use an integer in 0..2\*\*63-1"):
        GenerationSettings(seed=seed).validate()
    GenerationSettings(seed=MAX_SEED).validate()
