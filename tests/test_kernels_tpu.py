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
from kernels.pallas_tpu import sparse_attention_tpu
from kernels.pallas_tpu_kernels import pass_forward
from kernels.pallas_tpu_layout import TileLayout, heads_per_block
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
     "window < stride; 8 rows per residue, 8 whole residues a tile in place; rows p=0 have no strided keys"),
    (patterns.local_strided(40, 16), 1, 128, 2, 2, 32, 16, 32, "window not a multiple of stride"),
    (patterns.dense(), 1, 64, 2, 1, 32, 16, 16, "dense causal, GQA"),
    (patterns.local(20), 1, 128, 2, 2, 32, 32, 16, "band only"),
    (patterns.strided(16), 1, 128, 2, 2, 32, 32, 32, "strided only"),
    # both passes read and write [B, T, H, D] in place where tiles lie within a residue: (rows, heads, D)
    # blocks of all the heads (fewer than 8) or of 8 of them
    (patterns.local_strided(16, 8), 1, 256, 2, 1, 128, 32, 32, "in place: one tile per residue, GQA"),
    (patterns.local_strided(8, 4), 2, 256, 2, 2, 128, 32, 16, "in place: several tiles per residue"),
    (patterns.strided(8), 1, 128, 2, 2, 128, 16, 16, "in place: strided only"),
    (patterns.local_strided(16, 8), 1, 256, 16, 16, 32, 32, 32, "in place: two blocks of 8 heads"),
    (patterns.local_strided(8, 4), 1, 256, 8, 2, 64, 16, 32, "in place GQA: 8 query heads read 2 kv heads, bq < bk"),
    # fixed(block, c): block-diagonal causal, then the gathered summary keys of earlier blocks
    (patterns.fixed(16, 4), 1, 128, 2, 1, 32, 32, 16, "fixed: blocks smaller than a tile, GQA"),
    (patterns.fixed(32, 3), 1, 128, 2, 2, 128, 16, 16, "fixed: summary keys padded to a key block, in place"),
    (patterns.fixed(32, 4), 1, 128, 2, 2, 64, 16, 16, "fixed: two heads a window"),
    (patterns.fixed(8, 8), 1, 64, 1, 1, 32, 16, 16, "fixed with c = block is dense causal"),
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


# (pattern, batch, seq, heads, kv_heads, head_dim, block_q, block_k, why)
DROPOUT_CASES = [
    (patterns.dense(), 1, 64, 2, 1, 32, 16, 16, "dense causal, GQA"),
    (patterns.local_strided(16, 8), 1, 128, 2, 2, 64, 32, 16,
     "local_strided in place: residue-major rows hashed by position, the band's partial chained"),
    (patterns.fixed(16, 4), 1, 128, 2, 1, 32, 32, 16, "fixed: gathered summary keys hashed by position, GQA"),
]


@pytest.mark.parametrize("case", DROPOUT_CASES, ids=[c[-1].split(":")[0] for c in DROPOUT_CASES])
def test_dropout_inside_the_kernels_matches_the_reference(case):
    """Attention dropout in the TPU kernels (kernels/dropout.py's hash, per head of a grid step's
    heads, seeds from SMEM) drops what the reference drops: o, dq, dk, dv with the same seed."""
    pattern, b, t, h, hk, d, bq, bk, why = case
    q, k, v, do = _inputs(zlib.crc32(why.encode()), b, t, h, hk, d, jnp.float32)
    drop = dict(dropout_rate=0.25, dropout_seed=jnp.int32(zlib.crc32(why.encode()) % 2 ** 31))
    out, vjp = jax.vjp(lambda q, k, v: sparse_attention_tpu(q, k, v, pattern, block_q=bq, block_k=bk,
                                                            interpret=INTERPRET, **drop), q, k, v)
    ref, ref_vjp = jax.vjp(lambda q, k, v: reference_attention(q, k, v, pattern, **drop), q, k, v)
    assert _rel(out, ref) < 1e-5
    assert _rel(out, reference_attention(q, k, v, pattern)) > 0.1  # it did drop
    for name, g, r in zip("qkv", vjp(do), ref_vjp(do)):
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
    lay = TileLayout.choose(t, s, 32, (16,), heads_per_block(1, 1))
    o, lse = pass_forward(lay.to(q), lay.to(k), lay.to(v), strided_pass.mask, lay, batch=1, heads=1, kv_heads=1,
                          block_q=16, block_k=16, out_dtype=jnp.float32, interpret=INTERPRET)
    o, lse = np.asarray(lay.back(o, 1))[0, :, 0], np.asarray(lay.lanes_back(lse))[0, 0]
    first_row = np.arange(t) < s  # natural positions 0..S-1 are p = 0 of their residue
    assert np.isneginf(lse[first_row]).all() and np.isfinite(lse[~first_row]).all()
    assert (o[first_row] == 0).all()


