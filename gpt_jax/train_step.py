"""The train state, its sharded initialization, and the jitted train and eval steps.

The step is a pure function of (state, batch, dropout key): jitted once with explicit in/out
shardings and the state donated, so parameters and optimizer moments are updated in place.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from gpt_jax import sharding as shd
from gpt_jax.model import GPT


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def cross_entropy(logits, targets):
    """Mean next-token loss, computed in float32 whatever the compute dtype."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


class Trainer:
    """Builds the sharded state and the compiled steps for one model, optimizer and mesh."""

    def __init__(self, model: GPT, tx: optax.GradientTransformation, mesh, rules, *, grad_accum: int = 1):
        self.model, self.tx, self.mesh, self.rules = model, tx, mesh, tuple(tuple(r) for r in rules)
        self.grad_accum = grad_accum
        self.dropout = model.cfg.dropout > 0
        self.abstract_state, self.state_sharding = self._abstract_state()
        self.batch_sharding = shd.batch_sharding(mesh)
        self.train_step = jax.jit(self._train_step, in_shardings=(self.state_sharding, self.batch_sharding, None),
                                  out_shardings=(self.state_sharding, None), donate_argnums=0)
        self.eval_step = jax.jit(self._eval_step, in_shardings=(self.state_sharding.params, self.batch_sharding),
                                 out_shardings=None)

    # Model calls must see the mesh and the rules so logical constraints become sharding constraints.
    @contextlib.contextmanager
    def _context(self):
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh), nn.logical_axis_rules(self.rules):
            yield

    def _init_boxed(self, key):
        dummy = jnp.zeros((1, self.model.cfg.block_size), jnp.int32)
        params = self.model.init(key, dummy)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(nn.unbox(params)))

    def _abstract_state(self):
        with self._context():
            boxed = jax.eval_shape(self._init_boxed, jax.random.key(0))
        sharding = shd.logical_shardings(boxed, self.mesh, self.rules)
        abstract = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), sharding)
        return abstract, sharding

    def init_state(self, key) -> TrainState:
        """Initialize directly into the sharded layout: no device holds the whole model first."""
        def init(k):
            return nn.unbox(self._init_boxed(k))
        with self._context():
            return jax.jit(init, out_shardings=self.state_sharding)(key)

    def apply(self, params, tokens, *, dropout_key=None):
        rngs = {"dropout": dropout_key} if dropout_key is not None else {}
        return self.model.apply({"params": params}, tokens, deterministic=dropout_key is None, rngs=rngs)

    def _loss(self, params, batch, dropout_key):
        logits = self.apply(params, batch[:, :-1], dropout_key=dropout_key if self.dropout else None)
        return cross_entropy(logits, batch[:, 1:])

    def _train_step(self, state: TrainState, batch, dropout_key):
        with self._context():
            grad_fn = jax.value_and_grad(self._loss)
            if self.grad_accum == 1:
                loss, grads = grad_fn(state.params, batch, dropout_key)
            else:
                micro = batch.reshape(self.grad_accum, -1, batch.shape[-1])
                keys = jax.random.split(dropout_key, self.grad_accum)

                def accumulate(carry, xs):
                    loss_sum, grad_sum = carry
                    loss, grads = grad_fn(state.params, *xs)
                    return (loss_sum + loss, jax.tree_util.tree_map(jnp.add, grad_sum, grads)), None

                zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
                (loss, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), (micro, keys))
                loss, grads = loss / self.grad_accum, jax.tree_util.tree_map(lambda g: g / self.grad_accum, grads)
            updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def _eval_step(self, params, batch):
        with self._context():
            return self._loss(params, batch, None)

    def loss_and_grads(self, params, batch):
        """Loss and gradients without dropout (for tests and tools), jitted with the state's shardings."""
        fn = jax.jit(jax.value_and_grad(functools.partial(self._loss, dropout_key=None)),
                     in_shardings=(self.state_sharding.params, self.batch_sharding))
        with self._context():
            return fn(params, batch)

