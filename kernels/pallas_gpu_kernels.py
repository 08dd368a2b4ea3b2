"""The three Mosaic GPU kernels of one attention pass: forward, dq, and dk/dv (H100, wgmma + TMA).

Each kernel is a flash-attention over one pass's `DiagonalMask` (kernels/schedule.py) on arrays laid
out [batch, seq, heads, head_dim]. A residue-major pass (the strided one) either reads them in place
(`PassConfig.residues`: strided TMA copies, see `_row_pieces`) or gets XLA-transposed copies.
A CTA owns `W` tiles of 64 rows (one per compute warpgroup) and one memory warpgroup that streams
the other operand's blocks through a ring of `slots` shared-memory buffers with TMA:

    memory WG   for blk in [cta_lo, cta_hi): wait consumed[slot]; TMA blk -> ring[slot], arrive ready[slot]
    compute WG  for blk in [cta_lo, cta_hi): wait ready[slot]; work on it (or skip); arrive consumed[slot]

[cta_lo, cta_hi) is the union of the warpgroups' own ranges from `schedule.row_tile_range` /
`col_tile_range` (computed on int32 scalars in the kernel, so no block lists need to reach it). Each
warpgroup runs five loops over that range: skip, masked, unmasked, masked, skip; a skipped block is
still waited for and released, because Mosaic GPU barriers track their phase per waiter.

Scores are kept in log2 units (exp2 on the MUFU). Masked scores are -inf; the running max is
replaced by 0 for the exp when it is still -inf, so a row with no visible key so far adds nothing.

Accumulation: `_mma` adds a wgmma product to a register accumulator. Compiled, it passes the
accumulator to wgmma (`pl.run_state`, as jax's attention_mgpu does); the GPU interpreter cannot run
`run_state`, so under interpretation it computes the product in a fresh scoped accumulator and adds
it. The arithmetic is the same; only that one call differs between the two modes.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.schedule import DiagonalMask, col_tile_range, row_tile_range

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
ROWS = 64  # rows of one compute warpgroup's tile (the wgmma M dimension)


@dataclasses.dataclass(frozen=True)
class PassConfig:
    """Static description of one kernel launch (hashable)."""
    mask: DiagonalMask
    seq_len: int
    block_q: int  # query rows per tile (fwd/dq: per warpgroup; dkv: streamed block)
    block_k: int  # key rows per tile (fwd/dq: streamed block; dkv: per warpgroup)
    compute_wgs: int = 2
    slots: int = 2
    interpret: object = False
    # > 0: a residue-major pass read and written in place (see _row_pieces): the [B, T, H, D] arrays
    # arrive reshaped to [B, T/S, S*H, D] (a free reshape), and flat row r*P + p is position p*S + r.
    residues: int = 0
    # Forward only: the two compute warpgroups take turns on the tensor cores (FA3's ping-pong, as
    # jax's attention_mgpu does), so one's softmax overlaps the other's matmuls.
    pingpong: bool = True

    def dims(self, x):
        """(batch, seq, heads, head_dim) of a [B, T, H, D] operand, however it arrived."""
        b, _, h, d = x.shape
        return b, self.seq_len, (h // self.residues if self.residues else h), d

    def pieces(self, n: int) -> int:
        """TMA copies that move n flat rows of one head: 1, or one per residue when residues are short."""
        seg = self.seq_len // self.residues if self.residues else n
        return max(1, n // seg)


def _div(a, b):
    return lax.div(jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32))


def _transforms(dtype):
    """TMA/wgmma shared-memory layout: 128-byte swizzle, tiles of (8, 128 bytes)."""
    return (plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(128))


def _mma(acc, a, b, interpret, after_issue=None):
    """acc + a @ b with wgmma (acc None: a fresh product). a: registers or SMEM, b: SMEM.
    after_issue (fresh products from SMEM only): runs between issuing the wgmma and waiting for it."""
    def product(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        if after_issue is not None:
            after_issue()
        return acc_ref[...]
    shape = (a.shape[0], b.shape[1])
    in_regs = not hasattr(a, "transforms") and not hasattr(a, "ref")  # an array, not a (transformed) ref
    if interpret and in_regs:
        # The interpreter's wgmma takes SMEM operands only; the same product from the registers.
        prod = jnp.dot(a, b[...], preferred_element_type=jnp.float32)
        return prod if acc is None else acc + prod
    if acc is None:
        return pl.run_scoped(product, plgpu.ACC(shape, jnp.float32))
    if interpret:
        return acc + pl.run_scoped(product, plgpu.ACC(shape, jnp.float32))
    return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, a, b))(plgpu.ACC.init(acc))


def _visible(mask: DiagonalMask, seq_len, queries0, keys0, shape, transposed=False):
    """Boolean tile of `mask` in the WGMMA register layout, for queries i from queries0 and keys j
    from keys0: i along dimension 0 and j along 1, or the other way round when transposed."""
    qdim, kdim = (1, 0) if transposed else (0, 1)
    i = queries0 + plgpu.broadcasted_iota(jnp.int32, shape, qdim, layout=plgpu.Layout.WGMMA)
    j = keys0 + plgpu.broadcasted_iota(jnp.int32, shape, kdim, layout=plgpu.Layout.WGMMA)
    d = i - j
    vis = d >= mask.lo
    if mask.hi < seq_len:
        vis = vis & (d <= mask.hi)
    if mask.seg_len < seq_len:  # packed residues: block-diagonal
        seg = jnp.full(shape, mask.seg_len, jnp.int32)
        vis = vis & (lax.div(i, seg) == lax.div(j, seg))
    return vis


def _rows(x, shape):
    return lax.broadcast_in_dim(x, shape, [0])


def _cols(x, shape):
    return lax.broadcast_in_dim(x, shape, [1])


def _stream(wg, cfg: PassConfig, ranges, issue, step, ready, consumed, skipped=None):
    """Run the memory warpgroup (issue(blk, slot) starts the TMA copies of block blk into ring slot)
    and, on each compute warpgroup, step(blk, slot, carry, masked) over its own range.
    ranges: per-warpgroup (lo, hi, full_lo, full_hi) of the calling warpgroup, and the CTA union.
    skipped(): runs for each block of the union the warpgroup skips (to keep in step with the others).
    Returns compute(carry) -> final carry, for the caller to run on its compute warpgroups."""
    (lo, hi, f_lo, f_hi), (cta_lo, cta_hi) = ranges
    slots = cfg.slots

    @pl.when(wg == cfg.compute_wgs)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        for i in range(slots):
            pl.when(cta_lo + i < cta_hi)(functools.partial(issue, cta_lo + i, i))

        @pl.loop(cta_lo + slots, cta_hi)
        def _refill(blk):
            slot = lax.rem(blk - cta_lo, slots)
            plgpu.barrier_wait(consumed.at[slot])
            issue(blk, slot)

        # Observe the last releases too, so every waiter has seen every phase of every barrier
        # (the interpreter checks it; on the GPU it only keeps this warpgroup until the CTA ends).
        @pl.loop(jnp.maximum(cta_lo, cta_hi - slots), cta_hi)
        def _drain(blk):
            plgpu.barrier_wait(consumed.at[lax.rem(blk - cta_lo, slots)])

    def visit(mode, blk, carry):
        slot = lax.rem(blk - cta_lo, slots)
        plgpu.barrier_wait(ready.at[slot])
        if mode != "skip":
            carry = step(blk, slot, carry, mode == "masked")
            if cfg.interpret:
                # The interpreter orders generic-proxy reads before the next TMA (async proxy) write
                # into the slot only through a proxy fence; on the GPU the mbarrier release suffices
                # for this write-after-read (as in CUTLASS's TMA pipelines), so compiled code skips it.
                plgpu.commit_smem()
        elif skipped is not None:
            skipped()
        plgpu.barrier_arrive(consumed.at[slot])
        return carry

    def compute(carry):
        plgpu.set_max_registers(232 if cfg.compute_wgs == 2 else 240, action="increase")
        for mode, a, b in (("skip", cta_lo, lo), ("masked", lo, f_lo), ("full", f_lo, f_hi),
                           ("masked", f_hi, hi), ("skip", hi, cta_hi)):
            carry = lax.fori_loop(a, b, functools.partial(visit, mode), carry)
        return carry

    return compute


def _cta_ranges(range_fn, tile0, cfg: PassConfig, rows, blk, wg):
    """Own range of warpgroup `wg` and the union over the CTA's warpgroups."""
    per_wg = [range_fn(cfg.mask, cfg.seq_len, tile0 + w * rows, rows, blk, xp=jnp, div=_div)
              for w in range(cfg.compute_wgs)]
    cta_lo = functools.reduce(jnp.minimum, [r[0] for r in per_wg])
    cta_hi = jnp.maximum(functools.reduce(jnp.maximum, [r[1] for r in per_wg]), cta_lo)
    own = range_fn(cfg.mask, cfg.seq_len, tile0 + wg * rows, rows, blk, xp=jnp, div=_div)
    return own, (cta_lo, cta_hi)


