"""How one grid step's heads sit in its tiles, and the per-head pieces the kernels work on.

A grid step takes several heads (TileLayout.heads_per_block): a step has a fixed cost, and in place a
legal block of the (H, D) plane holds 8 heads or all of them. In place a tile is (rows, heads, D) and
head j is the sublane-strided slice tile[:, j, :]; transposed it is (heads, rows, D) and head j is
tile[j]. A packed in-place tile, (P, R, heads, D), holds R whole residues of P rows; head j's rows are
tile[:, r, j, :] for r = 0..R-1, one after the other (the pass's residue-major order). Under
grouped-query attention in place, the kv tile holds heads / group kv heads, and query head j reads kv
head j // group. The kernels' f32 accumulators are (heads, rows, D) in both layouts.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kernels.pallas_tpu_layout import SUBLANES


@dataclasses.dataclass(frozen=True)
class TileHeads:
    heads: int       # query heads in a tile
    group: int       # query heads per kv head within the kv tile (1: it holds the same heads)
    in_place: bool   # (rows, heads, D) tiles rather than (heads, rows, D)

    def q(self, ref, j: int):
        """Head j's [rows, D] of a query-side tile (q, dO, o, dq), or of a key-side tile per query head."""
        if not self.in_place:
            return ref[j]
        if ref.ndim == 4:  # packed residues
            return jnp.concatenate([ref[:, r, j, :] for r in range(ref.shape[1])], axis=0)
        return ref[:, j, :]

    def kv(self, ref, j: int):
        """The [rows, D] of the kv head that query head j reads in a key-side tile."""
        return self.q(ref, j // self.group)

    def store(self, ref, j: int, x) -> None:
        """Write head j's [rows, D] into a tile (query side, or key side per query head)."""
        x = x.astype(ref.dtype)
        if not self.in_place:
            ref[j] = x
        elif ref.ndim == 4:
            rows = ref.shape[0]
            for r in range(ref.shape[1]):
                ref[:, r, j, :] = x[r * rows:(r + 1) * rows]
        else:
            ref[:, j, :] = x


def column(lanes_ref, j: int):
    """Head j's lane-dense statistics (a (heads, 8, rows) tile) as a [rows, 1] column."""
    return jnp.expand_dims(lanes_ref[j, 0], -1)


def row(lanes_ref, j: int):
    """Head j's lane-dense statistics as a [1, rows] row."""
    return lanes_ref[j, :1]


def lanes(col):
    """A [rows, 1] column as the (8, rows) lane-dense tile of the row statistics."""
    return jnp.broadcast_to(jnp.expand_dims(col[:, 0], 0), (SUBLANES, col.shape[0]))
