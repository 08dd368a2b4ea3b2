"""What the Mosaic GPU kernels of kernels/pallas_gpu_kernels.py share: the launch description
(`PassConfig`), the TMA ring that streams blocks to the compute warpgroups, row copies in and out of
[B, T, H, D] (in place for residue-major passes), masks, and the wgmma accumulate.

A tile is W * 64 rows, 64 for each compute warpgroup; a CTA has W compute warpgroups and one memory
warpgroup that streams the other operand's blocks through a ring of `slots` shared-memory buffers with
TMA:

    memory WG   for tile, blk in [cta_lo, cta_hi): wait consumed[slot]; TMA blk -> ring[slot], arrive ready[slot]
    compute WG  for tile: resident loads, then for blk in [cta_lo, cta_hi): wait ready[slot]; work on it
                (or skip); arrive consumed[slot]; then the tile's epilogue

A CTA runs `PassConfig.tiles` tiles in turn (`stream`, `run_tiles`): the ring's slot is the block's
index in the CTA's whole stream, so it runs on from one tile into the next.

[cta_lo, cta_hi) is the union of the warpgroups' own ranges from `schedule.row_tile_range` /
`col_tile_range` (computed on int32 scalars in the kernel, so no block lists need to reach it). Each
warpgroup runs five loops over that range: skip, masked, unmasked, masked, skip; a skipped block is
still waited for and released, because Mosaic GPU barriers track their phase per waiter.

Accumulation: `mma` adds a wgmma product to a register accumulator. Compiled, it passes the
accumulator to wgmma (`pl.run_state`, as jax's attention_mgpu does); the GPU interpreter cannot run
`run_state`, so under interpretation it computes the product in a fresh scoped accumulator and adds
it. The arithmetic is the same; only that one call differs between the two modes.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import dropout as dropout_hash
from kernels.schedule import DiagonalMask, SummaryMask

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
ROWS = 64  # rows of one compute warpgroup's tile (the wgmma M dimension)


@dataclasses.dataclass(frozen=True)
class PassConfig:
    """Static description of one kernel launch (hashable)."""
    mask: DiagonalMask | SummaryMask
    seq_len: int  # of the queries; of the keys too but for fixed's gathered summary keys (key_len)
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
    # Which pass this is (pallas_gpu.pass_name: "band", "strided", ...): names the kernels in dumps and profiles.
    name: str = "pass"
    # Consecutive tiles a CTA runs one after another (grid / tiles CTAs; query rows for the forward and
    # dq, key rows for dk/dv), its ring streaming on across them, so the next tile's blocks load while
    # this one computes.
    tiles: int = 1
    # Registers a thread of a compute warpgroup / of the memory warpgroup (setmaxnreg). Two compute
    # warpgroups: 2 * 232 + 40 = 504 a thread-slot, the most 384 threads can share of the SM's 64K.
    registers: tuple = (232, 40)
    # A kernels.dropout.Dropout: probabilities are dropped by the hash of (seed, batch row, head, query
    # position, key position); the kernels then take a [B, H] int32 array of per-head seeds
    # (dropout.head_seeds) as their last input.
    dropout: object = None
    # A residue-major pass's stride S (flat row r*P + p is position p*S + r; in place or on transposed
    # copies), 0 for the natural layout: what maps the dropout hash's rows to positions.
    residue_stride: int = 0
    # fixed's summary pass: the gathered keys' length (whole key tiles; 0: seq_len)
    key_len: int = 0

    @property
    def keys(self) -> int:
        return self.key_len or self.seq_len

    def dims(self, x):
        """(batch, seq, heads, head_dim) of a [B, T, H, D] operand, however it arrived."""
        b, _, h, d = x.shape
        return b, self.seq_len, (h // self.residues if self.residues else h), d

    def pieces(self, n: int) -> int:
        """TMA copies that move n flat rows of one head: 1, or one per residue when residues are short."""
        seg = self.seq_len // self.residues if self.residues else n
        return max(1, n // seg)


def div(a, b):
    return lax.div(jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32))


def transforms(dtype):
    """TMA/wgmma shared-memory layout: 128-byte swizzle, tiles of (8, 128 bytes)."""
    return (plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(128))


def mma(acc, a, b, interpret, after_issue=None):
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


def div_by(x, n: int):
    """x // n for non-negative int32 x and a static n: a shift when n is a power of two."""
    if n & (n - 1) == 0:
        return lax.shift_right_logical(x, jnp.int32(n.bit_length() - 1))
    return lax.div(x, jnp.full(x.shape, n, jnp.int32))


