"""The Pallas Mosaic TPU kernels of one pass: forward, dq, and dk/dv (flash attention over block lists).

Each pass is a flash attention whose key blocks per query tile come from `schedule.forward_schedule`
by scalar prefetch, one grid step per visited block (`schedule.VisitList`: no padding steps), so a
skipped block costs no DMA, no MXU work and no step; the BlockSpecs come from the
pass's `TileLayout` (kernels/pallas_tpu_layout.py). A later pass can take an earlier pass's results
as a `partial` and finish the job in its epilogue:

- forward: the earlier (o, lse) start the online softmax (m = lse, l = 1, acc = o is the state that
  one block with exactly that output and log-sum-exp leaves), so the last pass writes the merged o;
- backward: the earlier f32 dq (or dk, dv) is added before the last pass writes its dtype.

The dk/dv kernel works on transposed scores, S^T = K Q^T [block_k, block_q] (as splash attention does):
the lane-dense row statistics then broadcast along its sublanes, and dV = P^T dO, dK = dS^T Q are plain
matmuls, with no transpose of P or dS in the loop.

A tile holds several heads (`TileLayout.heads_per_block`); the kernels loop over them
(kernels/pallas_tpu_heads.py), each head with its own softmax statistics. Row statistics cross HBM
lane-dense, (heads, 8, rows) tiles, in both directions.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import dropout as dropout_hash
from kernels.pallas_tpu_heads import TileHeads, column, lanes, row
from kernels.pallas_tpu_layout import SUBLANES, TileLayout, lanes_spec
from kernels.schedule import FULL, PARTIAL, DiagonalMask, SummaryMask, forward_schedule, transposed_schedule

# A large finite negative instead of -inf, so that exp(m_prev - m_new) never sees -inf - -inf.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# grid (batch, head block, visit): a tile's visits are consecutive steps that accumulate in scratch
# 64 MiB of scoped VMEM: 8 heads of 256-row tiles, double-buffered, pass v5e's 16 MiB default (128 MiB physical)
SEMANTICS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                 vmem_limit_bytes=64 * 2**20)
OWN = lambda s, rows, cols: rows[s]     # the tile a step works for (its output)  # noqa: E731
OTHER = lambda s, rows, cols: cols[s]   # the block it visits  # noqa: E731


def _visible(mask: DiagonalMask | SummaryMask, seq_len: int, r0, c0, rows: int, cols: int, transposed=False):
    """Boolean [rows, cols] tile of `mask` with the tile's first row r0 and first column c0
    ([cols, rows], keys along the sublanes, when transposed)."""
    shape, row_axis = ((cols, rows), 1) if transposed else ((rows, cols), 0)
    i = r0 + lax.broadcasted_iota(jnp.int32, shape, row_axis)
    j = c0 + lax.broadcasted_iota(jnp.int32, shape, 1 - row_axis)
    if isinstance(mask, SummaryMask):  # gathered summary key j of an earlier block than query i's
        return j < mask.threshold(i, lax.div)
    d = i - j
    vis = d >= mask.lo
    if mask.hi < seq_len:
        vis = vis & (d <= mask.hi)
    if mask.seg_len < seq_len:  # packed residues: block-diagonal
        vis = vis & (lax.div(i, mask.seg_len) == lax.div(j, mask.seg_len))
    return vis


def _dropout_keep(drop, seeds_ref, tile: TileHeads, j: int, seq_len: int, r0, c0, rows: int, cols: int,
                  transposed=False):
    """Head j's dropout mask of a [rows, cols] score tile, queries from r0 and keys from c0 ([cols,
    rows] when transposed): kernels/dropout.py's bits for the head's seed (seeds_ref: `_seed_inputs`'s
    block) and the tile's sequence positions."""
    head_seed = seeds_ref[pl.program_id(0) % SUBLANES, pl.program_id(1) * tile.heads + j]
    q_shape, k_shape = ((1, rows), (cols, 1)) if transposed else ((rows, 1), (1, cols))
    qpos = dropout_hash.positions(r0 + lax.broadcasted_iota(jnp.int32, q_shape, 1 if transposed else 0),
                                  seq_len, drop.stride)
    kpos = drop.key_positions(c0 + lax.broadcasted_iota(jnp.int32, k_shape, 0 if transposed else 1), seq_len)
    return dropout_hash.keep(dropout_hash.row_keys(head_seed, qpos), kpos, drop.dropout)


