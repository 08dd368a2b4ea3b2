"""Sparse causal attention: pattern definitions, the reference oracle and the Pallas kernels.

    from kernels import sparse_attention, local_strided
    out = sparse_attention(q, k, v, local_strided(256, 256))   # q, k, v: [batch, seq, heads, head_dim]

Importing this package never needs a GPU or TPU: backend modules are imported on first use.
"""

from __future__ import annotations

import warnings

import jax

from kernels.dropout import Dropout, head_seeds
from kernels.errors import UnsupportedInput
from kernels.head_groups import over_head_groups, split
from kernels.patterns import Pattern, dense, fixed, heads, local, local_strided, strided
from kernels.platform import target_platform
from kernels.reference import reference_attention

IMPLS = ("reference", "pallas_tpu", "pallas_gpu", "auto")

__all__ = ["sparse_attention", "auto_impl", "IMPLS", "Pattern", "dense", "local", "strided",
           "local_strided", "fixed", "heads", "reference_attention", "UnsupportedInput"]


def auto_impl() -> str:
    """The kernel `impl="auto"` tries first on the default device (or the TPU or H100 being compiled
    for: kernels.tpu_compile, kernels.gpu_compile, gpt_jax.plan --compile_for)."""
    target = target_platform()
    if target == "tpu":
        return "pallas_tpu"
    dev = jax.devices()[0]
    if target == "gpu" and dev.platform != "gpu":  # compiling for an H100 on a host without a GPU
        return "pallas_gpu"
    if dev.platform == "gpu":
        major = str(getattr(dev, "compute_capability", "0")).split(".")[0]  # CUDA only; ROCm has none
        return "pallas_gpu" if major.isdigit() and int(major) >= 9 else "reference"
    if dev.platform == "tpu":
        return "pallas_tpu"
    return "reference"


def _check_shapes(q, k, v, pattern: Pattern) -> None:
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a kernels.Pattern, got {type(pattern).__name__}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [batch, seq, heads, head_dim]; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} must share batch and head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} must be a multiple of kv heads {k.shape[2]}")
    pattern.check_seq_len(q.shape[1])


def _run(impl, q, k, v, pattern, block_q, block_k, interpret, dropout_rate, dropout_seed):
    drop = dict(dropout_rate=dropout_rate, dropout_seed=dropout_seed)
    if impl == "reference":
        return reference_attention(q, k, v, pattern, **drop)
    if impl == "pallas_tpu":
        from kernels.pallas_tpu import sparse_attention_tpu
        return sparse_attention_tpu(q, k, v, pattern, block_q=block_q, block_k=block_k, interpret=interpret, **drop)
    if impl == "pallas_gpu":
        from kernels.pallas_gpu import sparse_attention_gpu
        return sparse_attention_gpu(q, k, v, pattern, block_q=block_q, block_k=block_k,
                                    interpret=interpret or False, **drop)
    raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")


def sparse_attention(q, k, v, pattern: Pattern, *, impl: str = "auto", block_q: int | None = None,
                     block_k: int | None = None, interpret=None, dropout_rate: float = 0.0, dropout_seed=None):
    """Causal attention restricted to `pattern`.

    q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim] (heads % kv_heads == 0),
    float32 or bfloat16. Returns [batch, seq, heads, head_dim] in q's dtype. Differentiable.

    impl: "reference" (masked XLA, any platform), "pallas_tpu" (TPU, or CPU under the TPU
    interpreter), "pallas_gpu" (Mosaic GPU, compute capability >= 9), or "auto": pallas_gpu on
    Hopper+, pallas_tpu on TPU, reference elsewhere; when the chosen kernel cannot take the inputs
    (it raises ValueError) auto warns and uses the reference instead. A forced impl raises.
    block_q/block_k: kernel tile sizes (None: the kernel's default). interpret: pallas_tpu (None: the
    TPU interpreter off-TPU) and pallas_gpu (True: the Mosaic GPU interpreter, on any backend).
    dropout_rate > 0 drops attention probabilities (training-time attention dropout) by the hash of
    kernels/dropout.py of (dropout_seed, batch row, head, query position, key position): every impl
    that takes it drops the same ones. dropout_seed: an int32 scalar (e.g. dropout.seed_from_key(key)),
    or the [batch, heads] seeds dropout.head_seeds gives, sliced as q is, from a caller that shards.
    """
    _check_shapes(q, k, v, pattern)
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    Dropout(dropout_rate)  # validates the rate
    if dropout_rate and dropout_seed is None:
        raise ValueError("dropout_rate > 0 needs a dropout_seed (an int32 scalar)")
    if pattern.kind == "heads":  # per-head patterns: each head group on its own, with its slice of the seeds
        n = len(pattern.parts)
        seeds = iter(split(head_seeds(dropout_seed, q.shape[0], q.shape[2]), n, axis=1) if dropout_rate else [None] * n)
        return over_head_groups(lambda qg, kg, vg, part: sparse_attention(
            qg, kg, vg, part, impl=impl, block_q=block_q, block_k=block_k, interpret=interpret,
            dropout_rate=dropout_rate, dropout_seed=next(seeds)), q, k, v, pattern)
    if impl != "auto":
        return _run(impl, q, k, v, pattern, block_q, block_k, interpret, dropout_rate, dropout_seed)
    chosen = auto_impl()
    if chosen == "pallas_gpu":
        from kernels import pallas_gpu
        if pattern.kind not in pallas_gpu.VERIFIED_KINDS:  # interpreted and compiled on CPU only; kernels/NOTES.md
            warnings.warn(f"sparse_attention: the pallas_gpu kernel for {pattern.kind} has not been verified on a "
                          f"GPU yet (kernels.pallas_gpu.VERIFIED_KINDS); using the reference implementation, which "
                          f"materializes the [seq, seq] scores; force impl='pallas_gpu' to run it", stacklevel=2)
            return reference_attention(q, k, v, pattern, dropout_rate=dropout_rate, dropout_seed=dropout_seed)
    try:
        return _run(chosen, q, k, v, pattern, block_q, block_k, interpret, dropout_rate, dropout_seed)
    except UnsupportedInput as e:
        warnings.warn(f"sparse_attention: {chosen} cannot run these inputs ({e}); using the reference "
                      f"implementation, which materializes the [seq, seq] scores", stacklevel=2)
        return reference_attention(q, k, v, pattern, dropout_rate=dropout_rate, dropout_seed=dropout_seed)
