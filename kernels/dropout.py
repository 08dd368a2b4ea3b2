"""Attention dropout as a pure function of (seed, batch row, head, query position, key position).

A fused kernel cannot store the [T, T] dropout mask, and its backward must drop the same
probabilities as its forward: so the mask is a hash, recomputed wherever it is needed, and every
implementation (the reference in XLA, the Mosaic GPU kernel in registers) computes the same bits:

    head_seed[b, h] = mix(seed + mix(b * heads + h))       once per (batch row, head), in XLA, over the
                                                           whole [batch, heads] before any split
    row_key(i)      = mix(head_seed ^ i)                   once per query row
    keep(i, j)      = (mix(row_key(i) ^ j) >>> 8) >= round(rate * 2^24)

`mix` is Chris Wellons' lowbias32 integer hash (two multiply / xor-shift rounds; a bijection on 32
bits), so keys of one row never collide, and P(keep) = 1 - rate to within 2^-24. Everything is int32
with wrapping multiplies and logical shifts, which jax.numpy, XLA and Mosaic GPU all have.

Kept probabilities are scaled by 1 / (1 - rate), so the output's expectation is plain attention; the
softmax normalizer and the log-sum-exp are those of the undropped probabilities (as in FlashAttention).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_M1 = np.int32(0x7FEB352D)
_M2 = np.uint32(0x846CA68B).view(np.int32)
BITS = 24  # the compared bits of a hash: P(keep) is a multiple of 2^-24


def mix(x):
    """lowbias32 on int32 arrays (wrapping): jnp arrays in XLA, or register arrays inside a kernel."""
    x = x ^ lax.shift_right_logical(x, np.int32(16))
    x = x * _M1
    x = x ^ lax.shift_right_logical(x, np.int32(15))
    x = x * _M2
    return x ^ lax.shift_right_logical(x, np.int32(16))


@dataclasses.dataclass(frozen=True)
class Dropout:
    """Static half of attention dropout: the rate (the seed is a traced int32 scalar beside it)."""
    rate: float

    def __post_init__(self):
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {self.rate}")

    @property
    def threshold(self) -> int:
        """keep iff the hash's top 24 bits are at least this."""
        return int(round(self.rate * 2 ** BITS))

    @property
    def scale(self) -> float:
        return 1.0 / (1.0 - self.rate)


def seed_from_key(key):
    """An int32 dropout seed from a jax.random key."""
    return lax.bitcast_convert_type(jax.random.bits(key, (), jnp.uint32), jnp.int32)


def head_seeds(seed, batch: int, heads: int):
    """[batch, heads] int32 per-(row, head) seeds, what the kernels read, from an int32 scalar seed.

    A [batch, heads] array is taken as it is: a caller that shards the batch or the heads (or splits
    the heads into groups of a per-head pattern) computes the seeds of the whole array once and hands
    each part its slice, so the mask does not depend on how the work was split."""
    seed = jnp.asarray(seed, jnp.int32)
    if seed.ndim == 2:
        if seed.shape != (batch, heads):
            raise ValueError(f"per-head dropout seeds must be [batch, heads] = {(batch, heads)}, got {seed.shape}")
        return seed
    if seed.ndim:
        raise ValueError(f"dropout_seed must be an int32 scalar or a [batch, heads] array, got shape {seed.shape}")
    index = jnp.arange(batch, dtype=jnp.int32)[:, None] * heads + jnp.arange(heads, dtype=jnp.int32)
    return mix(seed + mix(index))


def for_kernels(rate: float, seed, batch: int, heads: int):
    """(Dropout or None, [batch, heads] int32 seeds) as a kernel backend's custom_vjp takes them: no
    dropout at rate 0, and then zeros for the seeds (an input the kernels do not read)."""
    if not rate:
        return None, jnp.zeros((batch, heads), jnp.int32)
    return Dropout(rate), head_seeds(seed, batch, heads)


def positions(flat, seq_len: int, stride: int):
    """Sequence positions of a pass's flat rows: the rows themselves (stride 0), or in a residue-major
    pass (kernels/schedule.py: flat r*P + p holds position p*S + r, S = stride, P = T / S) mapped back,
    so every pass hashes positions. Plain int32 ops, for XLA and inside kernels alike."""
    if not stride:
        return flat
    seg = seq_len // stride
    if seg & (seg - 1) == 0:  # a mask and a shift, not a division, for power-of-two residues
        p, r = flat & np.int32(seg - 1), lax.shift_right_logical(flat, np.int32(seg.bit_length() - 1))
    else:
        full = jnp.full(flat.shape, seg, jnp.int32)
        p, r = lax.rem(flat, full), lax.div(flat, full)
    return p * np.int32(stride) + r


def gathered_positions(flat, block: int, c: int):
    """Sequence positions of fixed(block, c)'s gathered summary keys (kernels/schedule.py): gathered
    g is position (g // c) * block + block - c + g % c, the last c of every block."""
    per_block = jnp.full(flat.shape, c, jnp.int32)
    return lax.div(flat, per_block) * np.int32(block) + np.int32(block - c) + lax.rem(flat, per_block)


def row_keys(head_seed, query_pos):
    return mix(head_seed ^ query_pos)


def keep(row_key, key_pos, dropout: Dropout):
    """Whether probability (row, key) is kept; row_key and key_pos broadcast against each other."""
    return lax.shift_right_logical(mix(row_key ^ key_pos), np.int32(32 - BITS)) >= dropout.threshold


def keep_mask(seeds, query_pos, key_pos, dropout: Dropout):
    """[batch, heads, len(query_pos), len(key_pos)] bool from [batch, heads] seeds: the mask every
    implementation applies."""
    rows = row_keys(seeds[:, :, None, None], jnp.asarray(query_pos, jnp.int32)[:, None])
    return keep(rows, jnp.asarray(key_pos, jnp.int32)[None, :], dropout)