@dataclasses.dataclass(frozen=True)
class PassDropout:
    """Attention dropout in one pass's kernels: the rate, and how the pass's flat rows map to positions.
    Kept probabilities are scaled by 1 / (1 - rate) as they are used, so partials chain and the
    epilogues stay those of plain attention."""
    dropout: dropout_hash.Dropout
    stride: int = 0  # a residue-major pass's stride (flat r*P + p is position p*S + r); 0: natural
    # fixed's summary pass, (block, c): gathered key g is position (g // c) * block + block - c + g % c
    summary: tuple = ()

    def key_positions(self, flat, seq_len: int):
        if not self.summary:
            return dropout_hash.positions(flat, seq_len, self.stride)
        return dropout_hash.gathered_positions(flat, *self.summary)

    def drop(self, keep, x):
        return jnp.where(keep, x * self.dropout.scale, 0.0)


def _seed_inputs(drop, seeds):
    """(extra kernel inputs, their BlockSpecs) for attention dropout, none without it: the [B, H] int32
    seeds padded to [8k, 128m], so that a step's block is the (8, 128m) one holding its batch row, in
    SMEM (read as scalars), a few KiB whatever the batch."""
    if not drop:
        return [], []
    b, h = seeds.shape
    padded = jnp.pad(seeds, ((0, -b % SUBLANES), (0, -h % 128)))
    spec = pl.BlockSpec((SUBLANES, padded.shape[1]), lambda b, h, s, *_: (b // SUBLANES, 0), memory_space=pltpu.SMEM)
    return [padded], [spec]


def _when_visited(kind, body):
    """Run body(apply_mask) for PARTIAL blocks with the mask, for FULL blocks without it."""
    pl.when(kind == PARTIAL)(lambda: body(True))
    pl.when(kind == FULL)(lambda: body(False))


def _dot_t(a, b):
    """a @ b.T with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
    """a @ b with float32 accumulation."""
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _tile(layout: TileLayout, kv_layout: TileLayout) -> TileHeads:
    """How a grid step's heads sit in its tiles: the key-side tile holds the same heads, or under
    grouped-query attention in place their kv heads."""
    if layout.in_place != kv_layout.in_place or layout.heads_per_block % kv_layout.heads_per_block:
        raise ValueError("q and kv layouts must both be in place or both transposed, with matching heads")
    return TileHeads(layout.heads_per_block, layout.heads_per_block // kv_layout.heads_per_block, layout.in_place)


def _kv_head(layout: TileLayout, group: int):
    """Index map of the key-side head block for query head block h: the same block index in place (its
    block holds h's kv heads), h // group transposed (one head a tile under GQA)."""
    return (lambda h: h) if layout.in_place else (lambda h: h // group)


# --------------------------------------------------------------------------------------------- forward

def _fwd_kernel(rows_ref, cols_ref, kind_ref, first_ref, last_ref, q_ref, k_ref, v_ref, *refs, mask, seq_len,
                block_q, block_k, scale, tile: TileHeads, has_partial, drop: PassDropout | None):
    refs = list(refs)
    o_part_ref, lse_part_ref = (refs.pop(0), refs.pop(0)) if has_partial else (None, None)
    seeds_ref = refs.pop(0) if drop else None
    o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    s = pl.program_id(2)
    qt, kb = rows_ref[s], cols_ref[s]

    @pl.when(first_ref[s] == 1)
    def _init():
        if not has_partial:
            m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
            l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
            acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)
            return
        for j in range(tile.heads):  # rows the earlier pass saw nothing for have lse = -inf (and o = 0): start empty
            lse = column(lse_part_ref, j)
            seen = lse > -jnp.inf
            m_sc[j] = jnp.where(seen, lse, MASK_VALUE)
            l_sc[j] = seen.astype(jnp.float32)
            acc_sc[j] = tile.q(o_part_ref, j).astype(jnp.float32)

    def update(apply_mask):
        if apply_mask:
            vis = _visible(mask, seq_len, qt * block_q, kb * block_k, block_q, block_k)
        for j in range(tile.heads):
            k, v = tile.kv(k_ref, j), tile.kv(v_ref, j)
            scores = _dot_t(tile.q(q_ref, j), k) * scale
            if apply_mask:
                scores = jnp.where(vis, scores, MASK_VALUE)
            m_prev = m_sc[j]
            m_new = jnp.maximum(m_prev, scores.max(axis=1, keepdims=True))
            p = jnp.exp(scores - m_new)
            if apply_mask:  # a row with no visible key in this tile must add nothing
                p = jnp.where(vis, p, 0.0)
            alpha = jnp.exp(m_prev - m_new)
            l_sc[j] = alpha * l_sc[j] + p.sum(axis=1, keepdims=True)  # every probability, dropped or not
            m_sc[j] = m_new
            if drop:  # O takes the kept ones, scaled
                keep = _dropout_keep(drop, seeds_ref, tile, j, seq_len, qt * block_q, kb * block_k, block_q, block_k)
                p = drop.drop(keep, p)
            acc_sc[j] = alpha * acc_sc[j] + _dot(p.astype(v.dtype), v)

    _when_visited(kind_ref[s], update)

    @pl.when(last_ref[s] == 1)
    def _finish():
        for j in range(tile.heads):
            l = l_sc[j]  # [rows, 1]
            empty = l == 0.0  # no visible key in the whole pass: o = 0, lse = -inf
            l = jnp.where(empty, 1.0, l)
            tile.store(o_ref, j, acc_sc[j] / l)
            lse_ref[j] = lanes(jnp.where(empty, -jnp.inf, m_sc[j] + jnp.log(l)))


def pass_forward(q, k, v, mask: DiagonalMask | SummaryMask, layout: TileLayout, *, batch, heads, kv_heads,
                 block_q, block_k, out_dtype, kv_layout: TileLayout | None = None, partial=None, interpret=False,
                 drop: PassDropout | None = None, seeds=None):
    """One pass's forward. q and partial[0] in `layout`, k and v in `kv_layout` (default: `layout`);
    partial[1] and the returned lse are lane-dense, [B, H, 8, T] float32 in the pass's order
    (`TileLayout.lanes_to`). Returns (o in `layout`, out_dtype; lse). drop, seeds ([B, H] int32):
    attention dropout; lse stays that of the undropped probabilities."""
    t, d = layout.seq_len, layout.head_dim
    kv_layout = kv_layout or layout
    tile = _tile(layout, kv_layout)
    visits = forward_schedule(mask, t, block_q, block_k, kv_layout.seq_len).visits()
    q_spec = layout.spec(block_q, OWN, lambda h: h)
    kv_spec = kv_layout.spec(block_k, OTHER, _kv_head(kv_layout, heads // kv_heads))
    lse_spec = lanes_spec(block_q, tile.heads, OWN)
    seed_args, seed_specs = _seed_inputs(drop, seeds)
    in_specs = [q_spec, kv_spec, kv_spec] + ([q_spec, lse_spec] if partial is not None else []) + seed_specs
    kernel = functools.partial(_fwd_kernel, mask=mask, seq_len=t, block_q=block_q, block_k=block_k,
                               scale=d ** -0.5, tile=tile, has_partial=partial is not None, drop=drop)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5, grid=(batch, heads // tile.heads, len(visits)),
            in_specs=in_specs, out_specs=[q_spec, lse_spec],
            scratch_shapes=[pltpu.VMEM((tile.heads, block_q, 1), jnp.float32),
                            pltpu.VMEM((tile.heads, block_q, 1), jnp.float32),
                            pltpu.VMEM(layout.tile_shape(block_q), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(layout.shape(batch, heads), out_dtype),
                   jax.ShapeDtypeStruct((batch, heads, SUBLANES, t), jnp.float32)],
        compiler_params=SEMANTICS, interpret=interpret, name="sparse_attention_fwd",
    )(*map(jnp.asarray, visits.prefetch()), q, k, v, *(partial or ()), *seed_args)


# -------------------------------------------------------------------------------------------- backward

def _dq_kernel(rows_ref, cols_ref, kind_ref, first_ref, last_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               *refs, mask, seq_len, block_q, block_k, scale, tile: TileHeads, has_partial, drop: PassDropout | None):
    refs = list(refs)
    dq_part_ref = refs.pop(0) if has_partial else None
    seeds_ref = refs.pop(0) if drop else None
    dq_ref, dq_sc = refs
    s = pl.program_id(2)
    qt, kb = rows_ref[s], cols_ref[s]

    @pl.when(first_ref[s] == 1)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def update(apply_mask):
        if apply_mask:
            vis = _visible(mask, seq_len, qt * block_q, kb * block_k, block_q, block_k)
        for j in range(tile.heads):
            k, v = tile.kv(k_ref, j), tile.kv(v_ref, j)
            p = jnp.exp(_dot_t(tile.q(q_ref, j), k) * scale - column(lse_ref, j))
            if apply_mask:
                p = jnp.where(vis, p, 0.0)
            dp = _dot_t(tile.q(do_ref, j), v)
            if drop:  # dP through the dropout
                keep = _dropout_keep(drop, seeds_ref, tile, j, seq_len, qt * block_q, kb * block_k, block_q, block_k)
                dp = drop.drop(keep, dp)
            ds = p * (dp - column(delta_ref, j))
            dq_sc[j] += _dot(ds.astype(k.dtype), k)

    _when_visited(kind_ref[s], update)

    @pl.when(last_ref[s] == 1)
    def _finish():
        for j in range(tile.heads):
            dq = dq_sc[j] * scale
            if has_partial:
                dq = dq + tile.q(dq_part_ref, j)
            tile.store(dq_ref, j, dq)


def _dkv_kernel(rows_ref, cols_ref, kind_ref, first_ref, last_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                *refs, mask, seq_len, block_q, block_k, scale, tile: TileHeads, has_partial, drop: PassDropout | None):
    refs = list(refs)
    dk_part_ref, dv_part_ref = (refs.pop(0), refs.pop(0)) if has_partial else (None, None)
    seeds_ref = refs.pop(0) if drop else None
    dk_ref, dv_ref, dk_sc, dv_sc = refs
    s = pl.program_id(2)
    kt, qb = rows_ref[s], cols_ref[s]

    @pl.when(first_ref[s] == 1)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def update(apply_mask):
        if apply_mask:
            vis = _visible(mask, seq_len, qb * block_q, kt * block_k, block_q, block_k, transposed=True)
        for j in range(tile.heads):  # transposed scores [block_k, block_q], statistics as [1, block_q] rows
            q, do = tile.q(q_ref, j), tile.q(do_ref, j)
            k, v = tile.kv(k_ref, j), tile.kv(v_ref, j)
            p = jnp.exp(_dot_t(k, q) * scale - row(lse_ref, j))
            if apply_mask:
                p = jnp.where(vis, p, 0.0)
            dp = _dot_t(v, do)
            p_kept = p
            if drop:  # dV sums the kept probabilities, dP goes through the dropout
                keep = _dropout_keep(drop, seeds_ref, tile, j, seq_len, qb * block_q, kt * block_k, block_q, block_k,
                                     transposed=True)
                p_kept, dp = drop.drop(keep, p), drop.drop(keep, dp)
            dv_sc[j] += _dot(p_kept.astype(do.dtype), do)
            ds = p * (dp - row(delta_ref, j))
            dk_sc[j] += _dot(ds.astype(q.dtype), q)

    _when_visited(kind_ref[s], update)

    @pl.when(last_ref[s] == 1)
    def _finish():  # dk, dv per query head: the output tiles hold the query heads (store, not kv)
        for j in range(tile.heads):
            dk, dv = dk_sc[j] * scale, dv_sc[j]
            if has_partial:
                dk, dv = dk + tile.q(dk_part_ref, j), dv + tile.q(dv_part_ref, j)
            tile.store(dk_ref, j, dk)
            tile.store(dv_ref, j, dv)


def pass_backward(q, k, v, do, lse, delta, mask: DiagonalMask | SummaryMask, layout: TileLayout, *, batch, heads,
                  kv_heads, block_q, block_k, dq_dtype, dkv_dtype, kv_layout: TileLayout | None = None,
                  dq_partial=None, dkv_partial=None, interpret=False, drop: PassDropout | None = None, seeds=None):
    """Gradients of one pass. q, do, dq_partial in `layout`; k, v in `kv_layout` (default: `layout`);
    dkv_partial in `kv_layout` with the query heads; lse, delta lane-dense, [B, H, 8, T] f32 in the pass's
    order (`TileLayout.lanes_to`). The partials (None or the earlier passes' f32 dq, and (dk, dv) per
    query head) are added before writing. Returns dq (dq_dtype, in `layout`) and dk, dv per query head
    (dkv_dtype, in `kv_layout`)."""
    t, n_keys = layout.seq_len, (kv_layout or layout).seq_len
    kv_layout = kv_layout or layout
    tile = _tile(layout, kv_layout)
    kv_head = _kv_head(kv_layout, heads // kv_heads)
    dkv_layout = dataclasses.replace(kv_layout, heads_per_block=tile.heads)  # per query head
    static = dict(mask=mask, seq_len=t, block_q=block_q, block_k=block_k, scale=layout.head_dim ** -0.5,
                  tile=tile, drop=drop)
    seed_args, seed_specs = _seed_inputs(drop, seeds)
    prefetch = lambda visits: tuple(map(jnp.asarray, visits.prefetch()))  # noqa: E731

    fwd = forward_schedule(mask, t, block_q, block_k, n_keys).visits()
    q_row = layout.spec(block_q, OWN, lambda h: h)
    kv_col = kv_layout.spec(block_k, OTHER, kv_head)
    stat_row = lanes_spec(block_q, tile.heads, OWN)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, has_partial=dq_partial is not None, **static),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5, grid=(batch, heads // tile.heads, len(fwd)),
            in_specs=([q_row, kv_col, kv_col, q_row, stat_row, stat_row] + ([q_row] if dq_partial is not None else [])
                      + seed_specs),
            out_specs=q_row,
            scratch_shapes=[pltpu.VMEM(layout.tile_shape(block_q), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(layout.shape(batch, heads), dq_dtype),
        compiler_params=SEMANTICS, interpret=interpret, name="sparse_attention_dq",
    )(*prefetch(fwd), q, k, v, do, lse, delta, *([dq_partial] if dq_partial is not None else []), *seed_args)

    bwd = transposed_schedule(mask, t, block_q, block_k, n_keys).visits()
    q_col = layout.spec(block_q, OTHER, lambda h: h)
    stat_col = lanes_spec(block_q, tile.heads, OTHER)
    kv_row = kv_layout.spec(block_k, OWN, kv_head)
    dkv_row = dkv_layout.spec(block_k, OWN, lambda h: h)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, has_partial=dkv_partial is not None, **static),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5, grid=(batch, heads // tile.heads, len(bwd)),
            in_specs=([q_col, kv_row, kv_row, q_col, stat_col, stat_col] + [dkv_row] * len(dkv_partial or ())
                      + seed_specs),
            out_specs=[dkv_row, dkv_row],
            scratch_shapes=[pltpu.VMEM(dkv_layout.tile_shape(block_k), jnp.float32)] * 2),
        out_shape=[jax.ShapeDtypeStruct(dkv_layout.shape(batch, heads), dkv_dtype)] * 2,
        compiler_params=SEMANTICS, interpret=interpret, name="sparse_attention_dkv",
    )(*prefetch(bwd), q, k, v, do, lse, delta, *(dkv_partial or ()), *seed_args)
    return dq, dk, dv
