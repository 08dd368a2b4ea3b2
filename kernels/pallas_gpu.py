"""Pallas Mosaic GPU kernel (H100) for dense, local, strided, local+strided and fixed causal attention,
fwd + bwd.

Same route as the TPU kernel (kernels/schedule.py, DESIGN.md "Making local+strided fast"):
  band pass      natural layout; each query tile visits only the key blocks within the window;
                 fixed(b, c)'s first pass is one too: causal within blocks of b (a segment mask);
  strided pass   residue-major layout (flat r*P + p holds position p*S + r, P = T/S): a causal
                 attention with diagonal offset ceil(window/S), residues packed block-diagonally
                 into a tile when P is small; read and written in place by strided TMA copies
                 (`in_place`), or on XLA-transposed copies for shapes whose residues do not tile;
  summary pass   fixed's second: natural queries against the last c positions of every block,
                 gathered by XLA into a short key sequence (kernels/summary_keys.py), whose dk/dv
                 XLA adds back at their positions;
  merge          the passes' (o, lse) by logsumexp, guarded for -inf rows: in the strided pass's
                 epilogue, which loads the band pass's rows (schedule.merge_partials in XLA on the
                 transposed fallback);
  backward       from the merged o and lse, each pass's flash backward (dq kernel over the forward
                 ranges, dk/dv kernel over the transposed ranges); each pass's kernels add the
                 earlier passes' f32 gradients and the last writes the input dtype (XLA sums on
                 the fallback).
The kernels themselves are in pallas_gpu_kernels.py, the TMA ring and row copies they share in pallas_gpu_parts.py.

Status (see kernels/NOTES.md): checked numerically on CPU in the Mosaic GPU interpreter and lowered
for CUDA on CPU, and compiled and checked against the float32 reference on an H100
(tests/test_kernels_gpu.py, 9 passed, 2026-11-23), but for fixed, which came later.
`VERIFIED_KINDS` gates `impl="auto"`.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from kernels import summary_keys
from kernels.dropout import for_kernels
from kernels.errors import UnsupportedInput, check_pattern_and_shapes
from kernels.flash_vjp import flash_vjp
from kernels.patterns import Pattern
from kernels.schedule import Pass, merge_partials, passes_for

# Pattern kinds whose compiled kernels passed tests/test_kernels_gpu.py on an H100 (2026-11-23):
# sparse_attention(impl="auto") runs the kernel for these, and for the others warns and uses the
# reference (impl="pallas_gpu" always runs it). fixed is checked in the Mosaic GPU interpreter and
# built by ptxas for an H100 (kernels.gpu_compile), not yet run on one: add it once its tests pass there.
VERIFIED_KINDS = ("dense", "local", "strided", "local_strided")

# The strided pass reads and writes [B, T, H, D] in place where its residues tile evenly (`in_place`).
# False runs it on XLA-transposed copies everywhere: the first version, kept to compare on a GPU.
STRIDED_IN_PLACE = True
# The forward's two compute warpgroups take turns on the tensor cores (FA3's ping-pong); False
# lets them run free, to compare on a GPU.
PINGPONG = True
# Row tiles (128 rows each) a forward CTA runs in turn, its TMA ring loading the next tile's blocks
# while it computes this one (kernels/NOTES.md); the grid shrinks by as much. 1 is the launch the H100
# run verified; the bench's tiles-N variants time the others (capped at a divisor of T / 128).
FORWARD_TILES = 1
# The same for the dq and dk/dv kernels (tiles of 128 query rows, and of 128 key rows).
BACKWARD_TILES = 1
# setmaxnreg budgets (compute warpgroup, memory warpgroup); (240, 24) leaves the memory warpgroup,
# which mostly waits on barriers, the fewest registers allowed: dk/dv spill less (kernels/NOTES.md).
REGISTERS = (232, 40)

SUPPORTED_KINDS = ("dense", "local", "strided", "local_strided", "fixed")
COMPILED_DTYPES = (jnp.bfloat16, jnp.float16)
INTERPRET_DTYPES = COMPILED_DTYPES + (jnp.float32,)
HEAD_DIMS = (64, 128)
LOG2E = 1.4426950408889634
BWD_BLOCK = 64  # streamed block of the dq and dk/dv kernels (shared memory: see _backward)


def _kernels():
    from kernels import pallas_gpu_kernels  # imports jax.experimental.pallas.mosaic_gpu lazily
    return pallas_gpu_kernels


def default_block_k(pattern: Pattern) -> int:
    """Streamed key (and, in dk/dv, query) block: 128 rows, or 64 for windows (or fixed's blocks) of
    at most 64."""
    span = pattern.window if pattern.kind in ("local", "local_strided") else pattern.block
    return 64 if 0 < span <= 64 else 128


def check_supported(q, k, v, pattern: Pattern, block_q: int, block_k: int, interpret) -> None:
    """Raise UnsupportedInput (a ValueError) naming what to change."""
    check_pattern_and_shapes("pallas_gpu", q, k, v, pattern, SUPPORTED_KINDS)
    b, t, h, d = q.shape
    allowed = INTERPRET_DTYPES if interpret else COMPILED_DTYPES
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype != q.dtype or x.dtype not in allowed:
            raise UnsupportedInput(
                f"pallas_gpu takes bfloat16 or float16 q, k, v of one dtype (float32 only in interpret "
                f"mode: wgmma would run it as tf32); {name} is {x.dtype}; cast to bfloat16")
    if d not in HEAD_DIMS:
        raise UnsupportedInput(f"pallas_gpu needs head_dim in {HEAD_DIMS}, got {d}")
    if block_q != 64:
        raise UnsupportedInput(f"pallas_gpu needs block_q=64 (rows per warpgroup; a CTA has two), got {block_q}")
    if block_k % 64 or block_k > 256:
        raise UnsupportedInput(f"pallas_gpu needs block_k in (64, 128, 192, 256), got {block_k}")
    if t % 128 or t % block_k:
        raise UnsupportedInput(f"pallas_gpu needs the sequence length {t} to be a multiple of 128 and of "
                               f"block_k={block_k}")
    pattern.check_seq_len(t)


# ------------------------------------------------------------------------------------------- layouts

def _to_residues(x, stride):
    """[B, T, ...] -> [B, T, ...] along axis 1 with flat index r*P + p holding position p*S + r."""
    b, t = x.shape[:2]
    return x.reshape(b, t // stride, stride, *x.shape[2:]).swapaxes(1, 2).reshape(x.shape)


def _from_residues(x, stride):
    b, t = x.shape[:2]
    return x.reshape(b, stride, t // stride, *x.shape[2:]).swapaxes(1, 2).reshape(x.shape)


def in_place(p: Pass, t: int, blocks) -> bool:
    """Whether the kernels read and write a residue-major pass in place (TMA copies of strided rows)
    rather than on transposed copies: residues of P = T/S rows, P a multiple of 8 (the swizzled
    tile's row group), and every block either inside one residue or made of whole residues."""
    if not p.residue_major or not STRIDED_IN_PLACE:
        return False
    seg = t // p.stride
    return seg % 8 == 0 and all(seg % n == 0 or n % seg == 0 for n in blocks)


def _seq_layout(p: Pass, t: int, blocks):
    """(to, back) for [B, T, H, D] arrays; the [B, H, T] lse/delta arrays use _lse_layout.

    In place, to/back are free reshapes to and from [B, T/S, S*H, D]; otherwise residue-major
    passes run on XLA-transposed copies (reads and writes of every operand: kernels/NOTES.md)."""
    if not p.residue_major:
        return (lambda x: x), (lambda x: x)
    if in_place(p, t, blocks):
        s = p.stride
        return (lambda x: x.reshape(x.shape[0], t // s, s * x.shape[2], x.shape[3]),
                lambda x: x.reshape(x.shape[0], t, x.shape[2] // s, x.shape[3]))
    return (lambda x: _to_residues(x, p.stride)), (lambda x: _from_residues(x, p.stride))


def _lse_layout(p: Pass):
    """(to, back) for [B, H, T] row statistics: transposed in either case (they are small)."""
    if not p.residue_major:
        return (lambda x: x), (lambda x: x)
    to = lambda x: _to_residues(x.swapaxes(1, 2), p.stride).swapaxes(1, 2)  # noqa: E731
    back = lambda x: _from_residues(x.swapaxes(1, 2), p.stride).swapaxes(1, 2)  # noqa: E731
    return to, back


def summary_len(p: Pass, t: int, block_k: int) -> int:
    """Gathered summary keys of fixed's second pass, padded to whole key tiles: the dk/dv kernel's
    128-row tiles (two warpgroups of 64) and the forward's streamed blocks."""
    tile = math.lcm(128, block_k)
    return -(-t // p.mask.block * p.mask.c // tile) * tile


def _keys(p: Pass, t: int, block_k: int, to):
    """The pass's key-side layout for k and v: `to`, or fixed's gathered summary keys."""
    if not p.gathers_keys:
        return to
    return lambda x: summary_keys.gather(x, p.mask.block, p.mask.c, summary_len(p, t, block_k))


def pass_name(p: Pass, t: int) -> str:
    """Names the pass's kernels: "strided" (residue-major), "summary" (fixed's gathered keys), "blocks"
    (fixed's block-diagonal pass), "causal" (every earlier key) or "band"."""
    if p.residue_major:
        return "strided"
    if p.gathers_keys:
        return "summary"
    if p.mask.seg_len < t:
        return "blocks"
    return "causal" if p.mask.hi >= t else "band"


def _config(p: Pass, t, block_q, block_k, interpret, kernel="fwd", dropout=None):
    """The PassConfig of `kernel` ("fwd", "dq" or "dkv") for pass p."""
    K = _kernels()
    residues = p.stride if in_place(p, t, (block_q, block_k)) else 0
    key_len = summary_len(p, t, block_k) if p.gathers_keys else 0
    tile_rows = (key_len or t) if kernel == "dkv" else t  # dk/dv tiles run over the keys
    tiles = math.gcd(FORWARD_TILES if kernel == "fwd" else BACKWARD_TILES, tile_rows // (2 * block_q))
    common = dict(interpret=interpret, residues=residues, name=pass_name(p, t), tiles=tiles, registers=REGISTERS,
                  dropout=dropout, residue_stride=p.stride if p.residue_major else 0, key_len=key_len)
    if kernel == "dkv":  # per-warpgroup key rows = 64 (wgmma M), streamed query blocks of block_k
        return K.PassConfig(p.mask, t, block_q=block_k, block_k=block_q, **common)
    return K.PassConfig(p.mask, t, block_q=block_q, block_k=block_k, pingpong=PINGPONG, **common)


# ------------------------------------------------------------------------------------------ passes

def _chained(passes, t: int, blocks) -> bool:
    """Whether every pass reads [B, T, H, D] in place, so each can take the earlier passes' partial
    results (o and lse forward, f32 gradients backward) into its kernels' epilogues."""
    return all(not p.residue_major or in_place(p, t, blocks) for p in passes)


def _forward(q, k, v, pattern, block_q, block_k, interpret, dropout=None, seeds=None):
    """o [B, T, H, D] in q.dtype, lse [B, H, T] f32 (of the undropped probabilities)."""
    t = q.shape[1]
    blocks = (block_q, block_k)
    passes = passes_for(pattern, t)
    chained = _chained(passes, t, blocks)  # else the passes' (o, lse) merge in XLA at the end
    partials = []
    for p in passes:
        to, back = _seq_layout(p, t, blocks)
        lto, lback = _lse_layout(p)
        earlier = (to(partials[-1][0]), lto(partials[-1][1])) if chained and partials else None
        cfg = _config(p, t, block_q, block_k, interpret, dropout=dropout)
        keys = _keys(p, t, block_k, to)
        o, lse = _kernels().pass_forward(to(q), keys(k), keys(v), cfg, earlier, seeds=seeds)
        partials.append((back(o), lback(lse)))
    if chained or len(partials) == 1:
        return partials[-1]
    (o1, l1), (o2, l2) = partials
    o, lse = merge_partials(o1.astype(jnp.float32), l1.swapaxes(1, 2), o2.astype(jnp.float32),
                            l2.swapaxes(1, 2), xp=jnp)
    return o.astype(q.dtype), lse.swapaxes(1, 2)


def _backward(q, k, v, o, lse, do, pattern, block_q, block_k, interpret, dropout=None, seeds=None):
    b, t, h, d = q.shape
    hk = k.shape[2]
    delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), o.astype(jnp.float32))
    lse2 = jnp.where(jnp.isneginf(lse), jnp.inf, lse * LOG2E)  # rows with no key: P = exp2(s - inf) = 0
    do = do.astype(q.dtype)
    block_k = BWD_BLOCK  # f32 dq/dk/dv staging + resident q/dO (or k/v) leave room for a 64-row ring only
    blocks = (block_q, block_k)
    passes = passes_for(pattern, t)
    # Chained, each pass's kernels add the earlier passes' f32 gradients in their epilogue and the
    # last pass writes the input dtype: no XLA sum or cast (GQA's dk/dv stay f32 for the sum over
    # the group). Otherwise the passes' f32 outputs add in XLA.
    chained = _chained(passes, t, blocks)
    dq = dk = dv = None
    for i, p in enumerate(passes):
        to, back = _seq_layout(p, t, blocks)
        lto, _ = _lse_layout(p)
        keys = _keys(p, t, block_k, to)
        args = (to(q), keys(k), keys(v), to(do), lto(lse2), lto(delta))
        cfg, cfg_dkv = (_config(p, t, block_q, block_k, interpret, kernel, dropout) for kernel in ("dq", "dkv"))
        if chained:
            last = i == len(passes) - 1
            gq = _kernels().pass_dq(*args, cfg, partial=None if dq is None else to(dq),
                                    out_dtype=q.dtype if last else jnp.float32, seeds=seeds)
            dq = back(gq)
            if p.gathers_keys:  # per gathered key: XLA adds them at their positions
                gk, gv = _kernels().pass_dkv(*args, cfg_dkv, seeds=seeds)
                dk = summary_keys.add_back(dk, gk, p.mask.block, p.mask.c)
                dv = summary_keys.add_back(dv, gv, p.mask.block, p.mask.c)
                continue
            gk, gv = _kernels().pass_dkv(*args, cfg_dkv, partials=None if dk is None else (to(dk), to(dv)),
                                         out_dtype=k.dtype if last and h == hk else jnp.float32, seeds=seeds)
            dk, dv = back(gk), back(gv)
        else:
            gq = back(_kernels().pass_dq(*args, cfg, seeds=seeds))
            gk, gv = (back(g) for g in _kernels().pass_dkv(*args, cfg_dkv, seeds=seeds))
            dq, dk, dv = (gq, gk, gv) if dq is None else (dq + gq, dk + gk, dv + gv)
    if h != hk:
        dk = dk.reshape(b, t, hk, h // hk, d).sum(axis=3)
        dv = dv.reshape(b, t, hk, h // hk, d).sum(axis=3)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


# attention(q, k, v, seeds, pattern, block_q, block_k, interpret, dropout): seeds [B, H] int32, no gradient
_attention = flash_vjp(_forward, _backward)


def sparse_attention_gpu(q, k, v, pattern: Pattern, *, block_q: int | None = None, block_k: int | None = None,
                         interpret=False, dropout_rate: float = 0.0, dropout_seed=None):
    """Causal sparse attention with Mosaic GPU kernels. q: [B, T, H, D], k/v: [B, T, Hk, D] -> [B, T, H, D].

    block_q: query rows per compute warpgroup (64; a CTA runs two). block_k: streamed key block of the
    forward and dq kernels, and streamed query block of the dk/dv kernel (default `default_block_k`).
    interpret: False compiles for the GPU; True (or a plgpu.InterpretGPUParams) runs the Mosaic GPU
    interpreter on any backend (slow; float32 inputs allowed there).
    dropout_rate > 0: probabilities dropped inside the kernels by kernels/dropout.py's hash of
    (dropout_seed: an int32 scalar or [B, H] seeds, batch row, head, query position, key position).
    """
    block_q = block_q or 64
    block_k = block_k or default_block_k(pattern)
    check_supported(q, k, v, pattern, block_q, block_k, interpret)
    if interpret is True:
        from jax.experimental.pallas import mosaic_gpu as plgpu
        interpret = plgpu.InterpretGPUParams()
    dropout, seeds = for_kernels(dropout_rate, dropout_seed, q.shape[0], q.shape[2])
    return _attention(q, k, v, seeds, pattern, block_q, block_k, interpret or False, dropout)
