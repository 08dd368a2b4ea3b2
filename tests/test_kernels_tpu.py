"""The Pallas TPU kernel, run on CPU under the TPU interpreter, against reference_attention.

Every output and gradient element is compared with the oracle on fresh random data, so an element
the kernel never writes (the interpreter leaves the previous tile's values in an unwritten output
buffer) fails the relative-error check.
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import kernels
from kernels import patterns
from kernels.errors import UnsupportedInput
from kernels.pallas_tpu import _pass_forward, _to_residue_major, sparse_attention_tpu
from kernels.reference import reference_attention
from kernels.schedule import passes_for

INTERPRET = pltpu.InterpretParams(uninitialized_memory="nan")


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _inputs(seed, batch, seq, heads, kv_heads, head_dim, dtype):
    kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (batch, seq, heads, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (batch, seq, kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (batch, seq, kv_heads, head_dim), jnp.float32).astype(dtype)
    do = jax.random.normal(kd, (batch, seq, heads, head_dim), jnp.float32).astype(dtype)
    return q, k, v, do


# (pattern, batch, seq, heads, kv_heads, head_dim, block_q, block_k, why)
CASES = [
    (patterns.local_strided(16, 16), 2, 128, 2, 2, 32, 32, 32, "window == stride"),
    (patterns.local_strided(24, 8), 1, 128, 2, 1, 64, 32, 16, "window > stride, GQA, bq != bk"),
    (patterns.local_strided(8, 32), 1, 256, 2, 2, 128, 64, 64,
     "window < stride; 8 rows per residue packed 8 to a tile; rows p=0 have no strided keys"),
    (patterns.local_strided(40, 16), 1, 128, 2, 2, 32, 16, 32, "window not a multiple of stride"),
    (patterns.dense(), 1, 64, 2, 1, 32, 16, 16, "dense causal, GQA"),
    (patterns.local(20), 1, 128, 2, 2, 32, 32, 16, "band only"),
    (patterns.strided(16), 1, 128, 2, 2, 32, 32, 32, "strided only"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[-1] for c in CASES])
def test_forward_and_gradients_match_reference_f32(case):
    pattern, b, t, h, hk, d, bq, bk, why = case
    q, k, v, do = _inputs(zlib.crc32(why.encode()), b, t, h, hk, d, jnp.float32)  # a fresh key per case

    def kernel_loss(q, k, v):
        return sparse_attention_tpu(q, k, v, pattern, block_q=bq, block_k=bk, interpret=INTERPRET)

    out, vjp = jax.vjp(kernel_loss, q, k, v)
    grads = vjp(do)
    ref_out, ref_vjp = jax.vjp(lambda q, k, v: reference_attention(q, k, v, pattern), q, k, v)
    ref_grads = ref_vjp(do)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _rel(out, ref_out) < 1e-5
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.shape == r.shape and g.dtype == r.dtype
        assert _rel(g, r) < 1e-5, f"d{name}"


def test_bfloat16_through_sparse_attention():
    pattern = patterns.local_strided(32, 32)
    q, k, v, do = _inputs(7, 1, 128, 2, 2, 64, jnp.bfloat16)

    def f(impl):
        return lambda q, k, v: kernels.sparse_attention(q, k, v, pattern, impl=impl, block_q=32, block_k=32,
                                                        interpret=INTERPRET)

    out, vjp = jax.vjp(f("pallas_tpu"), q, k, v)
    ref_out, ref_vjp = jax.vjp(lambda q, k, v: reference_attention(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), pattern), q, k, v)
    assert out.dtype == jnp.bfloat16
    assert _rel(out, ref_out) < 1e-2
    for g, r in zip(vjp(do), ref_vjp(do.astype(jnp.float32))):
        assert g.dtype == jnp.bfloat16
        assert _rel(g, r) < 1e-2


def test_strided_pass_rows_without_keys_get_zero_and_minus_inf():
    # local_strided(8, 8) on T=64: the residue pass has offset 1, so p = 0 (positions 0..7) sees nothing
    pattern, t, s = patterns.local_strided(8, 8), 64, 8
    (_, strided_pass) = passes_for(pattern, t)
    q, k, v, _ = _inputs(3, 1, t, 1, 1, 32, jnp.float32)
    to = lambda x: _to_residue_major(x.transpose(0, 2, 1, 3), s)
    o, lse = _pass_forward(to(q), to(k), to(v), strided_pass.mask, block_q=16, block_k=16,
                           out_dtype=jnp.float32, interpret=INTERPRET)
    p = np.arange(t) % (t // s)  # row index within its residue
    lse = np.asarray(lse)[0, 0, :, 0]
    assert np.isneginf(lse[p == 0]).all() and np.isfinite(lse[p > 0]).all()
    assert (np.asarray(o)[0, 0][p == 0] == 0).all()


def test_unsupported_inputs_raise_value_error_and_auto_falls_back(monkeypatch):
    q, k, v, _ = _inputs(0, 1, 20, 2, 2, 32, jnp.float32)
    with pytest.raises(ValueError, match="multiple of 8"):
        sparse_attention_tpu(q, k, v, patterns.dense())
    q, k, v, _ = _inputs(0, 1, 64, 2, 2, 32, jnp.float32)
    with pytest.raises(ValueError, match="reference"):
        sparse_attention_tpu(q, k, v, patterns.fixed(8, 2))
    with pytest.raises(ValueError, match="block_q=24"):
        sparse_attention_tpu(q, k, v, patterns.dense(), block_q=24)
    with pytest.raises(ValueError, match="float32 and bfloat16"):
        sparse_attention_tpu(q.astype(jnp.float16), k, v, patterns.dense())
    with pytest.raises(ValueError, match="multiple of 16"):  # the pattern's seq_multiple, for every impl
        kernels.sparse_attention(q[:, :40], k[:, :40], v[:, :40], patterns.strided(16), impl="reference")

    with pytest.raises(ValueError, match="unknown impl"):
        kernels.sparse_attention(q, k, v, patterns.dense(), impl="triton")
    with pytest.raises(UnsupportedInput):  # a forced impl raises instead of falling back
        kernels.sparse_attention(q, k, v, patterns.dense(), impl="pallas_gpu")

    monkeypatch.setattr(kernels, "auto_impl", lambda: "pallas_tpu")
    with pytest.warns(UserWarning, match="pallas_tpu cannot run"):
        out = kernels.sparse_attention(q, k, v, patterns.fixed(8, 2))
    np.testing.assert_allclose(out, reference_attention(q, k, v, patterns.fixed(8, 2)), rtol=1e-6, atol=1e-6)
    assert issubclass(UnsupportedInput, ValueError)


def test_auto_is_reference_on_cpu():
    assert kernels.auto_impl() == "reference"
