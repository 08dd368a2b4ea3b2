"""TPU-only checks (marker `tpu`; skipped without a TPU): the compiled Pallas TPU kernel against the
float32 reference at bf16, forward and gradients, in both layouts, for every pattern it takes.
On CPU the same kernel is checked in the TPU interpreter (tests/test_kernels_tpu.py) and by its
Mosaic lowering (tests/test_kernels_tpu_lowering.py); this file is what a TPU adds: libtpu's compile.
Run it on a TPU VM or a Colab TPU with `python -m pytest tests/test_kernels_tpu_compiled.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import patterns

pytestmark = pytest.mark.tpu


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# the f32 reference materializes [heads, seq, seq] scores: 1 GiB for 4 heads at 8K
@pytest.mark.parametrize("pattern,seq,in_place,head_dim,heads", [
    (patterns.local_strided(128, 64), 8192, True, 128, 4),      # 128 rows per residue: both passes in place
    (patterns.local_strided(128, 64), 8192, False, 128, 4),     # the same on transposed copies
    (patterns.local_strided(128, 64), 8192, True, 64, 4),       # head_dim 64
    (patterns.local_strided(128, 64), 4096, True, 128, 16),     # two blocks of 8 heads a step
    (patterns.local_strided(256, 256), 2048, True, 128, 4),     # packed residues, in place
    (patterns.dense(), 4096, True, 128, 4),
    (patterns.fixed(128, 16), 8192, True, 128, 4),
    (patterns.heads(patterns.local(256), patterns.strided(128)), 8192, True, 128, 4),
], ids=["local_strided", "local_strided-transposed", "local_strided-head_dim64", "16-heads", "packed-residues",
        "dense", "fixed", "per-head"])
def test_compiled_kernel_matches_reference(pattern, seq, in_place, head_dim, heads, monkeypatch):
    from kernels import pallas_tpu_layout

    monkeypatch.setattr(pallas_tpu_layout, "IN_PLACE", in_place)
    keys = jax.random.split(jax.random.key(seq), 4)
    q, k, v, do = (jax.random.normal(kk, (1, seq, heads, head_dim), jnp.float32) for kk in keys)
    bf = lambda x: x.astype(jnp.bfloat16)
    out, vjp = jax.vjp(lambda q, k, v: kernels.sparse_attention(q, k, v, pattern, impl="pallas_tpu"),
                       bf(q), bf(k), bf(v))
    ref, ref_vjp = jax.vjp(lambda q, k, v: kernels.reference_attention(q, k, v, pattern), q, k, v)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert _rel(out, ref) < 1e-2
    for name, g, r in zip(("dq", "dk", "dv"), vjp(bf(do)), ref_vjp(do)):
        assert _rel(g, r) < 1e-2, name
