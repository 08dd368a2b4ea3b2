"""The Mosaic GPU kernel on CPU: numerics in the Mosaic GPU interpreter, and lowering for CUDA.

The interpreter runs the kernels' warpgroups as threads with simulated shared memory, TMA copies,
barriers and wgmma (jax 0.11.2), so these tests check the tiling, the ring-buffer protocol, masks,
the merge and the backward against reference_attention on fresh random inputs. Two things it does
not run and only the CUDA lowering test (plus tests/test_kernels_gpu.py on an H100) covers: wgmma with
a register operand (interpreted as a plain dot) and wgmma accumulating into a passed-in accumulator
(`pl.run_state`; interpreted as a fresh product plus an add). See kernels/NOTES.md.
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import patterns
from kernels.errors import UnsupportedInput
from kernels.pallas_gpu import sparse_attention_gpu
from kernels.pallas_gpu_kernels import pass_dkv, pass_dq, pass_forward
from kernels.pallas_gpu_parts import PassConfig
from kernels.reference import reference_attention
from kernels.schedule import DiagonalMask, merge_partials

# "nan": scratch and accumulators start as NaN, so anything read before it is written shows up.
INTERPRET = plgpu.InterpretGPUParams(uninitialized_memory="nan")


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _out_and_grads(pattern, q, k, v, do, block_k=64, **kwargs):
    """[o, dq, dk, dv] of sparse_attention_gpu in the interpreter (traced anew on each call, so module
    switches set in between take effect)."""
    out, vjp = jax.vjp(lambda q, k, v: sparse_attention_gpu(q, k, v, pattern, block_k=block_k, interpret=INTERPRET,
                                                            **kwargs), q, k, v)
    return [out, *vjp(do)]


def _inputs(seed, seq, heads, kv_heads, head_dim, dtype):
    keys = jax.random.split(jax.random.key(seed), 4)
    shapes = [(1, seq, heads, head_dim), (1, seq, kv_heads, head_dim), (1, seq, kv_heads, head_dim),
              (1, seq, heads, head_dim)]
    return [jax.random.normal(kk, s, jnp.float32).astype(dtype) for kk, s in zip(keys, shapes)]


# (pattern, seq, heads, kv_heads, dtype, block_k, why)
CASES = [
    (patterns.local_strided(16, 16), 128, 1, 1, jnp.bfloat16, 64,
     "window == stride, bf16; 8 rows per residue, 8 residues packed per tile"),
    (patterns.local_strided(40, 16), 128, 2, 1, jnp.float32, 64,
     "window > stride and not a multiple, f32, GQA; rows p < 3 have no strided keys"),
    (patterns.local_strided(16, 64), 128, 1, 1, jnp.bfloat16, 128,
     "window < stride, bf16, block_k 128; 2 rows per residue"),
    (patterns.local_strided(8, 2), 256, 1, 1, jnp.float32, 64,
     "128 rows per residue: unpacked strided pass, two tiles per residue, two CTAs per pass"),
    (patterns.local_strided(8, 4), 256, 2, 2, jnp.float32, 128,
     "64 rows per residue, block_k 128: query tiles of one residue, key blocks of two"),
    (patterns.local_strided(16, 16), 384, 1, 1, jnp.float32, 64,
     "24 rows per residue (not a power of two), f32: residues straddle tiles, on transposed copies"),
    (patterns.fixed(32, 8), 256, 2, 1, jnp.bfloat16, 64,
     "fixed, bf16, GQA: blocks of 32 packed into tiles; 64 gathered summary keys padded to 128"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[-1].split(",")[0].split(";")[0] for c in CASES])
def test_forward_and_gradients_match_reference(case):
    pattern, t, h, hk, dtype, bk, why = case
    q, k, v, do = _inputs(zlib.crc32(why.encode()), t, h, hk, 64, dtype)  # fresh inputs per case
    f = lambda q, k, v: sparse_attention_gpu(q, k, v, pattern, block_k=bk, interpret=INTERPRET)
    out, vjp = jax.vjp(f, q, k, v)
    grads = vjp(do)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref, ref_vjp = jax.vjp(lambda q, k, v: reference_attention(q, k, v, pattern), *f32)
    ref_grads = ref_vjp(do.astype(jnp.float32))
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert out.dtype == dtype and out.shape == q.shape
    assert _rel(out, ref) < tol, ("out", _rel(out, ref))
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert g.shape == r.shape and np.isfinite(np.asarray(g, np.float32)).all(), name
        assert _rel(g, r) < tol, (name, _rel(g, r))


def test_single_pass_patterns():
    """local and strided alone (one pass each), bf16; local's gradients too (a single pass writes
    them in bf16 straight from its kernels, with no earlier partial to add)."""
    q, k, v, do = _inputs(11, 256, 1, 1, 64, jnp.bfloat16)
    for pattern in (patterns.local(40), patterns.strided(32)):
        out = sparse_attention_gpu(q, k, v, pattern, block_k=64, interpret=INTERPRET)
        assert _rel(out, reference_attention(q, k, v, pattern)) < 1e-2, pattern
    pattern = patterns.local(40)
    _, vjp = jax.vjp(lambda q, k, v: sparse_attention_gpu(q, k, v, pattern, block_k=64, interpret=INTERPRET), q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    _, ref_vjp = jax.vjp(lambda q, k, v: reference_attention(q, k, v, pattern), *f32)
    for name, g, r in zip(("dq", "dk", "dv"), vjp(do), ref_vjp(do.astype(jnp.float32))):
        assert g.dtype == jnp.bfloat16 and _rel(g, r) < 1e-2, (name, _rel(g, r))


def test_dense_kernels_have_no_races_within_a_cta():
    """Dense causal, each kernel against the reference. One CTA (T=128) and a one-slot ring, so every block after the first waits for the previous one
    to be released: the interpreter's race detector checks the barrier protocol of all three kernels.
    (Across grid points the interpreter does not order its clocks, so larger grids report false races
    on reused scratch; a single CTA avoids that.)"""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks  # private: the detector's state

    def race_free(outputs):
        jax.block_until_ready(outputs)
        return not gpu_callbacks._races.races_found  # kept until the next kernel starts

    params = plgpu.InterpretGPUParams(detect_races=True)
    q, k, v, do = _inputs(7, 128, 1, 1, 64, jnp.bfloat16)
    cfg = PassConfig(DiagonalMask(128), 128, block_q=64, block_k=64, slots=1, interpret=params)
    o, lse = pass_forward(q, k, v, cfg)
    assert race_free((o, lse)), "forward"
    ref, ref_lse = reference_attention(q, k, v, patterns.dense(), return_lse=True)
    assert _rel(o, ref) < 1e-2 and _rel(lse, ref_lse) < 1e-2
    lse2 = lse * np.log2(np.e)
    delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), o.astype(jnp.float32))
    dq = pass_dq(q, k, v, do, lse2, delta, cfg)
    assert race_free(dq), "dq"
    dk, dv = pass_dkv(q, k, v, do, lse2, delta, cfg)
    assert race_free((dk, dv)), "dkv"
    # The forward's ping-pong (two compute warpgroups taking turns) needs a 2-slot ring: check it too.
    pp = PassConfig(DiagonalMask(128), 128, block_q=64, block_k=64, slots=2, interpret=params)
    o_pp, lse_pp = pass_forward(q, k, v, pp)
    assert race_free((o_pp, lse_pp)), "forward, ping-pong"
    np.testing.assert_array_equal(np.asarray(o_pp, np.float32), np.asarray(o, np.float32))
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]  # dense is one pass: these are the full gradients
    _, ref_vjp = jax.vjp(lambda q, k, v: reference_attention(q, k, v, patterns.dense()), *f32)
    for name, g, r in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_vjp(do.astype(jnp.float32))):
        assert _rel(g, r) < 1e-2, (name, _rel(g, r))


def test_in_place_strided_pass_is_race_free_and_equals_the_transposed_one():
    """One CTA of the strided pass with 8-row residues (each 64-row tile is 8 TMA copies on one
    barrier), one-slot ring, race detector on: the three kernels reading the arrays in place give
    exactly what they give on XLA-transposed copies."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    from kernels.pallas_gpu import _from_residues, _to_residues
    from kernels.schedule import passes_for

    t, s = 128, 16
    strided = passes_for(patterns.local_strided(s, s), t)[1]
    q, k, v, do = _inputs(3, t, 1, 1, 64, jnp.bfloat16)
    lse2 = jax.random.normal(jax.random.key(4), (1, 1, t)) + 8.0  # any finite row statistics will do
    delta = jax.random.normal(jax.random.key(5), (1, 1, t))
    params = plgpu.InterpretGPUParams(detect_races=True)
    copied = PassConfig(strided.mask, t, block_q=64, block_k=64, slots=1, interpret=params)
    in_place = PassConfig(strided.mask, t, block_q=64, block_k=64, slots=1, interpret=params, residues=s)
    to, back = (lambda x: _to_residues(x, s)), (lambda x: _from_residues(x, s))
    flat = lambda x: x.reshape(1, t // s, s, 64)  # noqa: E731  [B, T, 1, D] -> [B, T/S, S*H, D]
    natural = lambda x: x.reshape(1, t, 1, 64)  # noqa: E731
    runs = {
        "forward": (lambda c, f, b: [b(pass_forward(f(q), f(k), f(v), c)[0])]),
        "dq": (lambda c, f, b: [b(pass_dq(f(q), f(k), f(v), f(do), lse2, delta, c))]),
        "dkv": (lambda c, f, b: [b(g) for g in pass_dkv(f(q), f(k), f(v), f(do), lse2, delta, c)]),
    }
    for name, run in runs.items():
        want = jax.block_until_ready(run(copied, to, back))
        got = jax.block_until_ready(run(in_place, flat, natural))
        assert not gpu_callbacks._races.races_found, name
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32), err_msg=name)

    # The epilogues that take an earlier pass's partial: gradients add it, the forward merges it.
    part = [jax.random.normal(jax.random.key(6 + i), q.shape, jnp.float32) for i in range(3)]
    dq = pass_dq(flat(q), flat(k), flat(v), flat(do), lse2, delta, in_place, partial=flat(part[0]))
    assert not gpu_callbacks._races.races_found, "dq + partial"
    dk, dv = pass_dkv(flat(q), flat(k), flat(v), flat(do), lse2, delta, in_place, partials=(flat(part[1]), flat(part[2])))
    assert not gpu_callbacks._races.races_found, "dkv + partials"
    alone = [runs["dq"](in_place, flat, natural)[0], *runs["dkv"](in_place, flat, natural)]
    for g, a, pt in zip((dq, dk, dv), alone, part):
        np.testing.assert_allclose(natural(g), a + pt, rtol=1e-6, atol=1e-6)
    # Row statistics [B, H, T] stay in the pass's flat residue-major order (pallas_gpu transposes them).
    lto = lambda x: to(x.swapaxes(1, 2)).swapaxes(1, 2)  # noqa: E731
    lback = lambda x: back(x.swapaxes(1, 2)).swapaxes(1, 2)  # noqa: E731
    o1 = part[0].astype(jnp.bfloat16)
    lse1 = jax.random.normal(jax.random.key(9), (1, 1, t))
    o, lse = pass_forward(flat(q), flat(k), flat(v), in_place, partial=(flat(o1), lto(lse1)))
    assert not gpu_callbacks._races.races_found, "forward + partial"
    o2, l2 = pass_forward(flat(q), flat(k), flat(v), in_place)
    want_o, want_lse = merge_partials(o1.astype(jnp.float32), lse1.swapaxes(1, 2), natural(o2).astype(jnp.float32),
                                      lback(l2).swapaxes(1, 2), xp=jnp)
    assert _rel(natural(o), want_o) < 1e-2 and _rel(lback(lse), want_lse.swapaxes(1, 2)) < 1e-5


