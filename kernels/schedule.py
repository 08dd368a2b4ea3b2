"""Tiling schedule of the sparse attention kernels, in plain Python/numpy so CPU tests can check it.

Every supported pattern is split into at most two *passes*. Each pass is causal-like attention whose
mask, on the pass's own flat index, has one shape (`DiagonalMask`):

    visible(i, j) = (i // seg_len == j // seg_len) and lo <= i - j <= hi

- band pass, natural layout (one segment of length T): dense is lo=0, hi=inf; local(w) and the band
  part of local_strided(w, s) are lo=0, hi=w-1.
- strided pass, residue-major layout: view x[T] as x[T/S, S]; residue r holds positions r, r+S, ...,
  laid out one residue after another, so flat index r*P + p (P = T/S) is position p*S + r. A strided
  pair (d = i - j a multiple of S) is a same-residue pair with p - p' = d / S. strided(S) needs
  p - p' >= 0; local_strided(w, S) needs p - p' >= ceil(w / S), because nearer strided pairs have
  d < w and already sit in the band (counting them twice would double their softmax weight).
  When P is smaller than a tile, one tile packs several residues and the segment test makes the
  mask block-diagonal.

fixed(b, c) is two passes in natural query order: block-diagonal causal (`DiagonalMask(b)`), and the
summary keys of earlier blocks (`SummaryMask`), gathered into their own short key sequence (the last
c positions of every block, block after block), where query i sees gathered key g iff g // c < i // b.

For a pass and tile sizes (bq, bk) a `BlockSchedule` lists, per query tile, the key blocks to visit and
whether each is fully visible (no mask needed) or partial; the backward's dk/dv kernel uses the
transposed lists (per key block, the query tiles that see it). Passes are merged with `merge_partials`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from kernels.patterns import Pattern

SKIP, PARTIAL, FULL = 0, 1, 2
NO_LIMIT = np.iinfo(np.int32).max // 2  # "hi = infinity" that still fits int32 arithmetic in kernels


@dataclasses.dataclass(frozen=True)
class DiagonalMask:
    """visible(i, j) = same segment of length seg_len, and lo <= i - j <= hi."""
    seg_len: int
    lo: int = 0
    hi: int = NO_LIMIT

    def dense(self, n: int) -> np.ndarray:
        i = np.arange(n)[:, None]
        j = np.arange(n)[None, :]
        d = i - j
        return (i // self.seg_len == j // self.seg_len) & (d >= self.lo) & (d <= self.hi)

    def key_range(self, r0: int, r1: int, n_keys: int) -> tuple[int, int]:
        """First and last key that any row in [r0, r1) may see (last < first: none)."""
        first = max((r0 // self.seg_len) * self.seg_len, r0 - self.hi, 0)
        return first, min(r1 - 1 - self.lo, n_keys - 1)

    def tile_kind(self, r0: int, r1: int, c0: int, c1: int) -> int:
        """SKIP, PARTIAL or FULL for rows [r0, r1) x cols [c0, c1), computed exactly per segment."""
        L = self.seg_len
        if (r0 // L == (r1 - 1) // L == c0 // L == (c1 - 1) // L
                and r0 - (c1 - 1) >= self.lo and (r1 - 1) - c0 <= self.hi):
            return FULL
        for s in range(max(r0, c0) // L, min(r1 - 1, c1 - 1) // L + 1):
            rs, re = max(r0, s * L), min(r1, (s + 1) * L)
            cs, ce = max(c0, s * L), min(c1, (s + 1) * L)
            if rs >= re or cs >= ce:
                continue
            if max(rs - (ce - 1), self.lo) <= min((re - 1) - cs, self.hi):
                return PARTIAL
        return SKIP


@dataclasses.dataclass(frozen=True)
class SummaryMask:
    """Second pass of fixed(block, c): queries in natural order, keys the gathered summary positions
    (gathered g is position (g // c) * block + block - c + g % c). visible(i, g) = g // c < i // block:
    the summary keys of earlier blocks (those of the query's own block are in the first pass)."""
    block: int
    c: int

    def threshold(self, i, div=np.floor_divide):
        """Gathered keys g < threshold(i) are visible to query i (nondecreasing in i). div: floor
        division for i's kind (numpy; int32 scalars or vectors inside a kernel)."""
        return div(i, self.block) * self.c

    def dense(self, n: int, n_keys: int) -> np.ndarray:
        return np.arange(n_keys)[None, :] < self.threshold(np.arange(n))[:, None]

    def key_range(self, r0: int, r1: int, n_keys: int) -> tuple[int, int]:
        return 0, min(self.threshold(r1 - 1), n_keys) - 1

    def tile_kind(self, r0: int, r1: int, c0: int, c1: int) -> int:
        if c0 >= self.threshold(r1 - 1):
            return SKIP
        return FULL if c1 - 1 < self.threshold(r0) else PARTIAL


@dataclasses.dataclass(frozen=True)
class Pass:
    """One pass of a pattern: its mask, and its layout: natural, residue-major of `stride`, or natural
    queries against gathered summary keys (a SummaryMask)."""
    mask: DiagonalMask | SummaryMask
    stride: int = 0  # 0: natural layout

    @property
    def residue_major(self) -> bool:
        return self.stride > 0

    @property
    def gathers_keys(self) -> bool:
        return isinstance(self.mask, SummaryMask)


def passes_for(pattern: Pattern, seq_len: int) -> list[Pass]:
    """The passes whose union is `pattern` on a sequence of seq_len, with no pair in two passes."""
    pattern.check_seq_len(seq_len)
    T = seq_len
    if pattern.kind == "dense":
        return [Pass(DiagonalMask(T))]
    if pattern.kind == "local":
        return [Pass(DiagonalMask(T, 0, pattern.window - 1))]
    if pattern.kind == "strided":
        return [Pass(DiagonalMask(T // pattern.stride), stride=pattern.stride)]
    if pattern.kind == "local_strided":
        w, s = pattern.window, pattern.stride
        out = [Pass(DiagonalMask(T, 0, w - 1))]
        offset = math.ceil(w / s)
        if offset < T // s:  # otherwise every strided pair is already in the band
            out.append(Pass(DiagonalMask(T // s, offset), stride=s))
        return out
    if pattern.kind == "fixed":
        out = [Pass(DiagonalMask(pattern.block))]
        if T > pattern.block:  # otherwise there is no earlier block to summarize
            out.append(Pass(SummaryMask(pattern.block, pattern.c)))
        return out
    raise ValueError(f"pattern {pattern} has no kernel schedule; use impl='reference' for it")


def residue_positions(seq_len: int, stride: int) -> np.ndarray:
    """Natural position of each flat index of the residue-major layout: flat r*P + p -> p*S + r."""
    P = seq_len // stride
    flat = np.arange(seq_len)
    return (flat % P) * stride + flat // P


def summary_positions(seq_len: int, block: int, c: int) -> np.ndarray:
    """Natural position of each gathered key of fixed(block, c): the last c of every block."""
    g = np.arange(seq_len // block * c)
    return (g // c) * block + block - c + g % c


def pass_pairs(p: Pass, seq_len: int) -> np.ndarray:
    """Boolean [T, T] of natural (query, key) pairs the pass computes (for tests; O(T^2))."""
    if p.gathers_keys:
        pos = summary_positions(seq_len, p.mask.block, p.mask.c)
        out = np.zeros((seq_len, seq_len), bool)
        out[:, pos] = p.mask.dense(seq_len, len(pos))
        return out
    m = p.mask.dense(seq_len)
    if not p.residue_major:
        return m
    pos = residue_positions(seq_len, p.stride)
    out = np.zeros((seq_len, seq_len), bool)
    out[np.ix_(pos, pos)] = m
    return out


@dataclasses.dataclass(frozen=True)
class BlockSchedule:
    """Per row tile, the column blocks to visit, padded to a common number of steps.

    index[t, s]: column block visited by row tile t at step s (padding repeats the last real block, so a
    skipped step re-uses the block already in memory instead of fetching a new one).
    kind[t, s]: SKIP (padding), PARTIAL (apply the mask) or FULL (every pair visible).
    """
    index: np.ndarray
    kind: np.ndarray

    @property
    def steps(self) -> int:
        return self.index.shape[1]

    def visits(self) -> "VisitList":
        """The visits without the padding, one grid step each (a grid step has a fixed cost, and the
        padding of dense causal lists is about half the steps), as 1-D int32 arrays (scalar prefetch
        lives in SMEM, where 2-D arrays pad badly). A tile with nothing to visit keeps one SKIP step, so
        that it still initializes and writes its output."""
        rows, cols, kinds, first, last = [], [], [], [], []
        for t in range(self.index.shape[0]):
            steps = [s for s in range(self.steps) if self.kind[t, s] != SKIP] or [0]
            for n, s in enumerate(steps):
                rows.append(t)
                cols.append(self.index[t, s])
                kinds.append(self.kind[t, s])
                first.append(n == 0)
                last.append(n == len(steps) - 1)
        return VisitList(*(np.asarray(a, np.int32) for a in (rows, cols, kinds, first, last)))


@dataclasses.dataclass(frozen=True)
class VisitList:
    """Step s visits column block cols[s] from row tile rows[s] (kind[s]: SKIP, PARTIAL or FULL); a row
    tile's steps are consecutive, first[s] / last[s] mark its first and last."""
    rows: np.ndarray
    cols: np.ndarray
    kind: np.ndarray
    first: np.ndarray
    last: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def prefetch(self):
        """The five arrays for scalar prefetch, in this order."""
        return self.rows, self.cols, self.kind, self.first, self.last


def _pad_lists(lists) -> BlockSchedule:
    steps = max(1, max(len(x) for x in lists))
    index = np.zeros((len(lists), steps), np.int32)
    kind = np.zeros((len(lists), steps), np.int32)
    for t, visits in enumerate(lists):
        for s, (blk, k) in enumerate(visits):
            index[t, s], kind[t, s] = blk, k
        if visits:
            index[t, len(visits):] = visits[-1][0]
    return BlockSchedule(index, kind)


@functools.lru_cache(maxsize=256)
def forward_schedule(mask: DiagonalMask | SummaryMask, seq_len: int, block_q: int, block_k: int,
                     n_keys: int | None = None) -> BlockSchedule:
    """For each query tile, the key blocks it must visit (used by the forward and the dq kernel).
    n_keys: length of the key sequence when it is not the queries' (gathered summary keys)."""
    n_keys = n_keys or seq_len
    if seq_len % block_q or n_keys % block_k:
        raise ValueError(f"{seq_len} queries and {n_keys} keys must be multiples of block_q={block_q} and "
                         f"block_k={block_k}")
    lists = []
    for qt in range(seq_len // block_q):
        r0, r1 = qt * block_q, (qt + 1) * block_q
        first, last = mask.key_range(r0, r1, n_keys)
        visits = []
        for kb in range(first // block_k, last // block_k + 1) if last >= first else ():
            k = mask.tile_kind(r0, r1, kb * block_k, (kb + 1) * block_k)
            if k != SKIP:
                visits.append((kb, k))
        lists.append(visits)
    return _pad_lists(lists)


@functools.lru_cache(maxsize=256)
def transposed_schedule(mask: DiagonalMask | SummaryMask, seq_len: int, block_q: int, block_k: int,
                        n_keys: int | None = None) -> BlockSchedule:
    """For each key block, the query tiles that see it (used by the dk/dv kernel)."""
    fwd = forward_schedule(mask, seq_len, block_q, block_k, n_keys)
    lists = [[] for _ in range((n_keys or seq_len) // block_k)]
    for qt in range(fwd.index.shape[0]):
        for s in range(fwd.steps):
            if fwd.kind[qt, s] != SKIP:
                lists[fwd.index[qt, s]].append((qt, int(fwd.kind[qt, s])))
    return _pad_lists(lists)


def schedule_pairs(sched: BlockSchedule, block_rows: int, block_cols: int, n: int, n_cols: int | None = None):
    """Boolean [n, n_cols or n]: the (row, col) cells covered by the visited blocks (for tests)."""
    out = np.zeros((n, n_cols or n), bool)
    for t in range(sched.index.shape[0]):
        for s in range(sched.steps):
            if sched.kind[t, s] != SKIP:
                c = sched.index[t, s]
                out[t * block_rows:(t + 1) * block_rows, c * block_cols:(c + 1) * block_cols] = True
    return out


def merge_partials(o1, l1, o2, l2, xp=np):
    """Combine two softmax partials over disjoint key sets.

    o: [..., T, D] normalized outputs, l: [..., T] log-sum-exp (-inf where a pass saw no key).
    l = logaddexp(l1, l2); o = o1 * exp(l1 - l) + o2 * exp(l2 - l), with -inf rows given weight 0
    rather than exp(-inf - -inf) = nan.
    """
    l = xp.logaddexp(l1, l2)
    l_safe = xp.where(xp.isfinite(l), l, 0.0)
    w1 = xp.where(xp.isfinite(l1), xp.exp(l1 - l_safe), 0.0)
    w2 = xp.where(xp.isfinite(l2), xp.exp(l2 - l_safe), 0.0)
    return o1 * w1[..., None] + o2 * w2[..., None], l


# --------------------------------------------------------------------------- block ranges (GPU kernel)
#
# The Mosaic GPU kernel has no scalar prefetch, so instead of reading per-tile lists it computes, from
# the tile's first row, one contiguous range of blocks to visit and, inside it, the sub-range that needs
# no mask. The same formulas run on numpy ints here (tests compare them with `forward_schedule` /
# `transposed_schedule`) and on int32 scalars inside the kernel. `div` must be floor division on
# non-negative ints (lax.div in the kernel); `xp` provides maximum/minimum/where.

def _ceil_div_nonneg(x, b, xp, div):
    return div(xp.maximum(x, 0) + (b - 1), b)


def row_tile_range(mask: DiagonalMask | SummaryMask, seq_len: int, r0, rows: int, blk: int, xp=np,
                   div=np.floor_divide):
    """Rows [r0, r0 + rows) against column blocks of `blk`: (lo, hi, full_lo, full_hi) with
    lo <= full_lo <= full_hi <= hi. Blocks [lo, hi) contain every visible pair of the tile; blocks in
    [full_lo, full_hi) have every pair of the tile visible (no mask needed)."""
    r1 = r0 + rows
    if isinstance(mask, SummaryMask):  # keys below the last row's threshold; all rows see those below the first's
        hi = _ceil_div_nonneg(mask.threshold(r1 - 1, div), blk, xp, div)
        f_hi = xp.minimum(div(mask.threshold(r0, div), blk), hi)
        zero = xp.zeros_like(hi)
        return zero, hi, zero, f_hi
    L = mask.seg_len
    seg_start = div(r0, L) * L
    first = xp.maximum(xp.maximum(seg_start, r0 - mask.hi), 0)
    last = r1 - 1 - mask.lo
    lo = div(first, blk)
    hi = xp.where(last >= first, div(xp.maximum(last, 0), blk) + 1, lo)
    # no mask: (r1 - 1) - c0 <= hi, c1 - 1 <= r0 - lo, and the tile and the block in one segment
    f_lo = xp.maximum(_ceil_div_nonneg(r1 - 1 - mask.hi, blk, xp, div), _ceil_div_nonneg(seg_start, blk, xp, div))
    f_hi = div(xp.maximum(r0 - mask.lo + 1, 0), blk)
    f_hi = xp.where(div(r0, L) == div(r1 - 1, L), f_hi, 0)
    f_lo = xp.minimum(xp.maximum(f_lo, lo), hi)
    f_hi = xp.maximum(xp.minimum(f_hi, hi), f_lo)
    return lo, hi, f_lo, f_hi


def col_tile_range(mask: DiagonalMask | SummaryMask, seq_len: int, c0, cols: int, blk: int, xp=np,
                   div=np.floor_divide):
    """Columns (keys) [c0, c0 + cols) against row (query) blocks of `blk`, as `row_tile_range`:
    the query blocks that see the key tile, for the dk/dv kernel (seq_len: the queries' length)."""
    c1 = c0 + cols
    if isinstance(mask, SummaryMask):
        # gathered key g is seen by queries from the block after its own: i >= block * (g // c + 1)
        first = (div(c0, mask.c) + 1) * mask.block
        every = (div(c1 - 1, mask.c) + 1) * mask.block  # from here on, every key of the tile
        lo = div(xp.minimum(first, seq_len), blk)
        hi = xp.maximum(lo, seq_len // blk)
        f_lo = xp.minimum(_ceil_div_nonneg(every, blk, xp, div), hi)
        return lo, hi, f_lo, hi
    L = mask.seg_len
    seg_end = (div(c1 - 1, L) + 1) * L
    first = c0 + mask.lo
    last = xp.minimum(xp.minimum(c1 - 1 + xp.minimum(mask.hi, seq_len), seg_end - 1), seq_len - 1)
    lo = xp.minimum(div(xp.minimum(first, seq_len), blk), seq_len // blk)
    hi = xp.where(last >= first, div(xp.maximum(last, 0), blk) + 1, lo)
    # no mask: i0 - (c1 - 1) >= lo, (i0 + blk - 1) - c0 <= hi, the key tile and the block in one segment
    f_lo = _ceil_div_nonneg(c1 - 1 + mask.lo, blk, xp, div)
    f_hi = xp.minimum(div(c0 + xp.minimum(mask.hi, seq_len) + 1, blk), div(seg_end, blk))
    f_hi = xp.where(div(c0, L) == div(c1 - 1, L), f_hi, 0)
    f_lo = xp.minimum(xp.maximum(f_lo, lo), hi)
    f_hi = xp.maximum(xp.minimum(f_hi, hi), f_lo)
    return lo, hi, f_lo, f_hi
