"""Sampling for rollouts, rankings and evaluation: the project's cached sampler
(`gpt_jax.generate.generate`), plus a helper that runs a long list of prompts in fixed-size chunks."""

from __future__ import annotations

import jax
import numpy as np

from gpt_jax.generate import generate
from gpt_jax.model import GPTConfig

__all__ = ["generate", "generate_batched"]


def generate_batched(model_cfg: GPTConfig, params, prompts: list[list[int]], *, batch_size: int, key,
                     **kwargs) -> list[np.ndarray]:
    """generate() over chunks of batch_size prompts (the last padded by repeating its last prompt),
    so any number of prompts compiles once. Returns each prompt's generated tokens, cut at its length
    (the stop token included when one was produced)."""
    out = []
    for c, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[start:start + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        res = generate(model_cfg, params, padded, key=jax.random.fold_in(key, c), **kwargs)
        out += [np.asarray(res.tokens[i, :res.lengths[i]]) for i in range(len(chunk))]
    return out