@pytest.mark.parametrize("pattern, t, tiles", [
    (patterns.dense(), 512, 4),  # tiles of 1 to 4 key (query) blocks: the ring runs on across them
    (patterns.local_strided(16, 16), 256, 2),  # band pass, then the in-place strided pass taking its partials
], ids=["dense", "local_strided"])
def test_ctas_running_several_tiles_give_the_one_tile_result(monkeypatch, pattern, t, tiles):
    """pallas_gpu.FORWARD_TILES / BACKWARD_TILES: each CTA runs `tiles` tiles in turn; o, dq, dk and dv
    are bit for bit those of one tile a CTA (the same arithmetic a row), and match the reference."""
    from kernels import pallas_gpu

    q, k, v, do = _inputs(zlib.crc32(f"{pattern}{t}".encode()), t, 2, 2, 64, jnp.bfloat16)

    def run():
        return _out_and_grads(pattern, q, k, v, do)

    one = run()
    monkeypatch.setattr(pallas_gpu, "FORWARD_TILES", tiles)
    monkeypatch.setattr(pallas_gpu, "BACKWARD_TILES", tiles)
    for name, a, b in zip(("out", "dq", "dk", "dv"), run(), one):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=name)
    assert _rel(one[0], reference_attention(q, k, v, pattern)) < 1e-2


