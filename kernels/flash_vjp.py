"""The differentiable attention both Pallas backends expose: one `jax.custom_vjp` over their passes.

A backend gives `forward(q, k, v, *static, seeds) -> (o, lse)` and `backward(q, k, v, o, lse, do,
*static, seeds) -> (dq, dk, dv)`; the residuals are what a flash-attention backward needs (the inputs,
o and the log-sum-exp, never the [T, T] probabilities). seeds, the [B, H] int32 dropout seeds (zeros
without dropout), is an input with no gradient; everything else static is hashable.
"""

from __future__ import annotations

import functools

import jax


def flash_vjp(forward, backward):
    """attention(q, k, v, seeds, *static) -> o, differentiable in q, k and v."""
    @functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
    def attention(q, k, v, seeds, *static):
        return forward(q, k, v, *static, seeds)[0]

    def attention_fwd(q, k, v, seeds, *static):
        o, lse = forward(q, k, v, *static, seeds)
        return o, (q, k, v, seeds, o, lse)

    def attention_bwd(*args):
        *static, (q, k, v, seeds, o, lse), do = args
        return (*backward(q, k, v, o, lse, do, *static, seeds), None)

    attention.defvjp(attention_fwd, attention_bwd)
    return attention
