"""One dispatch function for every attention layer of the model.

The model calls `attend(q, k, v, pattern, impl)`; this file decides which implementation runs:

| pattern | impl=auto on GPU          | on TPU                    | on CPU                   |
|---------|---------------------------|---------------------------|--------------------------|
| dense   | cuDNN (fused, causal)     | our Pallas TPU kernel     | XLA causal attention     |
| sparse  | kernels.sparse_attention  | kernels.sparse_attention  | kernels.sparse_attention |

`kernels.sparse_attention(impl="auto")` picks our Pallas kernel for the backend and falls back to
the masked reference (with a warning) for shapes the kernel cannot take. On a mesh it runs on each
device's shard of the batch and heads (gpt_jax/kernel_sharding.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import kernels
from gpt_jax.kernel_sharding import per_shard
from kernels.head_groups import over_head_groups
from kernels.patterns import Pattern
from kernels.platform import target_platform
from kernels.reference import reference_attention

IMPLS = ("auto", "reference", "xla", "cudnn", "pallas")


def _backend() -> str:
    return target_platform()


def attend(q, k, v, pattern: Pattern, impl: str = "auto"):
    """Causal attention of q [b, t, h, d] over k, v [b, t, kv_h, d] restricted to `pattern`."""
    if impl not in IMPLS:
        raise ValueError(f"attention.impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return reference_attention(q, k, v, pattern)
    if pattern.kind == "heads":  # per-head patterns: each head group dispatched on its own
        return over_head_groups(lambda qg, kg, vg, part: attend(qg, kg, vg, part, impl), q, k, v, pattern)

    if pattern.is_dense:
        if impl == "cudnn" or (impl == "auto" and _backend() == "gpu"):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        if impl == "pallas" or (impl == "auto" and _backend() == "tpu"):
            # XLA would materialize [seq, seq] scores per head; the flash-style kernel does not.
            return _kernel(q, k, v, pattern)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")

    if pattern.kind == "local" and impl == "cudnn":
        # cuDNN's sliding window: keys within window-1 to the left, none to the right.
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn",
                                            local_window_size=(pattern.window - 1, 0))
    if impl in ("xla", "cudnn"):
        return reference_attention(q, k, v, pattern)
    return _kernel(q, k, v, pattern)


def _kernel(q, k, v, pattern: Pattern):
    """kernels.sparse_attention, on each device's shard when the model runs on a mesh (a Pallas kernel
    is not partitioned by XLA)."""
    return per_shard(lambda q, k, v: kernels.sparse_attention(q, k, v, pattern, impl="auto"), q, k, v)


def attend_with_dropout(q, k, v, pattern: Pattern, rate: float, key):
    """Attention with dropout on the probabilities (nanoGPT's `attn_dropout`, GPT-2's attn_pdrop).

    No fused kernel here drops probabilities, so this materializes the [t, t] scores per head in
    XLA: meant for short contexts like shakespeare_char's 256. Kept probabilities are scaled by
    1 / (1 - rate), so the output's expectation over keys is plain attention.
    """
    if pattern.kind == "heads":
        keys = iter(jax.random.split(key, len(pattern.parts)))
        return over_head_groups(lambda qg, kg, vg, part: attend_with_dropout(qg, kg, vg, part, rate, next(keys)),
                                q, k, v, pattern)
    b, t, h, d = q.shape
    hk = k.shape[2]
    qg = q.reshape(b, t, hk, h // hk, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * d ** -0.5
    visible = pattern.mask(jnp.arange(t), jnp.arange(t), xp=jnp)  # the diagonal is always visible
    probs = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)
    keep = jax.random.bernoulli(key, 1.0 - rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - rate), 0.0).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)
