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

import kernels
from gpt_jax.kernel_sharding import per_shard
from kernels.dropout import head_seeds, seed_from_key
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


def attend_with_dropout(q, k, v, pattern: Pattern, rate: float, key, impl: str = "auto"):
    """Attention with dropout on the probabilities (nanoGPT's `attn_dropout`, GPT-2's attn_pdrop).

    The mask is kernels/dropout.py's hash of (seed, batch row, head, query, key), so every
    implementation drops the same probabilities, and the [batch, heads] seeds are made before a mesh
    splits the batch and heads: one device or many, the same mask. On a GPU or TPU (impl auto or
    pallas) our Pallas kernels drop inside, so no [t, t] scores reach memory; on CPU, and for what the
    kernels cannot take, the masked reference runs in XLA.
    Kept probabilities are scaled by 1 / (1 - rate), so the output's expectation is plain attention.
    """
    seeds = head_seeds(seed_from_key(key), q.shape[0], q.shape[2])
    if impl not in ("auto", "pallas"):
        return reference_attention(q, k, v, pattern, dropout_rate=rate, dropout_seed=seeds)

    def per_device(q, k, v, seeds):  # our kernel on a GPU or TPU, the reference on CPU
        return kernels.sparse_attention(q, k, v, pattern, impl="auto", dropout_rate=rate, dropout_seed=seeds)
    return per_shard(per_device, q, k, v, seeds)
