"""Where the TPU kernel's tiles live: a pass's arrays in HBM and the BlockSpecs that find one tile.

A pass (kernels/schedule.py) works on a flat row order: natural (stride 1) for the band pass,
residue-major (flat r*P + p holds position p*S + r, P = T/S) for the strided pass. Its kernels
see (rows, D) tiles of one head in that order. Two ways to lay the [B, T, H, D] arrays out for them:

- in place: a free reshape of [B, T, H, D] to [B, P, S*H*D]. Residue r of head h is the lane
  block r*H + h (D lanes wide) and its rows are p = 0..P-1, so a tile of `rows` rows of one residue
  is one (rows, D) block: a strided DMA, no copy. Mosaic's (8, 128) tiling rule makes that block
  legal when D is a multiple of 128, and a tile must not straddle two residues (P % rows == 0).
  The band pass is the same view with S = 1, which saves the [B, H, T, D] transposes as well.
  A grid step takes `heads_per_block` adjacent heads, TILE_LANES lanes of them where the heads
  allow: a step has a fixed cost (about 0.35 us), comparable to one head's 256 x 256 tile on the
  MXU, and heads narrower than 128 lanes (GPT-3 Small's 64) need company to make a legal block at
  all. Several heads a step needs as many kv heads as query heads, so that the block of k holds the
  same heads.
- transposed (the fallback, and `IN_PLACE = False` to compare): XLA transposes to [B, H, T, D] in
  the pass's flat order; it serves packed residues (P smaller than a tile), head_dim neither a
  multiple nor a divisor of 128, and narrow heads under grouped-query attention.

The row statistics (lse, delta) are B*H*T float32 in the pass's flat order in both layouts; at that
size their transposes are small next to a [B, T, H, D] array. The forward keeps them as columns,
[B, H, T, 1], since its softmax state is per row and they cross HBM once per query tile. The backward
takes them lane-dense, [B, H, 8, T], each row repeated on the 8 sublanes of a tile (as jax's splash
attention does for its dk/dv kernel): that kernel reloads them at every step, and a (rows, 1)
column tile pads its one lane to 128 in HBM under the (8, 128) tiling, where (8, rows) pads nothing.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.experimental import pallas as pl

# Switches for comparing layouts on a TPU (kernels.bench --variants transposed,head-per-step).
IN_PLACE = True
TILE_LANES = 256  # lanes of the heads one grid step takes in place (512 halves the steps again, at twice the VMEM)
LANES = 128
SUBLANES = 8


def heads_per_block(head_dim: int, heads: int, kv_heads: int, in_place: bool = True) -> int:
    """Adjacent heads one grid step takes: the most, up to TILE_LANES lanes of them, that divide the
    heads, when k, v have the query heads' count (a group of query heads must read one block of kv
    heads); else 1. In place the heads must also make a multiple of 128 lanes, with head_dim dividing
    128 or a multiple of it (1 for a narrower head then leaves no legal block: the pass is transposed).
    Transposed, a step takes a (heads, rows, head_dim) block of the [B, H, T, D] copy."""
    if heads != kv_heads or (in_place and head_dim % LANES and LANES % head_dim):
        return 1
    for n in range(max(1, TILE_LANES // head_dim), 0, -1):
        if heads % n == 0 and (not in_place or (n * head_dim) % LANES == 0):
            return n
    return 1


@dataclasses.dataclass(frozen=True)
class TileLayout:
    seq_len: int
    stride: int  # 1: natural order; S: residue-major order of stride S
    head_dim: int
    in_place: bool
    heads_per_block: int = 1  # adjacent heads a tile holds: side by side in place, stacked transposed

    @classmethod
    def choose(cls, seq_len: int, stride: int, head_dim: int, tile_rows, heads_per_block: int = 1,
               stacked_heads: int = 1) -> "TileLayout":
        """In place (heads_per_block heads a tile) when the tiles are legal blocks of the reshaped
        arrays, else transposed (stacked_heads heads a tile)."""
        residue_len = seq_len // stride
        fits = (head_dim * heads_per_block) % LANES == 0 and all(residue_len % rows == 0 for rows in tile_rows)
        if IN_PLACE and fits:
            return cls(seq_len, stride, head_dim, True, heads_per_block)
        return cls(seq_len, stride, head_dim, False, stacked_heads)

    @property
    def stacked(self) -> bool:
        """Whether a tile is (heads, rows, head_dim) rather than (rows, heads * head_dim)."""
        return not self.in_place and self.heads_per_block > 1

    def tile_shape(self, rows: int) -> tuple[int, ...]:
        """Shape of one tile (and of the kernels' f32 accumulators for it)."""
        if self.stacked:
            return self.heads_per_block, rows, self.head_dim
        return rows, self.width

    @property
    def width(self) -> int:
        """Lanes of a tile."""
        return self.head_dim * self.heads_per_block

    @property
    def residue_len(self) -> int:
        return self.seq_len // self.stride

    def shape(self, batch: int, heads: int) -> tuple[int, ...]:
        """Shape of a [batch, T, heads, D] array in this layout."""
        if self.in_place:
            return batch, self.residue_len, self.stride * heads * self.head_dim
        return batch, heads, self.seq_len, self.head_dim

    def to(self, x):
        """[B, T, H, D] -> this layout."""
        b, t, h, d = x.shape
        if self.in_place:
            return x.reshape(self.shape(b, h))
        x = x.reshape(b, self.residue_len, self.stride, h, d)  # [b, p, r, h, d]
        return x.transpose(0, 3, 2, 1, 4).reshape(b, h, t, d)  # flat r*P + p

    def back(self, x, heads: int):
        """This layout -> [B, T, H, D]."""
        b, t, d = x.shape[0], self.seq_len, self.head_dim
        if self.in_place:
            return x.reshape(b, t, heads, d)
        x = x.reshape(b, heads, self.stride, self.residue_len, d)  # [b, h, r, p, d]
        return x.transpose(0, 3, 2, 1, 4).reshape(b, t, heads, d)

    def rows_to(self, x):
        """Row statistics [B, H, T] in natural order -> [B, H, T, 1] in this pass's order."""
        b, h, t = x.shape
        return x.reshape(b, h, self.residue_len, self.stride).swapaxes(2, 3).reshape(b, h, t, 1)

    def lanes_to(self, x):
        """Row statistics [B, H, T] in natural order -> [B, H, 8, T] in this pass's order (lane-dense,
        repeated on 8 sublanes)."""
        b, h, t = x.shape
        x = x.reshape(b, h, self.residue_len, self.stride).swapaxes(2, 3).reshape(b, h, 1, t)
        return jnp.broadcast_to(x, (b, h, SUBLANES, t))

    def rows_back(self, x):
        """[B, H, T, 1] in this pass's order -> [B, H, T] natural."""
        b, h, t, _ = x.shape
        return x.reshape(b, h, self.stride, self.residue_len).swapaxes(2, 3).reshape(b, h, t)

    def spec(self, rows: int, heads: int, tile, head) -> pl.BlockSpec:
        """BlockSpec of this layout's tiles for a grid (batch, head block, step) with the five
        scalar-prefetched arrays of a `schedule.VisitList`: tile(s, rows, cols) is the tile's index
        in the pass's flat order at step s, head(h) its block of heads_per_block heads in an array of
        `heads` heads (h // group for k and v)."""
        if not self.in_place:
            heads_block = self.heads_per_block if self.stacked else None
            return pl.BlockSpec((None, heads_block, rows, self.head_dim),
                                lambda b, h, s, rows_, cols, *_: (b, head(h), tile(s, rows_, cols), 0))
        per_residue = self.residue_len // rows
        blocks_per_residue = heads // self.heads_per_block

        def index(b, h, s, rows_, cols, *_):
            t = tile(s, rows_, cols)
            if self.stride == 1:
                return b, t, head(h)
            return b, t % per_residue, (t // per_residue) * blocks_per_residue + head(h)

        return pl.BlockSpec((None, rows, self.width), index)


def rows_spec(rows: int, heads_per_block: int, tile) -> pl.BlockSpec:
    """BlockSpec of (heads_per_block, rows, 1) tiles of the [B, H, T, 1] row statistics (columns)."""
    return pl.BlockSpec((None, heads_per_block, rows, 1),
                        lambda b, h, s, rows_, cols, *_: (b, h, tile(s, rows_, cols), 0))


def lanes_spec(rows: int, heads_per_block: int, tile) -> pl.BlockSpec:
    """BlockSpec of (heads_per_block, 8, rows) tiles of the [B, H, 8, T] lane-dense row statistics. On a
    TPU, rows must be a multiple of 128 or the whole sequence (pallas_tpu.check_compiled_blocks)."""
    return pl.BlockSpec((None, heads_per_block, SUBLANES, rows),
                        lambda b, h, s, rows_, cols, *_: (b, h, 0, tile(s, rows_, cols)))
