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


def pattern_per_head(pattern: Pattern, heads: int) -> list[Pattern]:
    """The pattern each of `heads` heads computes (for implementations that take one mask per head)."""
    if pattern.kind != "heads":
        return [pattern] * heads
    pattern.check_heads(heads)
    return [pattern.parts[h * len(pattern.parts) // heads] for h in range(heads)]


def over_head_groups(fn, q, k, v, pattern: Pattern):
    """fn(q_g, k_g, v_g, part) for each head group of a per-head pattern on [batch, seq, heads, head_dim]
    arrays, concatenated along the heads."""
    n = len(pattern.parts)
    pattern.check_heads(q.shape[2], k.shape[2])
    outs = [fn(qg, kg, vg, part) for qg, kg, vg, part in zip(split(q, n), split(k, n), split(v, n), pattern.parts)]
    return jnp.concatenate(outs, axis=2)