def visible(mask: DiagonalMask | SummaryMask, seq_len, queries0, keys0, shape, transposed=False):
    """Boolean tile of `mask` in the WGMMA register layout, for queries i from queries0 and keys j
    from keys0: i along dimension 0 and j along 1, or the other way round when transposed."""
    qdim, kdim = (1, 0) if transposed else (0, 1)
    i = queries0 + plgpu.broadcasted_iota(jnp.int32, shape, qdim, layout=plgpu.Layout.WGMMA)
    j = keys0 + plgpu.broadcasted_iota(jnp.int32, shape, kdim, layout=plgpu.Layout.WGMMA)
    if isinstance(mask, SummaryMask):  # gathered summary key j of an earlier block than query i's
        return j < mask.threshold(i, div_by)
    d = i - j
    vis = d >= mask.lo
    limit = mask.hi if mask.hi < seq_len else None
    if mask.seg_len < seq_len:
        # Packed residues (block-diagonal): as d >= lo >= 0, j is in i's segment iff d <= i mod seg_len.
        # A mask and a compare, not two divisions a pair: the divisions made dk/dv spill registers
        # (kernels.gpu_compile: 480 bytes a thread at T = 2K).
        seg = mask.seg_len
        offset = (jnp.bitwise_and(i, seg - 1) if seg & (seg - 1) == 0
                  else lax.rem(i, jnp.full(shape, seg, jnp.int32)))
        limit = offset if limit is None else jnp.minimum(offset, limit)
    if limit is not None:
        vis = vis & (d <= limit)
    return vis


def dropout_keep(cfg: PassConfig, head_seed, queries0, keys0, shape, transposed=False):
    """The dropout mask of a tile in the WGMMA register layout (queries along dimension 0 and keys
    along 1, or the other way round when transposed): the bits kernels/dropout.py gives XLA for the
    tile's sequence positions. Row keys are hashed once per query and broadcast, positions computed
    once per row and column."""
    qdim, kdim = (1, 0) if transposed else (0, 1)

    def positions(dim, first):  # the tile's rows (dim 0) or columns (dim 1) as a vector of positions
        flat = first + plgpu.broadcasted_iota(jnp.int32, (shape[dim],), 0, layout=plgpu.Layout.WGMMA.reduce(1 - dim))
        if dim == kdim and isinstance(cfg.mask, SummaryMask):
            return dropout_hash.gathered_positions(flat, cfg.mask.block, cfg.mask.c)
        return dropout_hash.positions(flat, cfg.seq_len, cfg.residue_stride)

    def spread(x, dim):
        return (per_row if dim == 0 else per_col)(x, shape)

    row_keys = spread(dropout_hash.row_keys(head_seed, positions(qdim, queries0)), qdim)
    return dropout_hash.keep(row_keys, spread(positions(kdim, keys0), kdim), cfg.dropout)


def per_row(x, shape):
    """[n] -> shape, x[i] filling row i (a row statistic against a [rows, cols] tile)."""
    return lax.broadcast_in_dim(x, shape, [0])


def per_col(x, shape):
    """[n] -> shape, x[j] filling column j."""
    return lax.broadcast_in_dim(x, shape, [1])


