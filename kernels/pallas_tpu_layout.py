"""Where the TPU kernel's tiles live: a pass's arrays in HBM and the BlockSpecs that find one tile.

A pass (kernels/schedule.py) works on a flat row order: natural (stride 1) for the band pass,
residue-major (flat r*P + p holds position p*S + r, P = T/S) for the strided pass. Its kernels see
tiles of `rows` rows in that order, for a block of heads. Two ways to lay the [B, T, H, D] arrays
out for them:

- in place: [B, T, H, D] viewed as [B, P, S, H, D]. On a TPU an array is tiled 8 x 128 on its last
  two dimensions, here (H, D), so this split of T is free (a bitcast in the compiled program) where
  a reshape that touches H or D is not: it is a copy of the whole array (`python -m
  kernels.tpu_compile` shows which). A tile is the (rows, heads, D) block of one residue r: rows
  p..p+rows-1 of it, a strided DMA with no copy in HBM, and head j of the tile is the sublane-strided
  slice tile[:, j, :]. Mosaic's tiling rule wants the block's heads a multiple of 8 or all of them
  (D is always the whole dimension, so any head_dim works), so a grid step takes TILE_HEADS heads, and
  under grouped-query attention the kv tile must be legal too (`heads_per_block`). A tile lies inside
  one residue (P % rows == 0), or holds whole ones: short residues (P < rows) are packed R = rows / P
  to a tile, the (P, R, heads, D) block of residues R*t .. R*t + R-1, and head j's rows are its R
  slices tile[:, r, j, :] one after the other: the pass's flat order. The band pass is the same view
  with S = 1.
- transposed (the fallback, and `IN_PLACE = False` to compare): XLA copies to [B, H, T, D] in the
  pass's flat order, one copy per array and pass; a step takes a (heads, rows, D) block. It serves
  the head counts for which no legal in-place block fits in VMEM, and tiles that would straddle
  residues.

The row statistics (lse, delta) are B*H*T float32 in the pass's flat order in both layouts, lane-dense:
[B, H, 8, T], each row repeated on the 8 sublanes of a tile (as jax's splash attention does). As
(rows, 1) columns a tile would pad its one lane to 128 in HBM under the 8 x 128 tiling; (8, rows)
pads nothing. Their transposes between passes are small next to a [B, T, H, D] array.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.experimental import pallas as pl

# Switches for comparing on a TPU (kernels.bench --variants transposed,heads-16).
IN_PLACE = True
TILE_HEADS = 8  # heads a grid step takes in place: the sublane count of the (H, D) plane's tiles
STACKED_LANES = 256  # transposed: lanes' worth of heads a grid step takes
LANES = 128
SUBLANES = 8
MAX_TILE_F32_BYTES = 4 * 2**20  # one f32 (rows, heads, D) tile a step; VMEM holds several


def _legal_heads(n: int, heads: int) -> bool:
    """Whether n of `heads` heads make a legal second-minor block dimension (a multiple of 8, or all)."""
    return n == heads or (n % SUBLANES == 0 and heads % n == 0)


def heads_per_block(heads: int, kv_heads: int, in_place: bool = True, head_dim: int = LANES) -> int:
    """Heads a grid step takes. In place: the fewest, at least TILE_HEADS where there are as many,
    whose block is legal for q and whose share of kv heads (n / group) is legal for k, v; 0 when none
    is. Transposed: up to STACKED_LANES lanes of heads when kv heads equal query heads, else 1."""
    group = heads // kv_heads
    if in_place:
        for n in range(min(TILE_HEADS, heads), heads + 1):
            if n % group == 0 and _legal_heads(n, heads) and _legal_heads(n // group, kv_heads):
                return n
        return 0
    if heads != kv_heads:
        return 1
    for n in range(max(1, STACKED_LANES // head_dim), 0, -1):
        if heads % n == 0:
            return n
    return 1


@dataclasses.dataclass(frozen=True)
class TileLayout:
    seq_len: int
    stride: int  # 1: natural order; S: residue-major order of stride S
    head_dim: int
    in_place: bool
    heads_per_block: int = 1  # heads a tile holds: (rows, heads, D) in place, (heads, rows, D) transposed

    @classmethod
    def choose(cls, seq_len: int, stride: int, head_dim: int, tile_rows, heads_per_block: int = 0,
               stacked_heads: int = 1) -> "TileLayout":
        """In place (heads_per_block heads a tile) when that is legal (0: it is not), each tile lies
        within one residue or holds whole ones, and a tile's f32 copy stays within MAX_TILE_F32_BYTES;
        else transposed (stacked_heads heads a tile)."""
        residue_len = seq_len // stride
        padded_dim = -(-head_dim // LANES) * LANES
        whole = lambda rows: rows % residue_len == 0 and stride % (rows // residue_len) == 0  # noqa: E731
        fits = (heads_per_block > 0 and all(residue_len % rows == 0 or whole(rows) for rows in tile_rows)
                and heads_per_block * max(tile_rows) * padded_dim * 4 <= MAX_TILE_F32_BYTES)
        if IN_PLACE and fits:
            return cls(seq_len, stride, head_dim, True, heads_per_block)
        return cls(seq_len, stride, head_dim, False, stacked_heads)

    def tile_shape(self, rows: int) -> tuple[int, ...]:
        """Shape of the kernels' f32 accumulators for one tile: (heads, rows, D) in both layouts."""
        return self.heads_per_block, rows, self.head_dim

    @property
    def residue_len(self) -> int:
        return self.seq_len // self.stride

    def shape(self, batch: int, heads: int) -> tuple[int, ...]:
        """Shape of a [batch, T, heads, D] array in this layout."""
        if self.in_place:
            return batch, self.residue_len, self.stride, heads, self.head_dim
        return batch, heads, self.seq_len, self.head_dim

    def to(self, x):
        """[B, T, H, D] -> this layout."""
        b, t, h, d = x.shape
        x = x.reshape(b, self.residue_len, self.stride, h, d)  # [b, p, r, h, d]: a bitcast on TPU
        if self.in_place:
            return x
        return x.transpose(0, 3, 2, 1, 4).reshape(b, h, t, d)  # flat r*P + p

    def back(self, x, heads: int):
        """This layout -> [B, T, H, D]."""
        b, t, d = x.shape[0], self.seq_len, self.head_dim
        if self.in_place:
            return x.reshape(b, t, heads, d)
        x = x.reshape(b, heads, self.stride, self.residue_len, d)  # [b, h, r, p, d]
        return x.transpose(0, 3, 2, 1, 4).reshape(b, t, heads, d)

    def lanes_to(self, x):
        """Row statistics [B, H, T] in natural order -> [B, H, 8, T] in this pass's order (lane-dense,
        repeated on 8 sublanes)."""
        b, h, t = x.shape
        x = x.reshape(b, h, self.residue_len, self.stride).swapaxes(2, 3).reshape(b, h, 1, t)
        return jnp.broadcast_to(x, (b, h, SUBLANES, t))

    def lanes_back(self, x):
        """[B, H, 8, T] in this pass's order -> [B, H, T] natural (sublane 0)."""
        b, h, _, t = x.shape
        return x[:, :, 0].reshape(b, h, self.stride, self.residue_len).swapaxes(2, 3).reshape(b, h, t)

    def spec(self, rows: int, tile, head) -> pl.BlockSpec:
        """BlockSpec of this layout's tiles for a grid (batch, head block, step) with the five
        scalar-prefetched arrays of a `schedule.VisitList`: tile(s, rows, cols) is the tile's index in
        the pass's flat order at step s, head(h) the index of its block of heads_per_block heads."""
        if not self.in_place:
            return pl.BlockSpec((None, self.heads_per_block, rows, self.head_dim),
                                lambda b, h, s, rows_, cols, *_: (b, head(h), tile(s, rows_, cols), 0))
        if rows > self.residue_len:  # packed: R whole residues a tile
            packed = rows // self.residue_len
            return pl.BlockSpec((None, self.residue_len, packed, self.heads_per_block, self.head_dim),
                                lambda b, h, s, rows_, cols, *_: (b, 0, tile(s, rows_, cols), head(h), 0))
        per_residue = self.residue_len // rows

        def index(b, h, s, rows_, cols, *_):
            t = tile(s, rows_, cols)
            return b, t % per_residue, t // per_residue, head(h), 0

        return pl.BlockSpec((None, rows, None, self.heads_per_block, self.head_dim), index)


def lanes_spec(rows: int, heads_per_block: int, tile) -> pl.BlockSpec:
    """BlockSpec of (heads_per_block, 8, rows) tiles of the [B, H, 8, T] lane-dense row statistics. On a
    TPU, rows must be a multiple of 128 or the whole sequence (pallas_tpu.check_compiled_blocks)."""
    return pl.BlockSpec((None, heads_per_block, SUBLANES, rows),
                        lambda b, h, s, rows_, cols, *_: (b, h, 0, tile(s, rows_, cols)))
