"""Pallas Mosaic TPU kernel for dense, local, strided and local+strided causal attention (fwd + bwd).

Route (see kernels/schedule.py): a pattern is one or two passes, each a flash-attention over a
block-sparse list of key blocks given to the kernel by scalar prefetch, so skipped blocks cost no
DMA and no MXU work:
  band pass      natural layout, key blocks within the window of each query tile;
  strided pass   residue-major layout (an XLA transpose of q/k/v per residue), a causal attention
                 with a diagonal offset, residues packed block-diagonally when T/S is small.
The two passes' (o, lse) are merged elementwise. The backward recomputes scores from the merged lse
(P = exp(S - lse), dS = P * (dP - rowsum(dO * o))), per pass, with a dq kernel that walks the forward
lists and a dk/dv kernel that walks the transposed lists; the passes' gradients add.

Arrays inside are [batch, heads, seq, head_dim]; the public entry takes [batch, seq, heads, head_dim].
Grouped-query attention: the kernels index kv head h // group; dk/dv are computed per query head and
summed over each group in XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.errors import UnsupportedInput, check_pattern_and_shapes
from kernels.patterns import Pattern
from kernels.schedule import FULL, PARTIAL, DiagonalMask, Pass, forward_schedule, merge_partials, \
    passes_for, transposed_schedule

# A large finite negative instead of -inf, so that exp(m_prev - m_new) never sees -inf - -inf.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)
SUPPORTED_KINDS = ("dense", "local", "strided", "local_strided")


def default_block(seq_len: int, cap: int = 512) -> int:
    """Largest power of two <= cap dividing seq_len (at least 8, the TPU sublane count)."""
    b = cap
    while b >= 8:
        if seq_len % b == 0:
            return b
        b //= 2
    raise UnsupportedInput(f"sequence length {seq_len} must be a multiple of 8 for the pallas_tpu kernel")


def default_block_for(pattern: Pattern, seq_len: int) -> int:
    """Tile size when none is given: 512 for dense/strided work; for a band, about the window (at least
    128, the MXU width), because a query tile visits ceil((window - 1) / b) + 1 key blocks of b, so
    tiles much wider than the window mostly compute masked-out pairs."""
    cap = 512
    if pattern.window:
        cap = max(128, min(512, 1 << (pattern.window.bit_length() - 1)))
    return default_block(seq_len, cap)


def residue_pass_block(block: int, seq_len: int, stride: int, floor: int = 128) -> int:
    """Tile of the strided pass: a tile holding many short residues computes mostly masked-out pairs
    (block-diagonal), so shrink it towards the residue length T/S, but not below `floor` (MXU width)."""
    target = max(seq_len // stride, floor)
    while block > target and block % 2 == 0 and (block // 2) % 8 == 0:
        block //= 2
    return block


def check_supported(q, k, v, pattern: Pattern, block_q: int, block_k: int) -> None:
    """Raise UnsupportedInput (a ValueError) naming what to change."""
    check_pattern_and_shapes("pallas_tpu", q, k, v, pattern, SUPPORTED_KINDS)
    b, t, h, d = q.shape
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in SUPPORTED_DTYPES:
            raise UnsupportedInput(f"pallas_tpu supports float32 and bfloat16 inputs; {name} is {x.dtype}")
    if d % 8 or d > 512:
        raise UnsupportedInput(f"pallas_tpu needs head_dim a multiple of 8 and <= 512 (128 is best), got {d}")
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if blk % 8 or t % blk:
            raise UnsupportedInput(f"{name}={blk} must be a multiple of 8 dividing the sequence length {t}")
    pattern.check_seq_len(t)


# ----------------------------------------------------------------------------------------------- masks

def _visible(mask: DiagonalMask, seq_len: int, r0, c0, rows: int, cols: int):
    """Boolean [rows, cols] tile of `mask` with the tile's first row r0 and first column c0."""
    i = r0 + lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
    j = c0 + lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
    d = i - j
    vis = d >= mask.lo
    if mask.hi < seq_len:
        vis = vis & (d <= mask.hi)
    if mask.seg_len < seq_len:  # packed residues: block-diagonal
        vis = vis & (lax.div(i, mask.seg_len) == lax.div(j, mask.seg_len))
    return vis


