"""The reward/value model (the GPT backbone plus a scalar head) and a Trainer with a pluggable loss.

`ScalarHeadGPT` keeps the GPT under the submodule name "gpt", so an SFT checkpoint's parameters drop
into it unchanged: {"gpt": sft_params, "head": {"kernel", "bias"}}. `AlignTrainer` is the spine's
`Trainer` (sharded state, jitted and donated step, gradient accumulation) with the loss supplied by
the stage and the batch a dict of arrays sharded over their first axis.
"""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from gpt_jax import sharding as shd
from gpt_jax.model import DTYPES, GPT, GPTConfig
from gpt_jax.train_step import Trainer, TrainState


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


# A stage's loss: (trainer, params, batch, dropout_key or None) -> (loss, {metric: scalar}).
LossFn = Callable[..., tuple]


class AlignTrainer(Trainer):
    def __init__(self, model, tx: optax.GradientTransformation, mesh, rules, loss_fn: LossFn, *, grad_accum: int = 1):
        self.loss_fn = loss_fn
        super().__init__(model, tx, mesh, rules, grad_accum=grad_accum)
        # Every leaf of a batch dict is split over (data, fsdp) along its first axis, whatever its rank.
        self.batch_sharding = NamedSharding(mesh, P(shd.BATCH_AXES))
        self.train_step = jax.jit(self._train_step, in_shardings=(self.state_sharding, self.batch_sharding, None),
                                  out_shardings=(self.state_sharding, None), donate_argnums=0)
        self.eval_step = jax.jit(self._eval_step, in_shardings=(self.state_sharding.params, self.batch_sharding))

    def _loss(self, params, batch, dropout_key):
        return self.loss_fn(self, params, batch, dropout_key if self.dropout else None)

    def _train_step(self, state: TrainState, batch, dropout_key):
        with self._context():
            grad_fn = jax.value_and_grad(self._loss, has_aux=True)
            if self.grad_accum == 1:
                (loss, aux), grads = grad_fn(state.params, batch, dropout_key)
            else:
                micro = jax.tree_util.tree_map(lambda x: x.reshape(self.grad_accum, -1, *x.shape[1:]), batch)
                keys = jax.random.split(dropout_key, self.grad_accum)

                def accumulate(carry, xs):
                    (loss, aux), grads = grad_fn(state.params, *xs)
                    return jax.tree_util.tree_map(jnp.add, carry, (loss, aux, grads)), None

                first = jax.tree_util.tree_map(lambda x: x[0], (micro, keys))
                (loss_s, aux_s), grad_s = jax.eval_shape(grad_fn, state.params, *first)
                zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), (loss_s, aux_s, grad_s))
                (loss, aux, grads), _ = jax.lax.scan(accumulate, zeros, (micro, keys))
                loss, aux, grads = jax.tree_util.tree_map(lambda x: x / self.grad_accum, (loss, aux, grads))
            updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def _eval_step(self, params, batch):
        with self._context():
            loss, aux = self._loss(params, batch, None)
        return {"loss": loss, **aux}

    def state_from_params(self, params) -> TrainState:
        """A fresh train state (step 0, new optimizer moments) around a copy of parameters from
        another stage (a copy: the train step donates its state, and the caller may keep the
        originals, e.g. as PPO's frozen reference)."""
        def make(p):
            p = jax.tree_util.tree_map(jnp.copy, p)
            return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=self.tx.init(p))
        return jax.jit(make, in_shardings=(self.state_sharding.params,), out_shardings=self.state_sharding)(params)

    def jit_forward(self, fn):
        """jit `fn(trainer, params, batch) -> outputs` with this trainer's shardings and rules (for
        inference passes: rollout log-probabilities, values, reward scores)."""
        def wrapped(params, batch):
            with self._context():
                return fn(self, params, batch)
        return jax.jit(wrapped, in_shardings=(self.state_sharding.params, self.batch_sharding))