def test_kernels_running_two_tiles_a_cta_are_race_free():
    """One CTA running two tiles, race detector on, for the three kernels: the ring handing the next
    tile's blocks over (one slot; two with ping-pong), the resident buffers reloaded during the
    epilogue, 16-bit outputs staged apart, and in the strided pass the next tile's partial loaded
    once the store has read the staging buffer; each equal to one tile a CTA."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    from kernels.schedule import passes_for

    params = plgpu.InterpretGPUParams(detect_races=True)
    t = 256
    q, k, v, do = _inputs(21, t, 1, 1, 64, jnp.bfloat16)
    ref, ref_lse = reference_attention(q, k, v, patterns.dense(), return_lse=True)
    for slots in (1, 2):  # ping-pong needs two
        cfg = PassConfig(DiagonalMask(t), t, block_q=64, block_k=64, slots=slots, interpret=params, tiles=2)
        o, lse = jax.block_until_ready(pass_forward(q, k, v, cfg))
        assert not gpu_callbacks._races.races_found, slots
        assert _rel(o, ref) < 1e-2 and _rel(lse, ref_lse) < 1e-5, slots

    s = 16
    strided = passes_for(patterns.local_strided(s, s), t)[1]
    flat = lambda x: x.reshape(1, t // s, s, 64)  # noqa: E731  in place: [B, T/S, S*H, D]
    o1 = jax.random.normal(jax.random.key(22), q.shape, jnp.float32).astype(jnp.bfloat16)
    lse1 = jax.random.normal(jax.random.key(23), (1, 1, t))
    lse2 = jax.random.normal(jax.random.key(24), (1, 1, t)) + 8.0  # any finite row statistics will do
    delta = jax.random.normal(jax.random.key(25), (1, 1, t))
    part = [flat(jax.random.normal(jax.random.key(26 + i), q.shape, jnp.float32)) for i in range(3)]
    args = (flat(q), flat(k), flat(v))
    runs = {
        "forward + partial": lambda c: pass_forward(*args, c, partial=(flat(o1), lse1)),
        "dq + partial, bf16 out": lambda c: pass_dq(*args, flat(do), lse2, delta, c, partial=part[0],
                                                    out_dtype=jnp.bfloat16),
        "dq + partial, f32 out": lambda c: pass_dq(*args, flat(do), lse2, delta, c, partial=part[0]),
        "dkv + partials, bf16 out": lambda c: pass_dkv(*args, flat(do), lse2, delta, c, partials=part[1:],
                                                       out_dtype=jnp.bfloat16),
        "dkv, f32 out": lambda c: pass_dkv(*args, flat(do), lse2, delta, c),
    }
    for name, run in runs.items():
        got = {}
        for tiles in (1, 2):
            cfg = PassConfig(strided.mask, t, block_q=64, block_k=64, slots=2, interpret=params, residues=s,
                             tiles=tiles)
            got[tiles] = jax.block_until_ready(run(cfg))
            assert not gpu_callbacks._races.races_found, (name, tiles)
        for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(got[2])):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=name)


# (pattern, seq, heads, kv_heads, dtype, block_k, tiles, why)
DROPOUT_CASES = [
    (patterns.dense(), 256, 2, 1, jnp.float32, 64, 2, "dense, f32, GQA: one CTA running both tiles, two heads' seeds"),
    (patterns.local_strided(16, 16), 128, 1, 1, jnp.float32, 64, 1,
     "local_strided in place, f32: residue-major rows hashed by position, the band's partial merged"),
    (patterns.local_strided(16, 16), 384, 1, 1, jnp.bfloat16, 64, 1,
     "local_strided on transposed copies, bf16: 24-row residues, the passes merged in XLA"),
    (patterns.fixed(128, 16), 256, 1, 1, jnp.float32, 128, 2,
     "fixed, f32: one CTA running both tiles; gathered summary keys hashed by their positions"),
]


@pytest.mark.parametrize("case", DROPOUT_CASES, ids=[c[-1].split(",")[0] for c in DROPOUT_CASES])
def test_dropout_inside_the_kernels_matches_the_reference(monkeypatch, case):
    """Attention dropout in the kernels (kernels/dropout.py's hash in registers) drops the probabilities
    the reference drops: o, dq, dk, dv against reference_attention with the same seed; the forward
    keeps the undropped normalizer, dq and dk/dv see dP through the mask, dv sums the kept P."""
    from kernels import pallas_gpu

    pattern, t, h, hk, dtype, bk, tiles, why = case
    monkeypatch.setattr(pallas_gpu, "FORWARD_TILES", tiles)
    monkeypatch.setattr(pallas_gpu, "BACKWARD_TILES", tiles)
    seed_int = zlib.crc32(why.encode())
    q, k, v, do = _inputs(seed_int, t, h, hk, 64, dtype)
    seed = jnp.int32(seed_int % 2 ** 31)
    drop = dict(dropout_rate=0.25, dropout_seed=seed)
    out, *grads = _out_and_grads(pattern, q, k, v, do, block_k=bk, **drop)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref, ref_vjp = jax.vjp(lambda q, k, v: reference_attention(q, k, v, pattern, **drop), *f32)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert _rel(out, ref) < tol, ("out", _rel(out, ref))
    assert _rel(out, reference_attention(*f32, pattern)) > 0.1  # it did drop
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_vjp(do.astype(jnp.float32))):
        assert _rel(g, r) < tol, (name, _rel(g, r))


def test_unsupported_inputs_raise():
    q = jnp.zeros((1, 256, 1, 64), jnp.float32)
    with pytest.raises(UnsupportedInput, match="float32 only in interpret"):
        sparse_attention_gpu(q, q, q, patterns.local_strided(32, 32))
    qb = q.astype(jnp.bfloat16)
    with pytest.raises(UnsupportedInput, match="head_dim"):
        sparse_attention_gpu(qb[..., :32], qb[..., :32], qb[..., :32], patterns.dense())
    with pytest.raises(UnsupportedInput, match="multiple of 128"):
        sparse_attention_gpu(qb[:, :192], qb[:, :192], qb[:, :192], patterns.dense())
    with pytest.raises(UnsupportedInput, match="heads"):  # per-head patterns: sparse_attention splits them
        sparse_attention_gpu(qb, qb, qb, patterns.heads(patterns.dense(), patterns.local(32)))


def test_lowers_for_cuda_at_benchmark_shape(seq=2048):
    """Mosaic GPU accepts the forward and the backward kernels (layouts, wgmma/TMA shapes, shared
    memory under the H100's 227 KiB) at the benchmark shape: bf16, 16 heads, head_dim 128, w = s = 256.
    Longer sequences change only the grid. PTX compilation itself happens only on a GPU."""
    x = jax.ShapeDtypeStruct((1, seq, 16, 128), jnp.bfloat16)
    pattern = patterns.local_strided(256, 256)
    loss = lambda q, k, v: jnp.sum(sparse_attention_gpu(q, k, v, pattern).astype(jnp.float32))
    # the gradient runs the forward kernels (custom_vjp fwd) and the dq and dk/dv kernels of both passes
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 6
    # The strided pass reads q, k, v, dO and writes o, dq, dk, dv in place, merges the band pass's
    # (o, lse) in its forward epilogue and adds the band pass's gradients in its backward ones: XLA
    # transposes only the [B, H, T] row statistics and does no elementwise work on a [B, T, H, D]
    # array (delta = rowsum(dO * o) is a dot).
    lines = text.splitlines()
    transposes = [line for line in lines if "stablehlo.transpose" in line]
    assert transposes and not [t for t in transposes if "x128xbf16>" in t or "x128xf32>" in t]
    elementwise = ("stablehlo.add", "stablehlo.multiply", "stablehlo.divide", "stablehlo.exponential")
    assert not [line for line in lines if line.strip().split(" = ")[-1].startswith(elementwise) and "x16x128x" in line]


def test_strided_pass_runs_in_place_when_residues_tile_evenly():
    from kernels.pallas_gpu import in_place
    from kernels.schedule import passes_for

    def strided_in_place(t, stride, blocks):
        band, strided = passes_for(patterns.local_strided(stride, stride), t)
        assert not in_place(band, t, blocks) and strided.residue_major
        return in_place(strided, t, blocks)

    assert strided_in_place(2048, 256, (64, 128))       # 8 rows per residue: 8 and 16 per block
    assert strided_in_place(32768, 256, (64, 128))      # 128 rows: one residue per block
    assert strided_in_place(256, 4, (64, 128))          # 64 rows: a query tile is one, a key block two
    assert not strided_in_place(128, 64, (64, 64))      # 2 rows per residue: below the 8-row group
    assert not strided_in_place(24576, 256, (64, 128))  # 96 rows: blocks would straddle residues


def test_transposed_fallback_gives_the_in_place_result(monkeypatch):
    """STRIDED_IN_PLACE=False (the first version, kept to compare on a GPU): same outputs and gradients."""
    from kernels import pallas_gpu

    pattern = patterns.local_strided(16, 16)
    q, k, v, do = _inputs(21, 128, 2, 1, 64, jnp.float32)

    def run():
        return _out_and_grads(pattern, q, k, v, do)

    fused = run()
    monkeypatch.setattr(pallas_gpu, "STRIDED_IN_PLACE", False)
    assert not pallas_gpu.in_place(pallas_gpu.passes_for(pattern, 128)[1], 128, (64, 64))
    for name, a, b in zip(("out", "dq", "dk", "dv"), fused, run()):
        assert _rel(a, b) < 1e-5, (name, _rel(a, b))


def test_block_ranges_match_brute_force_schedules():
    """schedule.row_tile_range / col_tile_range (what the GPU kernel computes on scalars) against
    forward_schedule / transposed_schedule: every visited block inside the range, every block of the
    no-mask sub-range FULL, and exactly the schedule's blocks when tiles do not pack segments."""
    import itertools

    from kernels.schedule import FULL, SKIP, SummaryMask, col_tile_range, forward_schedule, row_tile_range, \
        transposed_schedule

    def check(ranges, sched, exact):
        for t, (lo, hi, f_lo, f_hi) in enumerate(ranges):
            kinds = {int(b): int(k) for b, k in zip(sched.index[t], sched.kind[t]) if k != SKIP}
            assert lo <= f_lo <= f_hi <= hi and all(lo <= b < hi for b in kinds)
            assert all(kinds.get(b) == FULL for b in range(f_lo, f_hi))
            if exact:
                assert set(kinds) == set(range(lo, hi)) or (not kinds and lo == hi)
                assert {b for b, k in kinds.items() if k == FULL} == set(range(f_lo, f_hi))

    T = 256
    masks = [DiagonalMask(T), DiagonalMask(T, 0, 15), DiagonalMask(T, 0, 40)]
    masks += [DiagonalMask(L, off) for L in (4, 16, 64, 128) for off in (0, 1, 3)]
    for m, (bq, bk) in itertools.product(masks, itertools.product((16, 64), (32, 64))):
        exact = m.seg_len == T or max(bq, bk) <= m.seg_len
        rows = [[int(x) for x in row_tile_range(m, T, t * bq, bq, bk)] for t in range(T // bq)]
        check(rows, forward_schedule(m, T, bq, bk), exact)
        cols = [[int(x) for x in col_tile_range(m, T, c * bk, bk, bq)] for c in range(T // bk)]
        check(cols, transposed_schedule(m, T, bq, bk), exact)
    # fixed's summary pass: natural queries against the gathered keys (padded to whole blocks); exact
    for (block, c), (bq, bk) in itertools.product(((16, 4), (32, 8), (64, 24), (128, 128)),
                                                  itertools.product((16, 64), (32, 64))):
        m, n_keys = SummaryMask(block, c), -(-T // block * c // bk) * bk
        rows = [[int(x) for x in row_tile_range(m, T, t * bq, bq, bk)] for t in range(T // bq)]
        check(rows, forward_schedule(m, T, bq, bk, n_keys), True)
        cols = [[int(x) for x in col_tile_range(m, T, c0 * bk, bk, bq)] for c0 in range(n_keys // bk)]
        check(cols, transposed_schedule(m, T, bq, bk, n_keys), True)
