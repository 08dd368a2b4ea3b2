"""Splash attention (jax's own TPU flash kernel, block-sparse by mask) for kernels.bench.

The pattern reaches splash as a lazily computed mask (`Pattern.visible` on index arrays, on the host
for the block metadata and inside the kernel for partial blocks), so no [T, T] array is built. Splash
skips the blocks with nothing visible; in the natural layout every causal block holds strided pairs,
so for local+strided it skips little: it is the baseline of "what jax gives you" on a TPU. It takes
[heads, seq, head_dim] per batch row and unscaled softmax, so the wrapper transposes, scales q and
vmaps over the batch; the transposes are part of its time, as they would be in a [B, T, H, D] model.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_mask import _ComputableMask

from kernels.errors import NotAvailable
from kernels.head_groups import pattern_per_head
from kernels.patterns import Pattern


class PatternMask(_ComputableMask):
    """One head's [seq, seq] mask of a pattern, computed where splash needs it."""

    def __init__(self, seq: int, pattern: Pattern):
        self.pattern = pattern
        super().__init__((seq, seq), pattern.visible)

    def __eq__(self, other):
        return isinstance(other, PatternMask) and (self.shape, self.pattern) == (other.shape, other.pattern)

    def __hash__(self):
        return hash((PatternMask, self.shape, self.pattern))


@functools.lru_cache(maxsize=16)
def _kernel(pattern: Pattern, seq: int, heads: int, interpret: bool):
    # Building the block metadata evaluates the mask block by block on the host: once per shape.
    block = min(512, seq)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = splash.MultiHeadMask([PatternMask(seq, p) for p in pattern_per_head(pattern, heads)])
    return splash.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_attention(pattern: Pattern, seq: int, heads: int, head_dim: int, interpret: bool = False):
    """attend(q, k, v) on [batch, seq, heads, head_dim] through splash attention."""
    if jax.devices()[0].platform != "tpu" and not interpret:
        raise NotAvailable("splash attention is a TPU kernel (--interpret runs it on CPU)")
    if seq % 128:
        raise NotAvailable(f"splash attention needs the sequence length {seq} to be a multiple of 128")
    kernel = _kernel(pattern, seq, heads, bool(interpret))
    scale = head_dim ** -0.5
    heads_first = lambda x: x.transpose(0, 2, 1, 3)
    return lambda q, k, v: heads_first(jax.vmap(kernel)(heads_first(q * scale), heads_first(k), heads_first(v)))
