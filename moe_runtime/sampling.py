"""Sampling from a reply's own random generator, never the process-wide one.

transformers' `generate` draws sampled tokens with `torch.multinomial` on the process-wide RNG, so a
request that sets a seed would set every later request's randomness too (and two replies in turn
would share one stream). `OwnGeneratorSampler` is the last logits processor of a reply: it warps the
scores as transformers does when sampling (temperature, then top-p), draws the token from the
reply's own `torch.Generator`, and leaves only that token possible; `generate` then runs greedy and
takes it. The draw is the one transformers' sampling makes with a generator in the same state
(the tests check it token for token), and the global RNG is never touched.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

MAX_SEED = 2**63 - 1  # a torch generator's seed is a 64-bit integer; requests give 0..MAX_SEED


def own_generator(device: torch.device | str, seed: int | None) -> torch.Generator:
    """A generator of its own for one reply: seeded with `seed`, or from the OS's entropy."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


class OwnGeneratorSampler(LogitsProcessor):
    """scores [B, V] -> scores where only the drawn token of each row is finite (0), the rest -inf."""

    def __init__(self, temperature: float, top_p: float, generator: torch.Generator) -> None:
        self.warpers = LogitsProcessorList([TemperatureLogitsWarper(float(temperature))])
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(float(top_p)))
        self.generator = generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        warped = self.warpers(input_ids, scores)
        probs = torch.softmax(warped.float(), dim=-1)  # [B, V]
        drawn = torch.multinomial(probs, num_samples=1, generator=self.generator)  # [B, 1]
        return torch.full_like(scores, -float("inf")).scatter_(1, drawn, 0.0)
