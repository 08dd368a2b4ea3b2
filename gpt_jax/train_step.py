"""The train state, its sharded initialization, and the jitted train and eval steps.

The step is a pure function of (state, batch, dropout key): jitted once with explicit in/out
shardings and the state donated, so parameters and optimizer moments are updated in place.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from gpt_jax import sharding as shd


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def cross_entropy(logits, targets):
    """Mean next-token loss, computed in float32 whatever the compute dtype."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


def language_model_loss(trainer: "Trainer", params, batch, dropout_key):
    """The pretraining loss: batch [batch, seq + 1] tokens, each position predicting the next."""
    logits = trainer.apply(params, batch[:, :-1], dropout_key=dropout_key)
    return cross_entropy(logits, batch[:, 1:]), {}


# A loss: (trainer, params, batch, dropout key or None) -> (scalar loss, {metric name: scalar}).
LossFn = Callable[..., tuple]


class Trainer:
    """Builds the sharded state and the compiled steps for one model, optimizer, mesh and loss.

    A batch is an array or a dict of arrays; every leaf is split over (data, fsdp) along its first
    axis. The alignment stages use the same class with their own `loss_fn`.
    """

    def __init__(self, model, tx: optax.GradientTransformation, mesh, rules, *, grad_accum: int = 1,
                 loss_fn: LossFn = language_model_loss):
        self.model, self.tx, self.mesh, self.rules = model, tx, mesh, tuple(tuple(r) for r in rules)
        self.grad_accum = grad_accum
        self.loss_fn = loss_fn
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
        # The optimizer sees the boxed parameters, so its moments keep their logical axes and are
        # sharded like them (initialized from unboxed ones, every device would hold all of them).
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))

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

    def state_from_params(self, params) -> TrainState:
        """A fresh state (step 0, new optimizer moments) around a copy of parameters from elsewhere,
        e.g. an earlier alignment stage (a copy: the train step donates its state)."""
        def make(p):
            p = jax.tree_util.tree_map(jnp.copy, p)
            return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=self.tx.init(p))
        return jax.jit(make, in_shardings=(self.state_sharding.params,), out_shardings=self.state_sharding)(params)

    def apply(self, params, tokens, *, dropout_key=None, **kwargs):
        rngs = {"dropout": dropout_key} if dropout_key is not None else {}
        return self.model.apply({"params": params}, tokens, deterministic=dropout_key is None, rngs=rngs, **kwargs)

    def jit_forward(self, fn):
        """jit `fn(trainer, params, batch) -> outputs` with this trainer's shardings and rules (for
        inference passes: log-probabilities, values, reward scores)."""
        def wrapped(params, batch):
            with self._context():
                return fn(self, params, batch)
        return jax.jit(wrapped, in_shardings=(self.state_sharding.params, self.batch_sharding))

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
                zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                               jax.eval_shape(grad_fn, state.params, *first))
                zeros = (zeros[0][0], zeros[0][1], zeros[1])  # ((loss, aux), grads) -> (loss, aux, grads)
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

    def loss_and_grads(self, params, batch):
        """Loss and gradients without dropout (for tests and tools), jitted with the state's shardings."""
        def fn(p, b):
            with self._context():
                return jax.value_and_grad(lambda q: self.loss_fn(self, q, b, None)[0])(p)
        return jax.jit(fn, in_shardings=(self.state_sharding.params, self.batch_sharding))(params, batch)