def test_unsupported_inputs_raise_value_error_and_auto_falls_back(monkeypatch):
    q, k, v, _ = _inputs(0, 1, 20, 2, 2, 32, jnp.float32)
    with pytest.raises(ValueError, match="multiple of 8"):
        sparse_attention_tpu(q, k, v, patterns.dense())
    q, k, v, _ = _inputs(0, 1, 64, 2, 2, 32, jnp.float32)
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
    q, k, v = q[:, :20], k[:, :20], v[:, :20]  # not a multiple of the 8-row sublane tile
    with pytest.warns(UserWarning, match="pallas_tpu cannot run"):
        out = kernels.sparse_attention(q, k, v, patterns.fixed(4, 2))
    np.testing.assert_allclose(out, reference_attention(q, k, v, patterns.fixed(4, 2)), rtol=1e-6, atol=1e-6)
    assert issubclass(UnsupportedInput, ValueError)


def test_auto_is_reference_on_cpu_and_the_kernel_when_compiling_for_one():
    from kernels.platform import targeting

    assert kernels.auto_impl() == "reference"
    with targeting("tpu"):  # kernels.tpu_compile, gpt_jax.plan --compile_for v5e
        assert kernels.auto_impl() == "pallas_tpu"
    with targeting("gpu"):  # kernels.gpu_compile, gpt_jax.plan --compile_for h100
        assert kernels.auto_impl() == "pallas_gpu"
    assert kernels.auto_impl() == "reference"


def test_in_place_where_tiles_are_legal_blocks():
    """A (rows, heads, D) block of the [B, T/S, S, H, D] view: Mosaic's rule wants its heads a multiple
    of 8 or all of them (any D: it is the whole dimension), and a tile must lie inside one residue of
    T/S rows or hold whole ones; otherwise the pass takes transposed copies."""
    assert TileLayout.choose(32768, 256, 128, (128,), 8).in_place       # 128 rows per residue
    assert TileLayout.choose(8192, 1, 64, (256,), 8).in_place           # band pass, natural order, head_dim 64
    assert TileLayout.choose(8192, 1, 96, (256,), 8).in_place           # GPT-3 Large's 96
    assert TileLayout.choose(2048, 256, 128, (128,), 8).in_place        # 8 rows: 16 residues packed a tile
    assert not TileLayout.choose(40, 5, 128, (16,), 8).in_place         # 8 rows: 16-row tiles of 2 of 5 residues
    assert not TileLayout.choose(24576, 256, 128, (128,), 8).in_place   # 96 rows: tiles would straddle
    assert not TileLayout.choose(8192, 1, 128, (256,), 0).in_place      # no legal block of heads
    assert not TileLayout.choose(8192, 1, 128, (512,), 96).in_place     # 96 heads of 512 rows: too much VMEM


def test_heads_per_grid_step():
    """In place: TILE_HEADS = 8 heads a step where 8 divide the heads and their kv heads make a legal block
    too, else all of them. Transposed: up to 256 lanes of heads, one under GQA."""
    assert heads_per_block(16, 16) == 8
    assert heads_per_block(12, 12) == 12   # GPT-3 Small: 8 does not divide 12
    assert heads_per_block(96, 96) == 8    # GPT-3 175B
    assert heads_per_block(2, 2) == 2
    assert heads_per_block(16, 2) == 16    # GQA: 8 query heads would hold one kv head, not a legal block
    assert heads_per_block(64, 8) == 64
    assert heads_per_block(32, 16) == 16   # 16 query heads hold 8 kv heads
    assert heads_per_block(16, 16, in_place=False, head_dim=96) == 2
    assert heads_per_block(3, 3, in_place=False, head_dim=64) == 3
    assert heads_per_block(16, 4, in_place=False, head_dim=128) == 1   # GQA: one head a step


