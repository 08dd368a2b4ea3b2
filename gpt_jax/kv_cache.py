"""Key/value caches for cached decoding, laid out per attention pattern.

A decode step at position t needs, in each layer, the keys and values its pattern lets query t see.
Each pattern keeps them where one step can read exactly that set with static shapes (L = block_size):

| pattern              | cache                                                   | keys read per token |
|----------------------|---------------------------------------------------------|---------------------|
| dense                | natural layout [B, L]                                   | L                   |
| local(w)             | ring of W = min(w, L) slots: position p in slot p % W   | W                   |
| strided(s)           | residue-major [B, s, L/s]: position p at [p % s, p // s] | L/s                 |
| local_strided(w, s)  | the ring plus the residue-major table                   | W + L/s             |
| fixed(b, c)          | ring of the current block (b slots) plus the c summary   | b + c * L/b         |
|                      | columns of every block [B, L/b, c]                      |                     |
| heads(p1, p2, ...)   | one cache per head group, each its pattern's layout     | the groups' mean    |

Why these layouts: query t of a strided layer sees j = t, t - s, t - 2s, ...: every j with
j = t (mod s). In residue-major order these are one contiguous row, `table[t % s]`, so a step reads
L/s entries instead of L (with the same O(L) memory as a dense cache: later queries cycle through every
residue, so no past position can be dropped). The band (d < w) is a ring buffer: after writing
position t into slot t % W, the W slots hold exactly positions t - W + 1 .. t, whatever t is. For
local_strided, table entries with t - j < w are masked out, because the ring already holds them (each
pair is counted once, as in the mask of kernels.patterns). The fixed pattern is the same idea with
absolute positions: the ring holds the current block, the summary table the last c columns of each
earlier block.

Rows of a batch are independent: every row has its own position (`pos`, [B]), so prompts of different
lengths need no left padding. Prefill takes right-padded prompts with their lengths; padding
positions may leave garbage in a cache, but it is either overwritten before any query can see it
(decode writes position t before reading) or masked out (positions > t, or slots of earlier rows'
bands). The ring is filled from the prefill with each row's own last W valid positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.head_groups import split
from kernels.patterns import Pattern


def _ring_size(pattern: Pattern, block_size: int) -> int:
    return min(pattern.window, block_size) if pattern.kind in ("local", "local_strided") else 0


def init_layer(pattern: Pattern, batch: int, block_size: int, heads: int, head_dim: int, dtype) -> dict:
    """An empty cache for one layer (zeros; nothing in it is read before it is written)."""
    if pattern.kind == "heads":
        n = len(pattern.parts)
        return {"groups": tuple(init_layer(p, batch, block_size, heads // n, head_dim, dtype) for p in pattern.parts)}

    def z(*shape):
        return jnp.zeros((batch, *shape, heads, head_dim), dtype)

    L = block_size
    if pattern.kind == "dense":
        return {"k": z(L), "v": z(L)}
    out = {}
    if pattern.kind in ("local", "local_strided"):
        W = _ring_size(pattern, L)
        out.update(band_k=z(W), band_v=z(W))
    if pattern.kind in ("strided", "local_strided"):
        s = pattern.stride
        out.update(res_k=z(s, L // s), res_v=z(s, L // s))
    if pattern.kind == "fixed":
        b, c = pattern.block, pattern.c
        out.update(blk_k=z(b), blk_v=z(b), sum_k=z(L // b, c), sum_v=z(L // b, c))
    return out


# ----------------------------------------------------------------------------- prefill


def _rows_gather(x, idx):
    """x [B, T, ...], idx [B, N] -> x[b, idx[b, n]] as [B, N, ...]."""
    return jax.vmap(lambda xb, ib: xb[ib])(x, idx)


def prefill_layer(pattern: Pattern, cache: dict, k, v, lengths) -> dict:
    """Write the keys and values of a prefill chunk (positions 0..P-1, k, v [B, P, H, D]) into the cache.

    Row b's first lengths[b] positions are its prompt; the rest is padding. P is a multiple of the
    pattern's seq_multiple (the model pads the prefill), so the residue views below are exact.
    """
    if pattern.kind == "heads":
        n = len(pattern.parts)
        return {"groups": tuple(prefill_layer(p, c, kg, vg, lengths) for p, c, kg, vg in
                                zip(pattern.parts, cache["groups"], split(k, n), split(v, n)))}
    P = k.shape[1]
    new = dict(cache)
    if pattern.kind == "dense":
        new["k"] = cache["k"].at[:, :P].set(k)
        new["v"] = cache["v"].at[:, :P].set(v)
        return new
    if "band_k" in cache:
        W = cache["band_k"].shape[1]
        # Slot i gets the last valid position p <= lengths - 1 with p = i (mod W); p < 0: unused.
        last = lengths[:, None] - 1
        p = last - jnp.mod(last - jnp.arange(W)[None, :], W)
        idx = jnp.clip(p, 0, P - 1)
        new["band_k"] = _rows_gather(k, idx).astype(cache["band_k"].dtype)
        new["band_v"] = _rows_gather(v, idx).astype(cache["band_v"].dtype)
    if "res_k" in cache:
        s = pattern.stride
        def residue_major(x):  # [B, P, H, D] -> [B, s, P/s, H, D]: position p at [p % s, p // s]
            B, _, H, D = x.shape
            return x.reshape(B, P // s, s, H, D).transpose(0, 2, 1, 3, 4)
        new["res_k"] = cache["res_k"].at[:, :, :P // s].set(residue_major(k))
        new["res_v"] = cache["res_v"].at[:, :, :P // s].set(residue_major(v))
    if pattern.kind == "fixed":
        b, c = pattern.block, pattern.c
        # The ring holds the block that the first decode step (position lengths[b]) falls in.
        start = (lengths // b) * b
        idx = jnp.clip(start[:, None] + jnp.arange(b)[None, :], 0, P - 1)
        new["blk_k"] = _rows_gather(k, idx).astype(cache["blk_k"].dtype)
        new["blk_v"] = _rows_gather(v, idx).astype(cache["blk_v"].dtype)
        def summary(x):  # the last c columns of every block: [B, P/b, c, H, D]
            B, _, H, D = x.shape
            return x.reshape(B, P // b, b, H, D)[:, :, b - c:]
        new["sum_k"] = cache["sum_k"].at[:, :P // b].set(summary(k))
        new["sum_v"] = cache["sum_v"].at[:, :P // b].set(summary(v))
    return new


# ----------------------------------------------------------------------------- decode


def _set_rows(x, idx, val):
    """x[b, idx[b]] = val[b] for every row b (idx may be a tuple of index arrays)."""
    rows = jnp.arange(x.shape[0])
    idx = idx if isinstance(idx, tuple) else (idx,)
    return x.at[(rows, *idx)].set(val.astype(x.dtype))


def _attend_one(q, keys, values, mask):
    """One query per row: q [B, H, D] over keys, values [B, N, H, D] where mask [B, N]; float32 math."""
    scale = q.shape[-1] ** -0.5
    s = jnp.einsum("bhd,bnhd->bhn", q.astype(jnp.float32), keys.astype(jnp.float32)) * scale
    s = jnp.where(mask[:, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)  # every row sees at least itself, so no row is all -inf
    return jnp.einsum("bhn,bnhd->bhd", p, values.astype(jnp.float32)).astype(q.dtype)


def decode_layer(pattern: Pattern, cache: dict, q, k, v, pos):
    """One decode step: write k, v [B, H, D] at positions pos [B], then attend q [B, H, D] to the keys
    pattern allows position pos to see. Returns (out [B, H, D], cache)."""
    if pattern.kind == "heads":
        n = len(pattern.parts)
        steps = [decode_layer(p, c, qg, kg, vg, pos) for p, c, qg, kg, vg in
                 zip(pattern.parts, cache["groups"], split(q, n, 1), split(k, n, 1), split(v, n, 1))]
        return jnp.concatenate([out for out, _ in steps], axis=1), {"groups": tuple(c for _, c in steps)}
    new = dict(cache)
    t = pos[:, None]  # [B, 1]
    keys, values, masks = [], [], []
    if pattern.kind == "dense":
        new["k"], new["v"] = _set_rows(cache["k"], pos, k), _set_rows(cache["v"], pos, v)
        L = cache["k"].shape[1]
        keys, values, masks = [new["k"]], [new["v"]], [jnp.arange(L)[None, :] <= t]
    if "band_k" in cache:
        W = cache["band_k"].shape[1]
        new["band_k"] = _set_rows(cache["band_k"], pos % W, k)
        new["band_v"] = _set_rows(cache["band_v"], pos % W, v)
        held = t - jnp.mod(t - jnp.arange(W)[None, :], W)  # the position slot i holds: t-W+1..t
        keys.append(new["band_k"]), values.append(new["band_v"]), masks.append(held >= 0)
    if "res_k" in cache:
        s = pattern.stride
        new["res_k"] = _set_rows(cache["res_k"], (pos % s, pos // s), k)
        new["res_v"] = _set_rows(cache["res_v"], (pos % s, pos // s), v)
        n = new["res_k"].shape[2]
        r = pos % s
        keys.append(jax.vmap(lambda x, i: x[i])(new["res_k"], r))  # the row of residue t % s
        values.append(jax.vmap(lambda x, i: x[i])(new["res_v"], r))
        j = r[:, None] + s * jnp.arange(n)[None, :]
        d = t - j
        mask = d >= 0
        if pattern.kind == "local_strided":
            mask &= d >= pattern.window  # nearer ones are in the ring
        masks.append(mask)
    if pattern.kind == "fixed":
        b, c = pattern.block, pattern.c
        new["blk_k"] = _set_rows(cache["blk_k"], pos % b, k)
        new["blk_v"] = _set_rows(cache["blk_v"], pos % b, v)
        in_summary = (pos % b) >= b - c
        slot = jnp.maximum(pos % b - (b - c), 0)
        old_k = jax.vmap(lambda x, i, j: x[i, j])(cache["sum_k"], pos // b, slot)
        old_v = jax.vmap(lambda x, i, j: x[i, j])(cache["sum_v"], pos // b, slot)
        keep = in_summary[:, None, None]
        new["sum_k"] = _set_rows(cache["sum_k"], (pos // b, slot), jnp.where(keep, k, old_k))
        new["sum_v"] = _set_rows(cache["sum_v"], (pos // b, slot), jnp.where(keep, v, old_v))
        keys.append(new["blk_k"]), values.append(new["blk_v"])
        masks.append((t // b) * b + jnp.arange(b)[None, :] <= t)  # own block, up to t
        nb = new["sum_k"].shape[1]
        B, H, D = k.shape
        keys.append(new["sum_k"].reshape(B, nb * c, H, D))
        values.append(new["sum_v"].reshape(B, nb * c, H, D))
        masks.append(jnp.repeat(jnp.arange(nb), c)[None, :] < t // b)  # earlier blocks only
    out = _attend_one(q, jnp.concatenate(keys, 1), jnp.concatenate(values, 1), jnp.concatenate(masks, 1))
    return out, new


def keys_read_per_token(pattern: Pattern, block_size: int) -> float:
    """Cache entries one decode step of this pattern reads per head (the table above)."""
    if pattern.kind == "heads":
        return sum(keys_read_per_token(p, block_size) for p in pattern.parts) / len(pattern.parts)
    L = block_size
    return {"dense": L, "local": _ring_size(pattern, L), "strided": L // max(pattern.stride, 1),
            "local_strided": _ring_size(pattern, L) + L // max(pattern.stride, 1),
            "fixed": pattern.block + pattern.c * (L // max(pattern.block, 1))}[pattern.kind]
