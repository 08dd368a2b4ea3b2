"""Sparse causal attention: pattern definitions, the reference oracle and the Pallas kernels.

    from kernels import sparse_attention, local_strided
    out = sparse_attention(q, k, v, local_strided(256, 256))   # q, k, v: [batch, seq, heads, head_dim]

Importing this package never needs a GPU or TPU: backend modules are imported on first use.
"""

from __future__ import annotations

import warnings

import jax

from kernels.errors import UnsupportedInput
from kernels.head_groups import over_head_groups
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


def _run(impl, q, k, v, pattern, block_q, block_k, interpret):
    if impl == "reference":
        return reference_attention(q, k, v, pattern)
    if impl == "pallas_tpu":
        from kernels.pallas_tpu import sparse_attention_tpu
        return sparse_attention_tpu(q, k, v, pattern, block_q=block_q, block_k=block_k, interpret=interpret)
    if impl == "pallas_gpu":
        from kernels.pallas_gpu import sparse_attention_gpu
        return sparse_attention_gpu(q, k, v, pattern, block_q=block_q, block_k=block_k,
                                    interpret=interpret or False)
    raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")


def sparse_attention(q, k, v, pattern: Pattern, *, impl: str = "auto", block_q: int | None = None,
                     block_k: int | None = None, interpret=None):
    """Causal attention restricted to `pattern`.

    q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim] (heads % kv_heads == 0),
    float32 or bfloat16. Returns [batch, seq, heads, head_dim] in q's dtype. Differentiable.

    impl: "reference" (masked XLA, any platform), "pallas_tpu" (TPU, or CPU under the TPU
    interpreter), "pallas_gpu" (Mosaic GPU, compute capability >= 9), or "auto": pallas_gpu on
    Hopper+, pallas_tpu on TPU, reference elsewhere; when the chosen kernel cannot take the inputs
    (it raises ValueError) auto warns and uses the reference instead. A forced impl raises.
    block_q/block_k: kernel tile sizes (None: the kernel's default). interpret: pallas_tpu (None: the
    TPU interpreter off-TPU) and pallas_gpu (True: the Mosaic GPU interpreter, on any backend).
    """
    _check_shapes(q, k, v, pattern)
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    if pattern.kind == "heads":  # per-head patterns: each head group on its own
        return over_head_groups(lambda qg, kg, vg, part: sparse_attention(
            qg, kg, vg, part, impl=impl, block_q=block_q, block_k=block_k, interpret=interpret), q, k, v, pattern)
    if impl != "auto":
        return _run(impl, q, k, v, pattern, block_q, block_k, interpret)
    chosen = auto_impl()
    if chosen == "pallas_gpu":
        from kernels import pallas_gpu
        if not pallas_gpu.VERIFIED_ON_GPU:  # lowered and interpreted on CPU only; see kernels/NOTES.md
            warnings.warn("sparse_attention: the pallas_gpu kernel has not been verified on a GPU yet "
                          "(kernels.pallas_gpu.VERIFIED_ON_GPU); using the reference implementation, which "
                          "materializes the [seq, seq] scores; force impl='pallas_gpu' to run it", stacklevel=2)
            return reference_attention(q, k, v, pattern)
    try:
        return _run(chosen, q, k, v, pattern, block_q, block_k, interpret)
    except UnsupportedInput as e:
        warnings.warn(f"sparse_attention: {chosen} cannot run these inputs ({e}); using the reference "
                      f"implementation, which materializes the [seq, seq] scores", stacklevel=2)
        return reference_attention(q, k, v, pattern)
