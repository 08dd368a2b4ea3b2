"""fixed(block, c)'s summary keys in XLA, for both kernels' second pass (kernels/schedule.py: SummaryMask):
the last c positions of every block gathered into a short key sequence, and their gradients added back."""

from __future__ import annotations

import jax.numpy as jnp


def gather(x, block: int, c: int, n_keys: int):
    """[B, T, H, D] -> [B, n_keys, H, D]: the last c positions of every block (a strided slice), then
    zero padding up to n_keys (whole key blocks). Padding keys are never visible: their gathered index
    is beyond every query's threshold."""
    b, t, h, d = x.shape
    x = x.reshape(b, t // block, block, h, d)[:, :, block - c:].reshape(b, t // block * c, h, d)
    return jnp.pad(x, ((0, 0), (0, n_keys - x.shape[1]), (0, 0), (0, 0)))


def add_back(acc, g, block: int, c: int):
    """acc [B, T, H, D] plus the gradients g [B, n_keys, H, D] of the gathered keys at their positions
    (the padding's gradients dropped)."""
    b, t, h, d = acc.shape
    g = g[:, :t // block * c].reshape(b, t // block, c, h, d)
    return acc.reshape(b, t // block, block, h, d).at[:, :, block - c:].add(g).reshape(b, t, h, d)

