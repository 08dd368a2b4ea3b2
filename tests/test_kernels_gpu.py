"""GPU-only checks (marker `gpu`; skipped without a CUDA device): the compiled Mosaic GPU kernel on an
H100 against the reference at the benchmark shape, forward and gradients, with poisoned outputs.

Once these pass on an H100 for a pattern kind, add it to `kernels.pallas_gpu.VERIFIED_KINDS` so
`impl="auto"` uses the kernel for it on Hopper GPUs (until then it warns and falls back to the reference).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import bench, patterns
from kernels.pallas_gpu import sparse_attention_gpu

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.devices()[0].platform != "gpu", reason="needs a CUDA GPU"),
]

PATTERN = patterns.local_strided(256, 256)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _hopper():
    cc = str(getattr(jax.devices()[0], "compute_capability", "0")).split(".")[0]
    return cc.isdigit() and int(cc) >= 9


def _inputs(seed, batch, seq, heads, head_dim):
    keys = jax.random.split(jax.random.key(seed), 4)
    return [jax.random.normal(kk, (batch, seq, heads, head_dim), jnp.float32).astype(jnp.bfloat16) for kk in keys]


@pytest.mark.skipif(not _hopper(), reason="Mosaic GPU wgmma/TMA needs compute capability >= 9")
@pytest.mark.parametrize("seq,batch", [(2048, 2), (8192, 1)])
def test_compiled_kernel_matches_reference(seq, batch):
    """bf16, 16 heads, head_dim 128, window = stride = 256. Every output buffer starts as NaN (poison):
    the kernel's o/lse/dq/dk/dv are fresh XLA buffers, so the jitted step first fills donated NaN
    arrays of the same shape and dtype into the allocator, then an unwritten element would surface
    as a garbage or NaN value in the element-wise comparison on fresh random data."""
    q, k, v, do = _inputs(seq, batch, seq, 16, 128)
    poison = jax.jit(lambda x: jnp.full_like(x, jnp.nan), donate_argnums=0)
    for _ in range(4):  # leave NaN-filled blocks of the right sizes in the allocator
        jax.block_until_ready(poison(jnp.zeros_like(q, jnp.float32)))
        jax.block_until_ready(poison(jnp.zeros_like(q)))

    def run(q, k, v, do):
        out, vjp = jax.vjp(lambda q, k, v: sparse_attention_gpu(q, k, v, PATTERN), q, k, v)
        return out, vjp(do)

    out, grads = jax.jit(run)(q, k, v, do)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref, ref_vjp = jax.vjp(lambda q, k, v: kernels.reference_attention(q, k, v, PATTERN), *f32)
    ref_grads = ref_vjp(do.astype(jnp.float32))
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert _rel(out, ref) < 1e-2, _rel(out, ref)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        assert _rel(g, r) < 1e-2, (name, _rel(g, r))


@pytest.mark.skipif(not _hopper(), reason="Mosaic GPU wgmma/TMA needs compute capability >= 9")
@pytest.mark.parametrize("pattern", [patterns.dense(), patterns.local(128), patterns.strided(64),
                                     patterns.local_strided(64, 128), patterns.fixed(128, 16),
                                     patterns.fixed(32, 8)], ids=str)
def test_compiled_kernel_other_patterns(pattern):
    """Single-pass patterns, window < stride, and fixed (blocks of a tile or packed, gathered summary
    keys), head_dim 64, GQA (4 query heads per kv head)."""
    q, _, _, do = _inputs(3, 1, 1024, 4, 64)
    _, k, v, _ = _inputs(4, 1, 1024, 1, 64)
    out, vjp = jax.vjp(lambda q, k, v: sparse_attention_gpu(q, k, v, pattern), q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref, ref_vjp = jax.vjp(lambda q, k, v: kernels.reference_attention(q, k, v, pattern), *f32)
    assert _rel(out, ref) < 1e-2
    for name, g, r in zip(("dq", "dk", "dv"), vjp(do), ref_vjp(do.astype(jnp.float32))):
        assert _rel(g, r) < 1e-2, (name, _rel(g, r))


@pytest.mark.parametrize("pattern", [patterns.local_strided(64, 64), patterns.fixed(64, 8)], ids=str)
def test_auto_on_gpu_follows_the_verified_kinds(pattern):
    from kernels import pallas_gpu

    keys = jax.random.split(jax.random.key(5), 3)
    q, k, v = (jax.random.normal(kk, (1, 512, 2, 64), jnp.bfloat16) for kk in keys)
    if pattern.kind in pallas_gpu.VERIFIED_KINDS and _hopper():
        out = kernels.sparse_attention(q, k, v, pattern)
    else:
        with pytest.warns(UserWarning, match="pallas_gpu"):
            out = kernels.sparse_attention(q, k, v, pattern)
    ref = kernels.reference_attention(q, k, v, pattern)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2)


def test_bench_cudnn_rows_run_on_gpu():
    rows = bench.main(["--seq", "1024", "--tokens", "2048", "--heads", "2", "--head-dim", "128",
                       "--window", "128", "--stride", "128", "--impls", "cudnn_dense,cudnn_band,xla_mask",
                       "--repeats", "3"])
    assert all(r["status"] == "ok" and r["fwd_ms"] > 0 for r in rows), rows


@pytest.mark.skipif(not _hopper(), reason="Mosaic GPU wgmma/TMA needs compute capability >= 9")
def test_in_place_strided_pass_equals_the_transposed_one_on_gpu(monkeypatch):
    """The strided TMA copies (8-row residues packed into a tile) against the transposed first version."""
    from kernels import pallas_gpu

    q, k, v, do = _inputs(6, 2, 2048, 16, 128)

    def run():
        out, vjp = jax.vjp(lambda q, k, v: sparse_attention_gpu(q, k, v, PATTERN), q, k, v)
        return [out, *vjp(do)]

    in_place = run()
    monkeypatch.setattr(pallas_gpu, "STRIDED_IN_PLACE", False)
    for name, a, b in zip(("out", "dq", "dk", "dv"), in_place, run()):
        assert _rel(a, b) < 2e-3, (name, _rel(a, b))


@pytest.mark.skipif(not _hopper(), reason="Mosaic GPU wgmma/TMA needs compute capability >= 9")
@pytest.mark.parametrize("seq,batch", [(2048, 2), (32768, 1)])
def test_ctas_running_several_tiles_equal_one_tile_on_gpu(monkeypatch, seq, batch):
    """pallas_gpu.FORWARD_TILES / BACKWARD_TILES > 1 (a CTA runs tiles in turn, its ring streaming on)
    computes o, dq, dk, dv exactly as one tile a CTA does: packed residues at 2K, one residue a tile at 32K."""
    from kernels import pallas_gpu

    q, k, v, do = _inputs(seq + 7, batch, seq, 16, 128)

    def run():
        def step(q, k, v, do):  # a new function each run: traced anew with the switches' values
            out, vjp = jax.vjp(lambda q, k, v: sparse_attention_gpu(q, k, v, PATTERN), q, k, v)
            return out, *vjp(do)
        return [np.asarray(x, np.float32) for x in jax.jit(step)(q, k, v, do)]

    one = run()
    for tiles in (2, 4, 8):
        monkeypatch.setattr(pallas_gpu, "FORWARD_TILES", tiles)
        monkeypatch.setattr(pallas_gpu, "BACKWARD_TILES", tiles)
        for name, a, b in zip(("out", "dq", "dk", "dv"), run(), one):
            np.testing.assert_array_equal(a, b, err_msg=f"{name}, tiles={tiles}")


@pytest.mark.skipif(not _hopper(), reason="Mosaic GPU wgmma/TMA needs compute capability >= 9")
@pytest.mark.parametrize("pattern,seq,batch,heads,head_dim", [
    (patterns.dense(), 256, 64, 6, 64),      # shakespeare_char's attention layer, whole batch
    (PATTERN, 2048, 2, 16, 128),             # the benchmark's pattern: the strided pass hashes positions
], ids=["dense-256", "local_strided-2048"])
def test_compiled_dropout_matches_reference(pattern, seq, batch, heads, head_dim):
    """Attention dropout inside the compiled kernels drops what the float32 reference drops (same
    seed, kernels/dropout.py's hash), forward and gradients."""
    q, k, v, do = _inputs(seq + heads, batch, seq, heads, head_dim)
    drop = dict(dropout_rate=0.2, dropout_seed=jnp.int32(seq * 31 + 5))
    out, vjp = jax.vjp(lambda q, k, v: sparse_attention_gpu(q, k, v, pattern, **drop), q, k, v)
    grads = vjp(do)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref, ref_vjp = jax.vjp(lambda q, k, v: kernels.reference_attention(q, k, v, pattern, **drop), *f32)
    assert _rel(out, ref) < 1e-2, _rel(out, ref)
    assert _rel(out, kernels.reference_attention(*f32, pattern)) > 0.1  # it did drop
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_vjp(do.astype(jnp.float32))):
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        assert _rel(g, r) < 1e-2, (name, _rel(g, r))