@pytest.mark.parametrize("h,d,n", [(3, 128, 3), (16, 64, 8)])
def test_layouts_hold_the_same_tiles(h, d, n):
    """Tile t of head block hb in the in-place layout (the (rows, n, D) block of residue r) holds the same
    (rows, D) tiles of heads hb*n .. hb*n + n-1 as the transposed one, and both layouts (and the row
    statistics) go back to the natural order exactly."""
    t, s, rows = 64, 4, 8
    x = jax.random.normal(jax.random.key(11), (2, t, h, d))
    in_place, copied = TileLayout(t, s, d, True, n), TileLayout(t, s, d, False)
    a, c = in_place.to(x), copied.to(x)
    assert a.shape == (2, t // s, s, h, d)
    per_residue = (t // s) // rows
    for tile in range(t // rows):
        for hb in range(h // n):
            r, p0 = divmod(tile, per_residue)
            block = a[:, p0 * rows:(p0 + 1) * rows, r, hb * n:(hb + 1) * n]
            for j in range(n):
                np.testing.assert_array_equal(block[:, :, j], c[:, hb * n + j, tile * rows:(tile + 1) * rows])
    np.testing.assert_array_equal(in_place.back(a, h), x)
    np.testing.assert_array_equal(copied.back(c, h), x)
    stats = x[..., 0].transpose(0, 2, 1)  # [B, H, T]
    lanes = in_place.lanes_to(stats)  # [B, H, 8, T] in the pass's order, on every sublane
    assert lanes.shape == (2, h, 8, t)
    np.testing.assert_array_equal(lanes, np.broadcast_to(c[:, :, None, :, 0], lanes.shape))
    np.testing.assert_array_equal(in_place.lanes_back(lanes), stats)


def test_in_place_and_transposed_give_the_same_result(monkeypatch):
    from kernels import pallas_tpu_layout

    pattern = patterns.local_strided(16, 8)
    q, k, v, do = _inputs(12, 1, 256, 2, 2, 128, jnp.float32)

    def run():
        out, vjp = jax.vjp(lambda q, k, v: sparse_attention_tpu(q, k, v, pattern, block_q=32, block_k=32,
                                                                interpret=INTERPRET), q, k, v)
        return [out, *vjp(do)]

    chosen = []
    choose = TileLayout.choose.__func__
    monkeypatch.setattr(TileLayout, "choose", classmethod(lambda cls, *a: chosen.append(choose(cls, *a)) or chosen[-1]))
    in_place = run()
    assert chosen and all(lay.in_place for lay in chosen)
    chosen.clear()
    monkeypatch.setattr(pallas_tpu_layout, "IN_PLACE", False)
    transposed = run()
    assert chosen and not any(lay.in_place for lay in chosen)
    for name, a, b in zip(("out", "dq", "dk", "dv"), in_place, transposed):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=name)


def test_per_head_patterns_run_each_group_through_the_kernel():
    """heads(local, local_strided): the dispatcher gives each head group to the kernel with its own pattern."""
    pattern = patterns.heads(patterns.local(16), patterns.local_strided(8, 16))
    q, k, v, do = _inputs(13, 1, 128, 4, 2, 32, jnp.float32)
    run = lambda impl: jax.vjp(lambda q, k, v: kernels.sparse_attention(
        q, k, v, pattern, impl=impl, block_q=32, block_k=32, interpret=INTERPRET), q, k, v)
    (out, vjp), (ref_out, ref_vjp) = run("pallas_tpu"), run("reference")
    assert _rel(out, ref_out) < 1e-5
    for g, r in zip(vjp(do), ref_vjp(do)):
        assert _rel(g, r) < 1e-5