def stream(wg, cfg: PassConfig, ranges_of, issue, step, ready, consumed, skipped=None, tile_ctx=lambda t: t):
    """Run the memory warpgroup and return compute(begin, end) for the compute warpgroups, over the
    CTA's `cfg.tiles` tiles t = 0, 1, ... (a loop, t traced; with one tile, t is the int 0).

    ranges_of(t): the calling warpgroup's own (lo, hi, full_lo, full_hi) and the CTA union
    (cta_lo, cta_hi) of tile t. issue(t, blk, slot) starts the TMA copies of tile t's block blk into
    ring slot `slot`; step(tile_ctx(t), blk, slot, carry, masked) works on it (tile_ctx: what the step
    needs of the tile, e.g. its first row, computed once a tile: fewer live registers in the loop than
    t itself, the CTA index and the warpgroup's). The ring runs on across tiles
    (block g of the CTA's stream takes slot g % slots), so the memory warpgroup loads the next tile's
    first blocks while the compute warpgroups finish this one. skipped(): runs for each block of the
    union that the warpgroup skips (to keep in step with the others). compute(begin, end): begin(t)
    waits for the tile's resident operands and returns the initial carry; end(t, carry) is its epilogue."""
    slots = cfg.slots

    def tile_loop(body):  # body(t, g0) -> g0 of the next tile; one tile: t = 0 is a Python int
        if cfg.tiles == 1:
            return body(0, jnp.int32(0))
        return lax.fori_loop(0, cfg.tiles, body, jnp.int32(0))

    @pl.when(wg == cfg.compute_wgs)
    def _memory():
        plgpu.set_max_registers(cfg.registers[1], action="decrease")

        def issue_tile(t, g0):  # g0: stream index of the tile's first block
            _, (cta_lo, cta_hi) = ranges_of(t)

            @pl.loop(cta_lo, cta_hi)
            def _issue(blk):
                g = g0 + blk - cta_lo
                slot = lax.rem(g, slots)
                pl.when(g >= slots)(lambda: plgpu.barrier_wait(consumed.at[slot]))  # slot's last block done
                issue(t, blk, slot)
            return g0 + (cta_hi - cta_lo)

        total = tile_loop(issue_tile)

        # Observe the last releases too, so every waiter has seen every phase of every barrier
        # (the interpreter checks it; on the GPU it only keeps this warpgroup until the CTA ends).
        @pl.loop(jnp.maximum(0, total - slots), total)
        def _drain(g):
            plgpu.barrier_wait(consumed.at[lax.rem(g, slots)])

    def visit(ctx, base, mode, blk, carry):  # base: stream index of block 0 (g = base + blk)
        slot = lax.rem(base + blk, slots)
        plgpu.barrier_wait(ready.at[slot])
        if mode != "skip":
            carry = step(ctx, blk, slot, carry, mode == "masked")
            if cfg.interpret:
                # The interpreter orders generic-proxy reads before the next TMA (async proxy) write
                # into the slot only through a proxy fence; on the GPU the mbarrier release suffices
                # for this write-after-read (as in CUTLASS's TMA pipelines), so compiled code skips it.
                plgpu.commit_smem()
        elif skipped is not None:
            skipped()
        plgpu.barrier_arrive(consumed.at[slot])
        return carry

    def compute(begin, end):
        plgpu.set_max_registers(cfg.registers[0], action="increase")

        def run_tile(t, g0):
            (lo, hi, f_lo, f_hi), (cta_lo, cta_hi) = ranges_of(t)
            carry = begin(t)
            visit_tile = functools.partial(visit, tile_ctx(t), g0 - cta_lo)
            for mode, a, b in (("skip", cta_lo, lo), ("masked", lo, f_lo), ("full", f_lo, f_hi),
                               ("masked", f_hi, hi), ("skip", hi, cta_hi)):
                carry = lax.fori_loop(a, b, functools.partial(visit_tile, mode), carry)
            end(t, carry)
            return g0 + (cta_hi - cta_lo)

        tile_loop(run_tile)

    return compute