def _row_pieces(cfg: PassConfig, b, f0, n: int, head, heads: int):
    """Where flat rows [f0, f0 + n) of one head live: a list of (GMEM index, SMEM row slice or None).

    Natural layout: one piece, rows f0.. of the [B, T, H, D] array. Residue-major in place (arrays
    [B, P, S*H, D], P = T/S; flat row r*P + p is position p*S + r, i.e. [b, p, r*H + head]): one
    strided piece when the rows lie in one residue (P a multiple of n), else one piece per residue
    (n a multiple of P), each filling P rows of the tile. pallas_gpu checks that one of them holds
    and that P is a multiple of 8 (the swizzled tile's row group), so SMEM slices stay aligned."""
    if not cfg.residues:
        return [((b, pl.ds(f0, n), head), None)]
    seg = cfg.seq_len // cfg.residues
    if seg >= n:
        return [((b, pl.ds(lax.rem(f0, seg), n), lax.div(f0, seg) * heads + head), None)]
    r0 = lax.div(f0, seg)
    return [((b, pl.ds(0, seg), (r0 + i) * heads + head), pl.ds(i * seg, seg)) for i in range(n // seg)]


def _load_rows(src, dst, barrier, pieces):
    for index, rows in pieces:
        plgpu.copy_gmem_to_smem(src.at[index], dst if rows is None else dst.at[rows], barrier)


def _store_rows(src, dst, pieces):
    for index, rows in pieces:
        plgpu.copy_smem_to_gmem(src if rows is None else src.at[rows], dst.at[index])


def _kv_issue(cfg: PassConfig, k_ref, v_ref, k_smem, v_smem, ready, b, kvh, kv_heads: int):
    """The copies a pass issues for key block `blk` into ring slot `slot`: its K and V rows of kv
    head `kvh`, all arriving on the slot's `ready` barrier (2 * cfg.pieces(block_k) arrivals)."""
    bk = cfg.block_k

    def issue(blk, slot):
        pieces = _row_pieces(cfg, b, blk * bk, bk, kvh, kv_heads)
        _load_rows(k_ref, k_smem.at[slot], ready.at[slot], pieces)
        _load_rows(v_ref, v_smem.at[slot], ready.at[slot], pieces)
    return issue


def _write_rows(acc, rows, out_ref, f32_stage, low_stage, partial_bar=None):
    """Store a warpgroup's f32 tile `acc` to `rows` of out_ref, in out_ref's dtype (staged through
    f32_stage, or low_stage for 16-bit outputs). With partial_bar, an earlier pass's f32 partial was
    sent into f32_stage on that barrier: it is added first, so the passes' sum never makes a round
    trip through memory in XLA. Each thread reads and writes only its own WGMMA-layout elements."""
    if partial_bar is not None:
        plgpu.barrier_wait(partial_bar)
        acc = acc + plgpu.load(f32_stage, layout=plgpu.Layout.WGMMA)
    if out_ref.dtype == jnp.float32:
        f32_stage[...] = acc
        stage = f32_stage
    else:
        low_stage[...] = acc.astype(out_ref.dtype)
        stage = low_stage
    plgpu.commit_smem()  # also fences those generic reads before any later TMA write into f32_stage
    _store_rows(stage, out_ref, rows)


def _program():
    return (lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("tiles"), lax.axis_index("wg"))


def _launch(body, cfg, out_type, scratch, grid):
    return plgpu.kernel(body, out_type=out_type, scratch_types=scratch, grid=grid,
                        grid_names=("heads", "tiles", "batch"), num_threads=cfg.compute_wgs + 1,
                        thread_name="wg", compiler_params=plgpu.CompilerParams(approx_math=True),
                        interpret=cfg.interpret)


# --------------------------------------------------------------------------------------------- forward

def pass_forward(q, k, v, cfg: PassConfig, partial=None):
    """q: [B, T, H, D], k/v: [B, T, Hk, D] -> o [B, T, H, D] (q.dtype), lse [B, H, T] f32 (natural
    log; -inf for rows with no visible key, whose o is 0).

    partial: (o, lse) of an earlier pass over other keys of the same rows, laid out as this pass's
    (o, lse); the epilogue merges it by logsumexp (schedule.merge_partials), so the result is the
    attention over both passes' keys and the partial never makes an XLA round trip."""
    B, T, H, D = cfg.dims(q)
    Hk = cfg.dims(k)[2]
    group = H // Hk
    W, bq, bk, slots, dtype = cfg.compute_wgs, cfg.block_q, cfg.block_k, cfg.slots, q.dtype
    scale2 = D ** -0.5 * LOG2E

    inputs = (q, k, v) + tuple(partial or ())

    def body(*refs):
        q_ref, k_ref, v_ref, *part = refs[:len(inputs)]
        (o_ref, lse_ref, q_smem, k_smem, v_smem, lse_smem, q_bar, ready, consumed,
         *optional) = refs[len(inputs):]
        part_smem, part_lse_smem, part_bar = optional[:3] if part else (None, None, None)
        turn = optional[3 if part else 0:]  # the ping-pong barrier, when there is one
        b, h, tile, wg = _program()
        kvh = lax.div(h, group)
        r0 = tile * (W * bq) + wg * bq
        ranges = _cta_ranges(row_tile_range, tile * (W * bq), cfg, bq, bk, wg)

        issue = _kv_issue(cfg, k_ref, v_ref, k_smem, v_smem, ready, b, kvh, Hk)

        # Ping-pong: every block costs each compute warpgroup two rounds on the `turn` barrier (one
        # while its S = QK^T runs, one after its softmax), skipped blocks included, and warpgroup 1
        # starts one round late, so the two alternate between matmuls and softmax. The leader is
        # then at most one block ahead, so it never waits for a ring slot that only the other one's
        # release can free: that needs 2 slots (with 1 the two would wait for each other).
        pingpong = bool(turn)

        def take_turn():
            plgpu.barrier_arrive(turn[0])
            plgpu.barrier_wait(turn[0])

        def step(blk, slot, carry, masked):
            acc, m, l = carry
            s = _mma(None, q_smem.at[wg], k_smem.at[slot].T, cfg.interpret,
                     after_issue=take_turn if pingpong else None) * scale2
            if masked:
                s = jnp.where(_visible(cfg.mask, T, r0, blk * bk, s.shape), s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=1))
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp2(s - _rows(m_use, s.shape))
            alpha = jnp.exp2(m - m_use)
            l = l * alpha + p.sum(axis=1)
            if pingpong:
                take_turn()
            acc = _mma(acc * _rows(alpha, acc.shape), p.astype(dtype), v_smem.at[slot], cfg.interpret)
            return acc, m_new, l

        acc0 = plgpu.layout_cast(jnp.zeros((bq, D), jnp.float32), plgpu.Layout.WGMMA)
        m0 = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l0 = plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        compute = _stream(wg, cfg, ranges, issue, step, ready, consumed,
                          skipped=(lambda: (take_turn(), take_turn())) if pingpong else None)

        @pl.when(wg < W)
        def _compute():
            rows = _row_pieces(cfg, b, r0, bq, h, H)
            _load_rows(q_ref, q_smem.at[wg], q_bar.at[wg], rows)
            if part:  # the earlier pass's o and lse of these rows land while the keys stream
                _load_rows(part[0], part_smem.at[wg], part_bar.at[wg], rows)
                plgpu.copy_gmem_to_smem(part[1].at[b, h, pl.ds(r0, bq)], part_lse_smem.at[wg], part_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])
            if pingpong:
                pl.when(wg == 1)(take_turn)
            acc, m, l = compute((acc0, m0, l0))
            if pingpong:
                pl.when(wg == 0)(take_turn)
            if part:
                # o = (w1 o1 + acc 2^(m - m*)) / (w1 + l 2^(m - m*)), w1 = 2^(lse1 - m*), in log2 units
                # with m* the larger of lse1 and this pass's log2 sum; rows empty in both give 0, -inf.
                plgpu.barrier_wait(part_bar.at[wg])
                lse1 = plgpu.load(part_lse_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1)) * LOG2E
                own = jnp.where(l == 0.0, -jnp.inf, m + jnp.log2(jnp.where(l == 0.0, 1.0, l)))
                top = jnp.maximum(lse1, own)
                top = jnp.where(top == -jnp.inf, 0.0, top)
                w1 = jnp.exp2(lse1 - top)
                w2 = jnp.exp2(m - top)
                o1 = plgpu.load(part_smem.at[wg], layout=plgpu.Layout.WGMMA).astype(jnp.float32)
                acc = _rows(w1, acc.shape) * o1 + acc * _rows(w2, acc.shape)
                l, m = w1 + l * w2, top
            empty = l == 0.0
            l_safe = jnp.where(empty, 1.0, l)
            q_smem.at[wg][...] = (acc / _rows(l_safe, acc.shape)).astype(dtype)
            lse_smem.at[wg][...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * LN2)
            plgpu.commit_smem()
            _store_rows(q_smem.at[wg], o_ref, rows)
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(r0, bq)])
            plgpu.wait_smem_to_gmem(0)

    tr = _transforms(dtype)
    scratch = [plgpu.SMEM((W, bq, D), dtype, transforms=tr),
               plgpu.SMEM((slots, bk, D), dtype, transforms=tr),
               plgpu.SMEM((slots, bk, D), dtype, transforms=tr),
               plgpu.SMEM((W, bq), jnp.float32),
               plgpu.Barrier(num_arrivals=cfg.pieces(bq), num_barriers=W),
               plgpu.Barrier(num_arrivals=2 * cfg.pieces(bk), num_barriers=slots),
               plgpu.Barrier(num_arrivals=W, num_barriers=slots)]
    if partial:  # the earlier pass's o and lse rows, and the barrier they arrive on
        scratch += [plgpu.SMEM((W, bq, D), dtype, transforms=tr), plgpu.SMEM((W, bq), jnp.float32),
                    plgpu.Barrier(num_arrivals=cfg.pieces(bq) + 1, num_barriers=W)]
    if cfg.pingpong and W == 2 and slots >= 2:
        scratch.append(plgpu.Barrier(num_arrivals=W))  # `turn`
    out_type = [jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((B, H, T), jnp.float32)]
    return _launch(body, cfg, out_type, scratch, (H, T // (W * bq), B))(*inputs)


# -------------------------------------------------------------------------------------------- backward

def pass_dq(q, k, v, do, lse2, delta, cfg: PassConfig, partial=None, out_dtype=jnp.float32):
    """dq of one pass [B, T, H, D] in out_dtype (float32, or q.dtype for the last pass), plus
    `partial` (float32 dq of the earlier passes, laid out as q) when given. lse2: [B, H, T] merged
    lse in log2 units (+inf for rows with no key at all); delta: [B, H, T] rowsum(dO * o)."""
    B, T, H, D = cfg.dims(q)
    Hk = cfg.dims(k)[2]
    group = H // Hk
    W, bq, bk, slots, dtype = cfg.compute_wgs, cfg.block_q, cfg.block_k, cfg.slots, q.dtype
    scale = D ** -0.5

    inputs = (q, k, v, do, lse2, delta) + (() if partial is None else (partial,))

    def body(*refs):
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *part, dq_ref, q_smem, do_smem, lse_smem,
         delta_smem, k_smem, v_smem, out_smem, res_bar, part_bar, ready, consumed) = refs
        b, h, tile, wg = _program()
        kvh = lax.div(h, group)
        r0 = tile * (W * bq) + wg * bq
        ranges = _cta_ranges(row_tile_range, tile * (W * bq), cfg, bq, bk, wg)

        issue = _kv_issue(cfg, k_ref, v_ref, k_smem, v_smem, ready, b, kvh, Hk)

        def step(blk, slot, carry, masked):
            dq, lse, delta = carry
            s = _mma(None, q_smem.at[wg], k_smem.at[slot].T, cfg.interpret)
            p = jnp.exp2(s * (scale * LOG2E) - _rows(lse, s.shape))
            if masked:
                p = jnp.where(_visible(cfg.mask, T, r0, blk * bk, s.shape), p, 0.0)
            dp = _mma(None, do_smem.at[wg], v_smem.at[slot].T, cfg.interpret)
            ds = p * (dp - _rows(delta, dp.shape))
            dq = _mma(dq, ds.astype(dtype), k_smem.at[slot], cfg.interpret)
            return dq, lse, delta

        compute = _stream(wg, cfg, ranges, issue, step, ready, consumed)

        @pl.when(wg < W)
        def _compute():
            rows = _row_pieces(cfg, b, r0, bq, h, H)
            _load_rows(q_ref, q_smem.at[wg], res_bar.at[wg], rows)
            _load_rows(do_ref, do_smem.at[wg], res_bar.at[wg], rows)
            plgpu.copy_gmem_to_smem(lse_ref.at[b, h, pl.ds(r0, bq)], lse_smem.at[wg], res_bar.at[wg])
            plgpu.copy_gmem_to_smem(delta_ref.at[b, h, pl.ds(r0, bq)], delta_smem.at[wg], res_bar.at[wg])
            if part:  # lands in the staging buffer while the key blocks stream
                _load_rows(part[0], out_smem.at[wg], part_bar.at[wg], rows)
            plgpu.barrier_wait(res_bar.at[wg])
            lse = plgpu.load(lse_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
            delta = plgpu.load(delta_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
            dq0 = plgpu.layout_cast(jnp.zeros((bq, D), jnp.float32), plgpu.Layout.WGMMA)
            dq, _, _ = compute((dq0, lse, delta))
            _write_rows(dq * scale, rows, dq_ref, out_smem.at[wg], q_smem.at[wg], part_bar.at[wg] if part else None)
            plgpu.wait_smem_to_gmem(0)

    tr = _transforms(dtype)
    scratch = [plgpu.SMEM((W, bq, D), dtype, transforms=tr), plgpu.SMEM((W, bq, D), dtype, transforms=tr),
               plgpu.SMEM((W, bq), jnp.float32), plgpu.SMEM((W, bq), jnp.float32),
               plgpu.SMEM((slots, bk, D), dtype, transforms=tr), plgpu.SMEM((slots, bk, D), dtype, transforms=tr),
               plgpu.SMEM((W, bq, D), jnp.float32),
               plgpu.Barrier(num_arrivals=2 * cfg.pieces(bq) + 2, num_barriers=W),
               plgpu.Barrier(num_arrivals=cfg.pieces(bq), num_barriers=W),
               plgpu.Barrier(num_arrivals=2 * cfg.pieces(bk), num_barriers=slots),
               plgpu.Barrier(num_arrivals=W, num_barriers=slots)]
    out_type = jax.ShapeDtypeStruct(q.shape, out_dtype)
    return _launch(body, cfg, out_type, scratch, (H, T // (W * bq), B))(*inputs)


def pass_dkv(q, k, v, do, lse2, delta, cfg: PassConfig, partials=None, out_dtype=jnp.float32):
    """dk, dv of one pass per query head, [B, T, H, D] each in out_dtype (the caller sums GQA groups),
    plus `partials` (float32 dk, dv of the earlier passes, laid out as q) when given."""
    B, T, H, D = cfg.dims(q)
    Hk = cfg.dims(k)[2]
    group = H // Hk
    W, bq, bk, slots, dtype = cfg.compute_wgs, cfg.block_q, cfg.block_k, cfg.slots, q.dtype
    scale = D ** -0.5

    inputs = (q, k, v, do, lse2, delta) + tuple(partials or ())

    def body(*refs):
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *part, dk_ref, dv_ref, k_smem, v_smem, q_smem,
         do_smem, lse_smem, delta_smem, out_smem, res_bar, part_bar, ready, consumed) = refs
        b, h, tile, wg = _program()
        kvh = lax.div(h, group)
        c0 = tile * (W * bk) + wg * bk
        ranges = _cta_ranges(col_tile_range, tile * (W * bk), cfg, bk, bq, wg)

        def issue(blk, slot):
            src = _row_pieces(cfg, b, blk * bq, bq, h, H)
            _load_rows(q_ref, q_smem.at[slot], ready.at[slot], src)
            _load_rows(do_ref, do_smem.at[slot], ready.at[slot], src)
            plgpu.copy_gmem_to_smem(lse_ref.at[b, h, pl.ds(blk * bq, bq)], lse_smem.at[slot], ready.at[slot])
            plgpu.copy_gmem_to_smem(delta_ref.at[b, h, pl.ds(blk * bq, bq)], delta_smem.at[slot], ready.at[slot])

        def step(blk, slot, carry, masked):
            dk, dv = carry
            st = _mma(None, k_smem.at[wg], q_smem.at[slot].T, cfg.interpret)  # [bk, bq]
            lse = plgpu.load(lse_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
            pt = jnp.exp2(st * (scale * LOG2E) - _cols(lse, st.shape))
            if masked:  # visible(i = query, j = key) on the transposed tile
                pt = jnp.where(_visible(cfg.mask, T, blk * bq, c0, st.shape, transposed=True), pt, 0.0)
            dv = _mma(dv, pt.astype(dtype), do_smem.at[slot], cfg.interpret)
            dpt = _mma(None, v_smem.at[wg], do_smem.at[slot].T, cfg.interpret)
            delta = plgpu.load(delta_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
            dst = pt * (dpt - _cols(delta, dpt.shape))
            dk = _mma(dk, dst.astype(dtype), q_smem.at[slot], cfg.interpret)
            return dk, dv

        compute = _stream(wg, cfg, ranges, issue, step, ready, consumed)

        @pl.when(wg < W)
        def _compute():
            rows = _row_pieces(cfg, b, c0, bk, kvh, Hk)
            _load_rows(k_ref, k_smem.at[wg], res_bar.at[wg], rows)
            _load_rows(v_ref, v_smem.at[wg], res_bar.at[wg], rows)
            out = _row_pieces(cfg, b, c0, bk, h, H)
            if part:  # dk's partial lands in the staging buffer while the query blocks stream
                _load_rows(part[0], out_smem.at[wg], part_bar.at[wg], out)
            plgpu.barrier_wait(res_bar.at[wg])
            zero = plgpu.layout_cast(jnp.zeros((bk, D), jnp.float32), plgpu.Layout.WGMMA)
            dk, dv = compute((zero, zero))
            bar = part_bar.at[wg] if part else None
            _write_rows(dk * scale, out, dk_ref, out_smem.at[wg], k_smem.at[wg], bar)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the staging buffer is free again
            if part:
                _load_rows(part[1], out_smem.at[wg], part_bar.at[wg], out)
            _write_rows(dv, out, dv_ref, out_smem.at[wg], v_smem.at[wg], bar)
            plgpu.wait_smem_to_gmem(0)

    tr = _transforms(dtype)
    scratch = [plgpu.SMEM((W, bk, D), dtype, transforms=tr), plgpu.SMEM((W, bk, D), dtype, transforms=tr),
               plgpu.SMEM((slots, bq, D), dtype, transforms=tr), plgpu.SMEM((slots, bq, D), dtype, transforms=tr),
               plgpu.SMEM((slots, bq), jnp.float32), plgpu.SMEM((slots, bq), jnp.float32),
               plgpu.SMEM((W, bk, D), jnp.float32),
               plgpu.Barrier(num_arrivals=2 * cfg.pieces(bk), num_barriers=W),
               plgpu.Barrier(num_arrivals=cfg.pieces(bk), num_barriers=W),
               plgpu.Barrier(num_arrivals=2 * cfg.pieces(bq) + 2, num_barriers=slots),
               plgpu.Barrier(num_arrivals=W, num_barriers=slots)]
    out_type = [jax.ShapeDtypeStruct(q.shape, out_dtype)] * 2
    return _launch(body, cfg, out_type, scratch, (H, T // (W * bk), B))(*inputs)
