"""The reward/value model (the GPT backbone plus a scalar head) and a Trainer with a pluggable loss.

`ScalarHeadGPT` keeps the GPT under the submodule name "gpt", so an SFT checkpoint's parameters drop
into it unchanged: {"gpt": sft_params, "head": {"kernel", "bias"}}. `AlignTrainer` is the spine's
`Trainer` (sharded state, jitted and donated step, gradient accumulation) with the loss supplied by
the stage; its batches are dicts of arrays, split over their first axis.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
import optax

from gpt_jax.model import DTYPES, GPT, GPTConfig
from gpt_jax.train_step import LossFn, Trainer


class ScalarHead(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, hidden):
        pdtype = DTYPES[self.cfg.param_dtype]
        init = nn.initializers.normal(stddev=1.0 / math.sqrt(self.cfg.n_embd + 1))
        kernel = self.param("kernel", nn.with_logical_partitioning(init, ("embed",)), (self.cfg.n_embd,), pdtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ()), (), pdtype)
        return hidden.astype(jnp.float32) @ kernel + bias  # [batch, seq] in float32


class ScalarHeadGPT(nn.Module):
    """tokens [batch, seq] -> a scalar per position [batch, seq]. The reward model reads it at the
    final token; the PPO value function reads it at every position (the state before each token)."""
    cfg: GPTConfig

    @nn.compact
    def __call__(self, tokens, deterministic: bool = True):
        _, hidden = GPT(self.cfg, name="gpt")(tokens, deterministic, return_hidden=True)
        return ScalarHead(self.cfg, name="head")(hidden)


class AlignTrainer(Trainer):
    """The spine's Trainer with a stage's loss: (trainer, params, batch dict, dropout key) -> (loss, aux)."""

    def __init__(self, model, tx: optax.GradientTransformation, mesh, rules, loss_fn: LossFn, *, grad_accum: int = 1):
        super().__init__(model, tx, mesh, rules, grad_accum=grad_accum, loss_fn=loss_fn)
