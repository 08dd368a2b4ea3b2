"""Per-head patterns (`patterns.heads`): run each head group with its own pattern.

The heads split into len(parts) equal contiguous groups, and so do the kv heads (group g of the
query heads reads group g of the kv heads, which keeps grouped-query attention's pairing). Every
implementation runs a per-head pattern by calling itself once per group; this file is the split.
"""

from __future__ import annotations

import jax.numpy as jnp

from kernels.patterns import Pattern


def split(x, n: int, axis: int = 2):
    """x [..., heads, ...] -> n arrays of heads / n contiguous heads each."""
    return jnp.split(x, n, axis=axis)


def over_head_groups(fn, q, k, v, pattern: Pattern, *, axis: int = 2):
    """fn(q_g, k_g, v_g, part) for each head group of a per-head pattern, concatenated along the heads."""
    n = len(pattern.parts)
    pattern.check_heads(q.shape[axis], k.shape[axis])
    outs = [fn(qg, kg, vg, part) for qg, kg, vg, part in zip(split(q, n, axis), split(k, n, axis),
                                                             split(v, n, axis), pattern.parts)]
    return jnp.concatenate(outs, axis=axis)
