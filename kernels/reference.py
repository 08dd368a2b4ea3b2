"""Reference attention: a boolean mask applied to plain XLA attention, computed in float32.

Slow (it materializes the [T, S] scores) and obviously right: the oracle for every kernel test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.dropout import Dropout, head_seeds, keep_mask
from kernels.head_groups import split
from kernels.patterns import Pattern


def reference_attention(q, k, v, pattern: Pattern, *, q_offset: int = 0, k_offset: int = 0,
                        scale: float | None = None, return_lse: bool = False, dropout_rate: float = 0.0,
                        dropout_seed=None):
    """Masked softmax attention.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim] with heads a
    multiple of kv_heads (grouped-query attention). Query row t sits at position q_offset + t and
    key column s at k_offset + s, which lets a decode step or a chunk use the same oracle.
    Rows with no visible key return zeros (and lse = -inf).

    dropout_rate > 0 drops probabilities by kernels/dropout.py's hash of (dropout_seed: an int32 scalar
    or [batch, heads] seeds, batch row, head, query position, key position), the mask the kernels
    apply; lse stays the undropped one.
    """
    if pattern.kind == "heads":  # each head group with its own pattern (and its slice of the seeds)
        n = len(pattern.parts)
        pattern.check_heads(q.shape[2], k.shape[2])
        seeds = split(head_seeds(dropout_seed, q.shape[0], q.shape[2]), n, axis=1) if dropout_rate else [None] * n
        results = [reference_attention(qg, kg, vg, part, q_offset=q_offset, k_offset=k_offset, scale=scale,
                                       return_lse=return_lse, dropout_rate=dropout_rate, dropout_seed=sg)
                   for qg, kg, vg, part, sg in zip(split(q, n), split(k, n), split(v, n), pattern.parts, seeds)]
        if not return_lse:
            return jnp.concatenate(results, axis=2)
        return jnp.concatenate([o for o, _ in results], axis=2), jnp.concatenate([l for _, l in results], axis=1)
    b, tq, h, dh = q.shape
    _, tk, hk, _ = k.shape
    if h % hk:
        raise ValueError(f"query heads {h} must be a multiple of kv heads {hk}")
    scale = dh ** -0.5 if scale is None else scale
    qf = q.astype(jnp.float32).reshape(b, tq, hk, h // hk, dh)
    logits = jnp.einsum("btkgd,bskd->bkgts", qf, k.astype(jnp.float32)) * scale
    mask = pattern.mask(q_offset + jnp.arange(tq), k_offset + jnp.arange(tk), xp=jnp)
    logits = jnp.where(mask, logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [b, hk, g, tq]
    probs = jnp.where(mask, jnp.exp(logits - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
    if dropout_rate > 0:
        dropout = Dropout(dropout_rate)
        kept = keep_mask(head_seeds(dropout_seed, b, h), q_offset + jnp.arange(tq), k_offset + jnp.arange(tk),
                         dropout)
        probs = jnp.where(kept.reshape(probs.shape), probs * dropout.scale, 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(jnp.float32)).reshape(b, tq, h, dh)
    out = out.astype(q.dtype)
    if return_lse:
        return out, lse.reshape(b, h, tq)
    return out
