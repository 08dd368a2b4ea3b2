"""The three Mosaic GPU kernels of one attention pass: forward, dq, and dk/dv (H100, wgmma + TMA).

Each kernel is a flash-attention over one pass's `DiagonalMask` (kernels/schedule.py) on arrays laid
out [batch, seq, heads, head_dim]. A residue-major pass (the strided one) either reads them in place
(`PassConfig.residues`: strided TMA copies, see `pallas_gpu_parts.row_pieces`) or gets XLA-transposed
copies. The pieces they share (the TMA ring of a memory warpgroup feeding the compute warpgroups,
row copies, masks, the wgmma accumulate) are in kernels/pallas_gpu_parts.py.

Scores are kept in log2 units (exp2 on the MUFU). Masked scores are -inf; the running max is
replaced by 0 for the exp when it is still -inf, so a row with no visible key so far adds nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import pallas_gpu_parts as parts
from kernels.pallas_gpu_parts import PassConfig
from kernels.schedule import col_tile_range, row_tile_range


# --------------------------------------------------------------------------------------------- forward

def pass_forward(q, k, v, cfg: PassConfig, partial=None, seeds=None):
    """q: [B, T, H, D], k/v: [B, T, Hk, D] -> o [B, T, H, D] (q.dtype), lse [B, H, T] f32 (natural
    log; -inf for rows with no visible key, whose o is 0).

    partial: (o, lse) of an earlier pass over other keys of the same rows, laid out as this pass's
    (o, lse); the epilogue merges it by logsumexp (schedule.merge_partials), so the result is the
    attention over both passes' keys and the partial never makes an XLA round trip.

    seeds: [B, H] int32 per-head dropout seeds, when cfg.dropout is set. The kept probabilities
    enter O and the undropped ones the normalizer, so lse is that of plain attention."""
    B, T, H, D = cfg.dims(q)
    Hk = cfg.dims(k)[2]
    group = H // Hk
    W, bq, bk, slots, dtype = cfg.compute_wgs, cfg.block_q, cfg.block_k, cfg.slots, q.dtype
    scale2 = D ** -0.5 * parts.LOG2E

    inputs = (q, k, v) + tuple(partial or ()) + ((seeds,) if cfg.dropout else ())

    def body(*refs):
        q_ref, k_ref, v_ref, *part = refs[:len(inputs)]
        seeds_ref = part.pop() if cfg.dropout else None
        (o_ref, lse_ref, q_smem, k_smem, v_smem, lse_smem, q_bar, ready, consumed,
         *optional) = refs[len(inputs):]
        part_smem, part_lse_smem, part_bar = optional[:3] if part else (None, None, None)
        o_smem = part_smem if part else (optional[0] if cfg.tiles > 1 else q_smem)  # o's staging buffer
        turn = optional[3 if part else (1 if cfg.tiles > 1 else 0):]  # the ping-pong barrier, when there is one
        b, h, cta, wg = parts.program()
        kvh = lax.div(h, group)
        head_seed = seeds_ref[b, h] if cfg.dropout else None
        tile0 = lambda t: (cta * cfg.tiles + t) * (W * bq)  # noqa: E731  first row of the CTA's t-th tile
        r0 = lambda t: tile0(t) + wg * bq  # noqa: E731  this warpgroup's first row of it
        ranges_of = lambda t: parts.cta_ranges(row_tile_range, tile0(t), cfg, bq, bk, wg)  # noqa: E731

        issue = parts.kv_issue(cfg, k_ref, v_ref, k_smem, v_smem, ready, b, kvh, Hk)

        # Ping-pong: every block costs each compute warpgroup two rounds on the `turn` barrier (one
        # while its S = QK^T runs, one after its softmax), skipped blocks included, and warpgroup 1
        # starts each tile one round late, so the two alternate between matmuls and softmax. The
        # leader is then at most one block ahead, so it never waits for a ring slot that only the
        # other one's release can free: that needs 2 slots (with 1 the two would wait for each other).
        pingpong = bool(turn)

        def take_turn():
            plgpu.barrier_arrive(turn[0])
            plgpu.barrier_wait(turn[0])

        def step(row0, blk, slot, carry, masked):  # row0: this warpgroup's first row of the tile
            acc, m, l = carry
            s = parts.mma(None, q_smem.at[wg], k_smem.at[slot].T, cfg.interpret,
                     after_issue=take_turn if pingpong else None) * scale2
            if masked:
                s = jnp.where(parts.visible(cfg.mask, T, row0, blk * bk, s.shape), s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=1))
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp2(s - parts.per_row(m_use, s.shape))
            alpha = jnp.exp2(m - m_use)
            l = l * alpha + p.sum(axis=1)
            if cfg.dropout:  # dropped from O only: l sums every probability (1 / (1 - rate) in the epilogue)
                p = jnp.where(parts.dropout_keep(cfg, head_seed, row0, blk * bk, p.shape), p, 0.0)
            if pingpong:
                take_turn()
            acc = parts.mma(acc * parts.per_row(alpha, acc.shape), p.astype(dtype), v_smem.at[slot], cfg.interpret)
            return acc, m_new, l

        compute = parts.stream(wg, cfg, ranges_of, issue, step, ready, consumed,
                               skipped=(lambda: (take_turn(), take_turn())) if pingpong else None, tile_ctx=r0)

        @pl.when(wg < W)
        def _compute():
            rows = lambda t: parts.row_pieces(cfg, b, r0(t), bq, h, H)  # noqa: E731

            def load_q(t):
                parts.load_rows(q_ref, q_smem.at[wg], q_bar.at[wg], rows(t))

            def load_partial(t):  # the earlier pass's o and lse of these rows land while the keys stream
                parts.load_rows(part[0], part_smem.at[wg], part_bar.at[wg], rows(t))
                plgpu.copy_gmem_to_smem(part[1].at[b, h, pl.ds(r0(t), bq)], part_lse_smem.at[wg], part_bar.at[wg])

            def begin(t):
                plgpu.barrier_wait(q_bar.at[wg])
                if pingpong:
                    pl.when(wg == 1)(take_turn)
                acc0 = plgpu.layout_cast(jnp.zeros((bq, D), jnp.float32), plgpu.Layout.WGMMA)
                m0 = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                l0 = plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                return acc0, m0, l0

            def epilogue(t, carry):
                acc, m, l = carry
                if pingpong:
                    pl.when(wg == 0)(take_turn)
                if part and cfg.dropout:  # the partial's o is scaled by 1 / (1 - rate) already: so is acc
                    acc = acc * cfg.dropout.scale
                if part:
                    # o = (w1 o1 + acc 2^(m - m*)) / (w1 + l 2^(m - m*)), w1 = 2^(lse1 - m*), in log2 units
                    # with m* the larger of lse1 and this pass's log2 sum; rows empty in both give 0, -inf.
                    plgpu.barrier_wait(part_bar.at[wg])
                    lse1 = plgpu.load(part_lse_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1)) * parts.LOG2E
                    own = jnp.where(l == 0.0, -jnp.inf, m + jnp.log2(jnp.where(l == 0.0, 1.0, l)))
                    top = jnp.maximum(lse1, own)
                    top = jnp.where(top == -jnp.inf, 0.0, top)
                    w1 = jnp.exp2(lse1 - top)
                    w2 = jnp.exp2(m - top)
                    o1 = plgpu.load(part_smem.at[wg], layout=plgpu.Layout.WGMMA).astype(jnp.float32)
                    acc = parts.per_row(w1, acc.shape) * o1 + acc * parts.per_row(w2, acc.shape)
                    l, m = w1 + l * w2, top
                empty = l == 0.0
                l_safe = jnp.where(empty, 1.0, l)
                norm = l_safe * (1.0 - cfg.dropout.rate) if cfg.dropout and not part else l_safe
                o_smem.at[wg][...] = (acc / parts.per_row(norm, acc.shape)).astype(dtype)
                lse_smem.at[wg][...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * parts.LN2)
                plgpu.commit_smem()
                parts.store_rows(o_smem.at[wg], o_ref, rows(t))
                plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(r0(t), bq)])

            parts.run_tiles(cfg, compute, begin, epilogue, load_q, load_partial if part else None)

    tr = parts.transforms(dtype)
    scratch = [plgpu.SMEM((W, bq, D), dtype, transforms=tr),
               plgpu.SMEM((slots, bk, D), dtype, transforms=tr),
               plgpu.SMEM((slots, bk, D), dtype, transforms=tr),
               plgpu.SMEM((W, bq), jnp.float32),
               plgpu.Barrier(num_arrivals=cfg.pieces(bq), num_barriers=W),
               plgpu.Barrier(num_arrivals=2 * cfg.pieces(bk), num_barriers=slots),
               plgpu.Barrier(num_arrivals=W, num_barriers=slots)]
    if partial:  # the earlier pass's o and lse rows, and the barrier they arrive on (o's staging too)
        scratch += [plgpu.SMEM((W, bq, D), dtype, transforms=tr), plgpu.SMEM((W, bq), jnp.float32),
                    plgpu.Barrier(num_arrivals=cfg.pieces(bq) + 1, num_barriers=W)]
    elif cfg.tiles > 1:  # o's staging, so that q's buffer can take the next tile's rows during the epilogue
        scratch.append(plgpu.SMEM((W, bq, D), dtype, transforms=tr))
    if cfg.pingpong and W == 2 and slots >= 2:
        scratch.append(plgpu.Barrier(num_arrivals=W))  # `turn`
    out_type = [jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((B, H, T), jnp.float32)]
    return parts.launch(body, cfg, out_type, scratch, grid(cfg, H, T, W * bq, B), "fwd")(*inputs)


def grid(cfg: PassConfig, heads, seq, tile_rows, batch):
    """(heads, CTAs a head, batch): each CTA runs cfg.tiles tiles of tile_rows rows."""
    if (seq // tile_rows) % cfg.tiles:
        raise ValueError(f"{cfg.tiles} tiles a CTA do not divide the {seq // tile_rows} tiles of a head")
    return heads, seq // (tile_rows * cfg.tiles), batch


# -------------------------------------------------------------------------------------------- backward

def pass_dq(q, k, v, do, lse2, delta, cfg: PassConfig, partial=None, out_dtype=jnp.float32, seeds=None):
    """dq of one pass [B, T, H, D] in out_dtype (float32, or q.dtype for the last pass), plus
    `partial` (float32 dq of the earlier passes, laid out as q) when given. lse2: [B, H, T] merged
    lse in log2 units (+inf for rows with no key at all); delta: [B, H, T] rowsum(dO * o)."""
    B, T, H, D = cfg.dims(q)
    Hk = cfg.dims(k)[2]
    group = H // Hk
    W, bq, bk, slots, dtype = cfg.compute_wgs, cfg.block_q, cfg.block_k, cfg.slots, q.dtype
    scale = D ** -0.5

    inputs = (q, k, v, do, lse2, delta) + (() if partial is None else (partial,)) + ((seeds,) if cfg.dropout else ())

    # With several tiles a CTA, the next tile's q and dO load during this tile's epilogue, so a 16-bit
    # dq is staged in a buffer of its own rather than in q's.
    low_apart = cfg.tiles > 1 and jnp.dtype(out_dtype) != jnp.float32

    def body(*refs):
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *part = refs[:len(inputs)]
        seeds_ref = part.pop() if cfg.dropout else None
        (dq_ref, q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem, out_smem, *low, res_bar, part_bar,
         ready, consumed) = refs[len(inputs):]
        low_smem = low[0] if low_apart else q_smem
        b, h, cta, wg = parts.program()
        kvh = lax.div(h, group)
        tile0 = lambda t: (cta * cfg.tiles + t) * (W * bq)  # noqa: E731  first row of the CTA's t-th tile
        r0 = lambda t: tile0(t) + wg * bq  # noqa: E731
        ranges_of = lambda t: parts.cta_ranges(row_tile_range, tile0(t), cfg, bq, bk, wg)  # noqa: E731
        head_seed = seeds_ref[b, h] if cfg.dropout else None

        issue = parts.kv_issue(cfg, k_ref, v_ref, k_smem, v_smem, ready, b, kvh, Hk)

        def step(row0, blk, slot, carry, masked):
            dq, lse, delta = carry
            s = parts.mma(None, q_smem.at[wg], k_smem.at[slot].T, cfg.interpret)
            p = jnp.exp2(s * (scale * parts.LOG2E) - parts.per_row(lse, s.shape))
            if masked:
                p = jnp.where(parts.visible(cfg.mask, T, row0, blk * bk, s.shape), p, 0.0)
            dp = parts.mma(None, do_smem.at[wg], v_smem.at[slot].T, cfg.interpret)
            if cfg.dropout:  # dP through the dropout: dO V^T / (1 - rate) where kept, 0 where dropped
                kept = parts.dropout_keep(cfg, head_seed, row0, blk * bk, dp.shape)
                dp = jnp.where(kept, dp * cfg.dropout.scale, 0.0)
            ds = p * (dp - parts.per_row(delta, dp.shape))
            dq = parts.mma(dq, ds.astype(dtype), k_smem.at[slot], cfg.interpret)
            return dq, lse, delta

        compute = parts.stream(wg, cfg, ranges_of, issue, step, ready, consumed, tile_ctx=r0)

        @pl.when(wg < W)
        def _compute():
            rows = lambda t: parts.row_pieces(cfg, b, r0(t), bq, h, H)  # noqa: E731

            def load_resident(t):
                parts.load_rows(q_ref, q_smem.at[wg], res_bar.at[wg], rows(t))
                parts.load_rows(do_ref, do_smem.at[wg], res_bar.at[wg], rows(t))
                plgpu.copy_gmem_to_smem(lse_ref.at[b, h, pl.ds(r0(t), bq)], lse_smem.at[wg], res_bar.at[wg])
                plgpu.copy_gmem_to_smem(delta_ref.at[b, h, pl.ds(r0(t), bq)], delta_smem.at[wg], res_bar.at[wg])

            def load_partial(t):  # lands in the staging buffer while the key blocks stream
                parts.load_rows(part[0], out_smem.at[wg], part_bar.at[wg], rows(t))

            def begin(t):
                plgpu.barrier_wait(res_bar.at[wg])
                lse = plgpu.load(lse_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
                delta = plgpu.load(delta_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
                return plgpu.layout_cast(jnp.zeros((bq, D), jnp.float32), plgpu.Layout.WGMMA), lse, delta

            def epilogue(t, carry):
                bar = part_bar.at[wg] if part else None
                parts.write_rows(carry[0] * scale, rows(t), dq_ref, out_smem.at[wg], low_smem.at[wg], bar)

            parts.run_tiles(cfg, compute, begin, epilogue, load_resident, load_partial if part else None)

    tr = parts.transforms(dtype)
    scratch = [plgpu.SMEM((W, bq, D), dtype, transforms=tr), plgpu.SMEM((W, bq, D), dtype, transforms=tr),
               plgpu.SMEM((W, bq), jnp.float32), plgpu.SMEM((W, bq), jnp.float32),
               plgpu.SMEM((slots, bk, D), dtype, transforms=tr), plgpu.SMEM((slots, bk, D), dtype, transforms=tr),
               plgpu.SMEM((W, bq, D), jnp.float32),
               *([plgpu.SMEM((W, bq, D), out_dtype, transforms=tr)] if low_apart else []),
               plgpu.Barrier(num_arrivals=2 * cfg.pieces(bq) + 2, num_barriers=W),
               plgpu.Barrier(num_arrivals=cfg.pieces(bq), num_barriers=W),
               plgpu.Barrier(num_arrivals=2 * cfg.pieces(bk), num_barriers=slots),
               plgpu.Barrier(num_arrivals=W, num_barriers=slots)]
    out_type = jax.ShapeDtypeStruct(q.shape, out_dtype)
    return parts.launch(body, cfg, out_type, scratch, grid(cfg, H, T, W * bq, B), "dq")(*inputs)


def pass_dkv(q, k, v, do, lse2, delta, cfg: PassConfig, partials=None, out_dtype=jnp.float32, seeds=None):
    """dk, dv of one pass per query head, [B, T, H, D] each in out_dtype (the caller sums GQA groups),
    plus `partials` (float32 dk, dv of the earlier passes, laid out as q) when given. For fixed's
    summary pass, k and v are the cfg.key_len gathered keys, and so are dk and dv."""
    B, T, H, D = cfg.dims(q)
    Hk = cfg.dims(k)[2]
    group = H // Hk
    W, bq, bk, slots, dtype = cfg.compute_wgs, cfg.block_q, cfg.block_k, cfg.slots, q.dtype
    scale = D ** -0.5

    inputs = (q, k, v, do, lse2, delta) + tuple(partials or ()) + ((seeds,) if cfg.dropout else ())

    # With several tiles a CTA, the next tile's k and v load during this tile's epilogue, so 16-bit
    # dk and dv are staged in a buffer of their own rather than in k's and v's.
    low_apart = cfg.tiles > 1 and jnp.dtype(out_dtype) != jnp.float32

    def body(*refs):
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *part = refs[:len(inputs)]
        seeds_ref = part.pop() if cfg.dropout else None
        (dk_ref, dv_ref, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, out_smem, *low, res_bar,
         part_bar, ready, consumed) = refs[len(inputs):]
        low_k, low_v = (low[0], low[0]) if low_apart else (k_smem, v_smem)
        b, h, cta, wg = parts.program()
        kvh = lax.div(h, group)
        tile0 = lambda t: (cta * cfg.tiles + t) * (W * bk)  # noqa: E731  first key row of the CTA's t-th tile
        c0 = lambda t: tile0(t) + wg * bk  # noqa: E731
        ranges_of = lambda t: parts.cta_ranges(col_tile_range, tile0(t), cfg, bk, bq, wg)  # noqa: E731
        head_seed = seeds_ref[b, h] if cfg.dropout else None

        def issue(t, blk, slot):
            src = parts.row_pieces(cfg, b, blk * bq, bq, h, H)
            parts.load_rows(q_ref, q_smem.at[slot], ready.at[slot], src)
            parts.load_rows(do_ref, do_smem.at[slot], ready.at[slot], src)
            plgpu.copy_gmem_to_smem(lse_ref.at[b, h, pl.ds(blk * bq, bq)], lse_smem.at[slot], ready.at[slot])
            plgpu.copy_gmem_to_smem(delta_ref.at[b, h, pl.ds(blk * bq, bq)], delta_smem.at[slot], ready.at[slot])

        def step(col0, blk, slot, carry, masked):  # col0: this warpgroup's first key row of the tile
            dk, dv = carry
            st = parts.mma(None, k_smem.at[wg], q_smem.at[slot].T, cfg.interpret)  # [bk, bq]
            lse = plgpu.load(lse_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
            pt = jnp.exp2(st * (scale * parts.LOG2E) - parts.per_col(lse, st.shape))
            if masked:  # visible(i = query, j = key) on the transposed tile
                pt = jnp.where(parts.visible(cfg.mask, T, blk * bq, col0, st.shape, transposed=True), pt, 0.0)
            pt_kept = pt
            if cfg.dropout:  # dV sums the kept probabilities (1 / (1 - rate) in the epilogue)
                kept = parts.dropout_keep(cfg, head_seed, blk * bq, col0, st.shape, transposed=True)
                pt_kept = jnp.where(kept, pt, 0.0)
            dv = parts.mma(dv, pt_kept.astype(dtype), do_smem.at[slot], cfg.interpret)
            dpt = parts.mma(None, v_smem.at[wg], do_smem.at[slot].T, cfg.interpret)
            if cfg.dropout:
                dpt = jnp.where(kept, dpt * cfg.dropout.scale, 0.0)
            delta = plgpu.load(delta_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
            dst = pt * (dpt - parts.per_col(delta, dpt.shape))
            dk = parts.mma(dk, dst.astype(dtype), q_smem.at[slot], cfg.interpret)
            return dk, dv

        compute = parts.stream(wg, cfg, ranges_of, issue, step, ready, consumed, tile_ctx=c0)

        @pl.when(wg < W)
        def _compute():
            rows = lambda t: parts.row_pieces(cfg, b, c0(t), bk, kvh, Hk)  # noqa: E731  k, v rows
            out = lambda t: parts.row_pieces(cfg, b, c0(t), bk, h, H)  # noqa: E731  dk, dv rows (per query head)

            def load_resident(t):
                parts.load_rows(k_ref, k_smem.at[wg], res_bar.at[wg], rows(t))
                parts.load_rows(v_ref, v_smem.at[wg], res_bar.at[wg], rows(t))

            def load_partial(t):  # dk's partial lands in the staging buffer while the query blocks stream
                parts.load_rows(part[0], out_smem.at[wg], part_bar.at[wg], out(t))

            def begin(t):
                plgpu.barrier_wait(res_bar.at[wg])
                zero = plgpu.layout_cast(jnp.zeros((bk, D), jnp.float32), plgpu.Layout.WGMMA)
                return zero, zero

            def epilogue(t, carry):
                dk, dv = carry
                bar = part_bar.at[wg] if part else None
                parts.write_rows(dk * scale, out(t), dk_ref, out_smem.at[wg], low_k.at[wg], bar)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the staging buffers are free again
                if part:
                    parts.load_rows(part[1], out_smem.at[wg], part_bar.at[wg], out(t))
                dv = dv * cfg.dropout.scale if cfg.dropout else dv
                parts.write_rows(dv, out(t), dv_ref, out_smem.at[wg], low_v.at[wg], bar)

            parts.run_tiles(cfg, compute, begin, epilogue, load_resident, load_partial if part else None)

    tr = parts.transforms(dtype)
    scratch = [plgpu.SMEM((W, bk, D), dtype, transforms=tr), plgpu.SMEM((W, bk, D), dtype, transforms=tr),
               plgpu.SMEM((slots, bq, D), dtype, transforms=tr), plgpu.SMEM((slots, bq, D), dtype, transforms=tr),
               plgpu.SMEM((slots, bq), jnp.float32), plgpu.SMEM((slots, bq), jnp.float32),
               plgpu.SMEM((W, bk, D), jnp.float32),
               *([plgpu.SMEM((W, bk, D), out_dtype, transforms=tr)] if low_apart else []),
               plgpu.Barrier(num_arrivals=2 * cfg.pieces(bk), num_barriers=W),
               plgpu.Barrier(num_arrivals=cfg.pieces(bk), num_barriers=W),
               plgpu.Barrier(num_arrivals=2 * cfg.pieces(bq) + 2, num_barriers=slots),
               plgpu.Barrier(num_arrivals=W, num_barriers=slots)]
    out_type = [jax.ShapeDtypeStruct(k.shape[:2] + q.shape[2:], out_dtype)] * 2  # per query head
    return parts.launch(body, cfg, out_type, scratch, grid(cfg, H, cfg.keys, W * bk, B), "dkv")(*inputs)