def _when_visited(kind, body):
    """Run body(apply_mask) for PARTIAL blocks with the mask, for FULL blocks without it."""
    pl.when(kind == PARTIAL)(lambda: body(True))
    pl.when(kind == FULL)(lambda: body(False))


def _dot_t(a, b):
    """a @ b.T with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _t_dot(a, b):
    """a.T @ b with float32 accumulation (an explicit transpose, the form Mosaic lowers everywhere)."""
    return jnp.dot(a.T, b, preferred_element_type=jnp.float32)


# --------------------------------------------------------------------------------------------- forward

def _fwd_kernel(index_ref, kind_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *,
                mask, seq_len, block_q, block_k, steps, scale):
    qt, s = pl.program_id(2), pl.program_id(3)

    @pl.when(s == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    flat = qt * steps + s

    def update(apply_mask):
        scores = _dot_t(q_ref[...], k_ref[...]) * scale
        if apply_mask:
            vis = _visible(mask, seq_len, qt * block_q, index_ref[flat] * block_k, block_q, block_k)
            scores = jnp.where(vis, scores, MASK_VALUE)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, scores.max(axis=1, keepdims=True))
        p = jnp.exp(scores - m_new)
        if apply_mask:  # a row with no visible key in this tile must add nothing
            p = jnp.where(vis, p, 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + p.sum(axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + jnp.dot(p.astype(v_ref.dtype), v_ref[...],
                                                    preferred_element_type=jnp.float32)
        m_sc[...] = m_new

    _when_visited(kind_ref[flat], update)

    @pl.when(s == steps - 1)
    def _finish():
        l = l_sc[...]
        empty = l == 0.0  # no visible key in the whole pass: o = 0, lse = -inf
        o_ref[...] = (acc_sc[...] / jnp.where(empty, 1.0, l)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, -jnp.inf, m_sc[...] + jnp.log(jnp.where(empty, 1.0, l)))


def _pass_forward(q, k, v, mask, *, block_q, block_k, out_dtype, interpret):
    """q: [B, H, T, D], k/v: [B, Hk, T, D] -> o [B, H, T, D] (out_dtype), lse [B, H, T, 1] f32."""
    b, h, t, d = q.shape
    group = h // k.shape[1]
    sched = forward_schedule(mask, t, block_q, block_k)
    index, kind = sched.flat()
    steps = sched.steps
    q_spec = pl.BlockSpec((None, None, block_q, d), lambda bi, hi, qt, s, idx, knd: (bi, hi, qt, 0))
    kv_spec = pl.BlockSpec((None, None, block_k, d),
                           lambda bi, hi, qt, s, idx, knd: (bi, hi // group, idx[qt * steps + s], 0))
    lse_spec = pl.BlockSpec((None, None, block_q, 1), lambda bi, hi, qt, s, idx, knd: (bi, hi, qt, 0))
    kernel = functools.partial(_fwd_kernel, mask=mask, seq_len=t, block_q=block_q, block_k=block_k,
                               steps=steps, scale=d ** -0.5)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(b, h, t // block_q, steps),
            in_specs=[q_spec, kv_spec, kv_spec], out_specs=[q_spec, lse_spec],
            scratch_shapes=[pltpu.VMEM((block_q, 1), jnp.float32), pltpu.VMEM((block_q, 1), jnp.float32),
                            pltpu.VMEM((block_q, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((b, h, t, d), out_dtype),
                   jax.ShapeDtypeStruct((b, h, t, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="sparse_attention_fwd",
    )(jnp.asarray(index), jnp.asarray(kind), q, k, v)


# -------------------------------------------------------------------------------------------- backward

def _dq_kernel(index_ref, kind_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc, *,
               mask, seq_len, block_q, block_k, steps, scale):
    qt, s = pl.program_id(2), pl.program_id(3)

    @pl.when(s == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    flat = qt * steps + s

    def update(apply_mask):
        k = k_ref[...]
        p = jnp.exp(_dot_t(q_ref[...], k) * scale - lse_ref[...])
        if apply_mask:
            vis = _visible(mask, seq_len, qt * block_q, index_ref[flat] * block_k, block_q, block_k)
            p = jnp.where(vis, p, 0.0)
        dp = _dot_t(do_ref[...], v_ref[...])
        ds = p * (dp - delta_ref[...])
        dq_sc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    _when_visited(kind_ref[flat], update)

    @pl.when(s == steps - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(index_ref, kind_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                dk_sc, dv_sc, *, mask, seq_len, block_q, block_k, steps, scale):
    kt, s = pl.program_id(2), pl.program_id(3)

    @pl.when(s == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    flat = kt * steps + s

    def update(apply_mask):
        q, do = q_ref[...], do_ref[...]
        p = jnp.exp(_dot_t(q, k_ref[...]) * scale - lse_ref[...])  # [block_q, block_k]
        if apply_mask:
            vis = _visible(mask, seq_len, index_ref[flat] * block_q, kt * block_k, block_q, block_k)
            p = jnp.where(vis, p, 0.0)
        dv_sc[...] += _t_dot(p.astype(do.dtype), do)
        dp = _dot_t(do, v_ref[...])
        ds = p * (dp - delta_ref[...])
        dk_sc[...] += _t_dot(ds.astype(q.dtype), q)

    _when_visited(kind_ref[flat], update)

    @pl.when(s == steps - 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _pass_backward(q, k, v, do, lse, delta, mask, *, block_q, block_k, interpret):
    """Gradients of one pass. lse, delta: [B, H, T, 1] f32. Returns dq [B,H,T,D] f32 and dk, dv per
    query head [B, H, T, D] f32 (the caller sums GQA groups)."""
    b, h, t, d = q.shape
    group = h // k.shape[1]
    scale = d ** -0.5
    params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))
    static = dict(mask=mask, seq_len=t, block_q=block_q, block_k=block_k, scale=scale)

    fwd = forward_schedule(mask, t, block_q, block_k)
    index, kind = fwd.flat()
    steps = fwd.steps
    row = lambda blk, w: pl.BlockSpec((None, None, blk, w), lambda bi, hi, r, s, idx, knd: (bi, hi, r, 0))
    kv_col = pl.BlockSpec((None, None, block_k, d),
                          lambda bi, hi, r, s, idx, knd: (bi, hi // group, idx[r * steps + s], 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, steps=steps, **static),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(b, h, t // block_q, steps),
            in_specs=[row(block_q, d), kv_col, kv_col, row(block_q, d), row(block_q, 1), row(block_q, 1)],
            out_specs=row(block_q, d),
            scratch_shapes=[pltpu.VMEM((block_q, d), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((b, h, t, d), jnp.float32),
        compiler_params=params, interpret=interpret, name="sparse_attention_dq",
    )(jnp.asarray(index), jnp.asarray(kind), q, k, v, do, lse, delta)

    bwd = transposed_schedule(mask, t, block_q, block_k)
    index, kind = bwd.flat()
    steps = bwd.steps
    q_col = lambda w: pl.BlockSpec((None, None, block_q, w),
                                   lambda bi, hi, r, s, idx, knd: (bi, hi, idx[r * steps + s], 0))
    kv_row = pl.BlockSpec((None, None, block_k, d), lambda bi, hi, r, s, idx, knd: (bi, hi // group, r, 0))
    out_row = pl.BlockSpec((None, None, block_k, d), lambda bi, hi, r, s, idx, knd: (bi, hi, r, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, steps=steps, **static),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(b, h, t // block_k, steps),
            in_specs=[q_col(d), kv_row, kv_row, q_col(d), q_col(1), q_col(1)],
            out_specs=[out_row, out_row],
            scratch_shapes=[pltpu.VMEM((block_k, d), jnp.float32), pltpu.VMEM((block_k, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((b, h, t, d), jnp.float32)] * 2,
        compiler_params=params, interpret=interpret, name="sparse_attention_dkv",
    )(jnp.asarray(index), jnp.asarray(kind), q, k, v, do, lse, delta)
    return dq, dk, dv


# ------------------------------------------------------------------------------------ layouts, passes

def _to_residue_major(x, stride):
    """[B, H, T, X] -> [B, H, T, X] with flat index r*P + p holding position p*S + r."""
    b, h, t, d = x.shape
    return x.reshape(b, h, t // stride, stride, d).swapaxes(2, 3).reshape(b, h, t, d)


def _from_residue_major(x, stride):
    b, h, t, d = x.shape
    return x.reshape(b, h, stride, t // stride, d).swapaxes(2, 3).reshape(b, h, t, d)


def _layout(p: Pass):
    if p.residue_major:
        return (lambda x: _to_residue_major(x, p.stride)), (lambda x: _from_residue_major(x, p.stride))
    ident = lambda x: x
    return ident, ident


def _pass_blocks(p: Pass, seq_len, block_q, block_k):
    if not p.residue_major:
        return block_q, block_k
    return (residue_pass_block(block_q, seq_len, p.stride), residue_pass_block(block_k, seq_len, p.stride))


def _forward_bhtd(q, k, v, pattern, block_q, block_k, interpret):
    passes = passes_for(pattern, q.shape[2])
    out_dtype = q.dtype if len(passes) == 1 else jnp.float32  # merging wants f32 partials
    partials = []
    for p in passes:
        to, back = _layout(p)
        bq, bk = _pass_blocks(p, q.shape[2], block_q, block_k)
        o, lse = _pass_forward(to(q), to(k), to(v), p.mask, block_q=bq, block_k=bk,
                               out_dtype=out_dtype, interpret=interpret)
        partials.append((back(o), back(lse)))
    if len(partials) == 1:
        return partials[0]
    (o1, l1), (o2, l2) = partials
    o, lse = merge_partials(o1, l1[..., 0], o2, l2[..., 0], xp=jnp)
    return o.astype(q.dtype), lse[..., None]


def _backward_bhtd(q, k, v, o, lse, do, pattern, block_q, block_k, interpret):
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
    b, h, t, d = q.shape
    hk = k.shape[1]
    dq = jnp.zeros((b, h, t, d), jnp.float32)
    dk = jnp.zeros((b, h, t, d), jnp.float32)
    dv = jnp.zeros((b, h, t, d), jnp.float32)
    for p in passes_for(pattern, t):
        to, back = _layout(p)
        bq, bk = _pass_blocks(p, t, block_q, block_k)
        g = _pass_backward(to(q), to(k), to(v), to(do), to(lse), to(delta), p.mask,
                           block_q=bq, block_k=bk, interpret=interpret)
        dq, dk, dv = dq + back(g[0]), dk + back(g[1]), dv + back(g[2])
    dk = dk.reshape(b, hk, h // hk, t, d).sum(axis=2)
    dv = dv.reshape(b, hk, h // hk, t, d).sum(axis=2)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


# ------------------------------------------------------------------------------------------ public API

def _bhtd(x):
    return x.transpose(0, 2, 1, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _attention(q, k, v, pattern, block_q, block_k, interpret):
    o, _ = _forward_bhtd(_bhtd(q), _bhtd(k), _bhtd(v), pattern, block_q, block_k, interpret)
    return _bhtd(o)


def _attention_fwd(q, k, v, pattern, block_q, block_k, interpret):
    o, lse = _forward_bhtd(_bhtd(q), _bhtd(k), _bhtd(v), pattern, block_q, block_k, interpret)
    return _bhtd(o), (q, k, v, o, lse)


def _attention_bwd(pattern, block_q, block_k, interpret, res, do):
    q, k, v, o, lse = res
    dq, dk, dv = _backward_bhtd(_bhtd(q), _bhtd(k), _bhtd(v), o, lse, _bhtd(do), pattern,
                                block_q, block_k, interpret)
    return _bhtd(dq), _bhtd(dk), _bhtd(dv)


_attention.defvjp(_attention_fwd, _attention_bwd)


def sparse_attention_tpu(q, k, v, pattern: Pattern, *, block_q: int | None = None,
                         block_k: int | None = None, interpret=None):
    """Causal sparse attention on TPU. q: [B, T, H, D], k/v: [B, T, Hk, D] -> [B, T, H, D] in q.dtype.

    block_q/block_k default to `default_block_for(pattern, T)`; the strided pass shrinks them with
    `residue_pass_block`. interpret: None runs the
    TPU interpreter (pltpu.InterpretParams()) off-TPU and compiles on TPU; True/False/InterpretParams
    force it.
    """
    t = q.shape[1]
    block_q = block_q or default_block_for(pattern, t)
    block_k = block_k or default_block_for(pattern, t)
    check_supported(q, k, v, pattern, block_q, block_k)
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    if interpret is True:
        interpret = pltpu.InterpretParams()
    return _attention(q, k, v, pattern, block_q, block_k, interpret or False)
