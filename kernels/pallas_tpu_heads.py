"""How the heads of one TPU tile sit in its lanes, and the per-head pieces the kernels work on.

A grid step takes `heads` adjacent heads (TileLayout.heads_per_block): several heads per step amortize
the fixed cost of a grid step, and in place heads narrower than 128 lanes need company to make a
legal block at all. Transposed, the tile is (heads, rows, head_dim) and head j is tile[j]. In place it
is (rows, heads * head_dim), read in 128-lane-aligned windows of max(head_dim, 128) lanes (free static
slices). A window of heads narrower than 128 holds 128 // head_dim of them; each head's matmuls then
run on the window with the other heads' lanes of q (or dO) zeroed, so a 128-deep contraction is that
head's own, and keep their own lanes of each 128-wide product. The MXU pads a 64-deep or 64-wide
matmul to its width anyway, so the zeros should cost no extra passes.
"""

from __future__ import annotations

import dataclasses
import functools
import operator

import jax.numpy as jnp
from jax import lax

from kernels.pallas_tpu_layout import LANES


@dataclasses.dataclass(frozen=True)
class HeadLanes:
    heads: int      # heads in the tile
    head_dim: int
    stacked: bool = False  # (heads, rows, head_dim) tiles rather than (rows, heads * head_dim)

    @property
    def width(self) -> int:
        """Lanes of one window: one head's when stacked or alone, else max(head_dim, 128)."""
        return self.head_dim if self.heads == 1 or self.stacked else max(self.head_dim, LANES)

    @property
    def per_window(self) -> int:
        return self.width // self.head_dim

    def windows(self):
        """(index of the window in a tile-shaped ref, [(head, slot within the window), ...]) per window."""
        for w in range(self.heads // self.per_window):
            heads = [(w * self.per_window + s, s) for s in range(self.per_window)]
            yield ((w,) if self.stacked else (slice(None), slice(w * self.width, (w + 1) * self.width))), heads

    def slot(self, x, s: int):
        """x [rows, window] with every lane outside slot s zeroed (x itself when a window is one head)."""
        if self.per_window == 1:
            return x
        lane = lax.broadcasted_iota(jnp.int32, x.shape, 1)
        return jnp.where((lane >= s * self.head_dim) & (lane < (s + 1) * self.head_dim), x, 0)

    def join(self, parts):
        """One [rows, window] array holding part s's lanes of slot s (a part may be [rows, 1])."""
        if len(parts) == 1:
            return parts[0]
        spread = [self.slot(jnp.broadcast_to(x, (x.shape[0], self.width)), s) for s, x in enumerate(parts)]
        return functools.reduce(operator.add, spread)


def column(lanes_ref, j: int):
    """Head j's lane-dense statistics (a (heads, 8, rows) tile) as a [rows, 1] column."""
    return jnp.expand_dims(lanes_ref[j, 0], -1)


def row(lanes_ref, j: int):
    """Head j's lane-dense statistics as a [1, rows] row."""
    return lanes_ref[j, :1]