def run_tiles(cfg: PassConfig, compute, begin, epilogue, load_resident, load_partial=None):
    """A compute warpgroup's whole job over the CTA's tiles, given `compute` from `stream`.

    load_resident(t) starts the copies of tile t's resident operands (what every block of the tile
    is multiplied with); begin(t) waits for them and returns the initial carry; epilogue(t, carry)
    writes the tile's outputs through the staging buffers; load_partial(t), if given, copies an
    earlier pass's result for tile t into a staging buffer (the epilogue adds it). Between tiles:
    the next tile's resident operands load as soon as this tile's blocks are done (during the
    epilogue), and its partial once the TMA stores have read the staging buffers."""
    def end(t, carry):
        more = t + 1 < cfg.tiles  # a Python bool for one tile, a traced one otherwise
        pl.when(more)(lambda: load_resident(t + 1))
        epilogue(t, carry)
        if cfg.tiles > 1:
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the staging buffers are free again
        if load_partial is not None:
            pl.when(more)(lambda: load_partial(t + 1))

    load_resident(0)
    if load_partial is not None:
        load_partial(0)
    compute(begin, end)
    plgpu.wait_smem_to_gmem(0)


def cta_ranges(range_fn, tile0, cfg: PassConfig, rows, blk, wg):
    """Own range of warpgroup `wg` and the union over the CTA's warpgroups."""
    per_wg = [range_fn(cfg.mask, cfg.seq_len, tile0 + w * rows, rows, blk, xp=jnp, div=div)
              for w in range(cfg.compute_wgs)]
    cta_lo = functools.reduce(jnp.minimum, [r[0] for r in per_wg])
    cta_hi = jnp.maximum(functools.reduce(jnp.maximum, [r[1] for r in per_wg]), cta_lo)
    own = range_fn(cfg.mask, cfg.seq_len, tile0 + wg * rows, rows, blk, xp=jnp, div=div)
    return own, (cta_lo, cta_hi)


def row_pieces(cfg: PassConfig, b, f0, n: int, head, heads: int):
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


def load_rows(src, dst, barrier, pieces):
    for index, rows in pieces:
        plgpu.copy_gmem_to_smem(src.at[index], dst if rows is None else dst.at[rows], barrier)


def store_rows(src, dst, pieces):
    for index, rows in pieces:
        plgpu.copy_smem_to_gmem(src if rows is None else src.at[rows], dst.at[index])


def kv_issue(cfg: PassConfig, k_ref, v_ref, k_smem, v_smem, ready, b, kvh, kv_heads: int):
    """The copies a pass issues for key block `blk` into ring slot `slot`: its K and V rows of kv
    head `kvh`, all arriving on the slot's `ready` barrier (2 * cfg.pieces(block_k) arrivals)."""
    bk = cfg.block_k

    def issue(t, blk, slot):  # the same kv head for all of a CTA's tiles: blk alone says which rows
        pieces = row_pieces(cfg, b, blk * bk, bk, kvh, kv_heads)
        load_rows(k_ref, k_smem.at[slot], ready.at[slot], pieces)
        load_rows(v_ref, v_smem.at[slot], ready.at[slot], pieces)
    return issue


def write_rows(acc, rows, out_ref, f32_stage, low_stage, partial_bar=None):
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
    store_rows(stage, out_ref, rows)


def program():
    return (lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("tiles"), lax.axis_index("wg"))


def launch(body, cfg, out_type, scratch, grid, kernel: str):
    """Launch `body` as kernel `{kernel}_{cfg.name}`: the name Mosaic GPU gives its dumps (ptxas
    report, PTX: kernels/gpu_compile.py) and its launches."""
    body.__name__ = body.__qualname__ = f"{kernel}_{cfg.name}"
    return plgpu.kernel(body, out_type=out_type, scratch_types=scratch, grid=grid,
                        grid_names=("heads", "tiles", "batch"), num_threads=cfg.compute_wgs + 1,
                        thread_name="wg", compiler_params=plgpu.CompilerParams(approx_math=True),
                        interpret=cfg.interpret)


