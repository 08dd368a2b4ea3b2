"""Pallas Mosaic TPU sparse attention: dense, local, strided, local+strided and fixed causal, forward and backward.

Route (kernels/schedule.py): a pattern is one or two passes, each a flash attention over a
block-sparse list of key blocks given to the kernels by scalar prefetch (kernels/pallas_tpu_kernels.py):
  band pass      natural order, the key blocks within the window of each query tile;
  strided pass   residue-major order, a causal attention with a diagonal offset per residue,
                 residues packed block-diagonally into a tile when T/S is small;
  fixed(b, c)    a block-diagonal causal pass, then one over the summary keys of earlier blocks,
                 gathered by XLA into a short key sequence (kernels/schedule.py: SummaryMask).
The passes chain: the strided pass starts its online softmax from the band pass's (o, lse) and writes
the merged output; backward, each pass recomputes P = exp(S - lse) from the merged lse (dS = P * (dP -
rowsum(dO * o))) with a dq kernel on the forward lists and a dk/dv kernel on the transposed lists, and
the last pass adds the first one's f32 gradients before it writes them.

The public entry takes [batch, seq, heads, head_dim]. Where the tiles allow it (tiles within one
residue; 8 heads a step, or all of them) the kernels read and write those arrays in place, through
[B, T/S, S, H, D] views that are bitcasts on a TPU; otherwise XLA transposes them per pass
(kernels/pallas_tpu_layout.py). Grouped-query attention: query head j of a tile reads kv head
j // group; dk/dv are computed per query head and summed over each group in XLA.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from kernels import summary_keys
from kernels.dropout import Dropout, for_kernels
from kernels.errors import UnsupportedInput, check_pattern_and_shapes
from kernels.flash_vjp import flash_vjp
from kernels.pallas_tpu_kernels import PassDropout, pass_backward, pass_forward
from kernels.pallas_tpu_layout import LANES, TileLayout, heads_per_block
from kernels.patterns import Pattern
from kernels.platform import target_platform
from kernels.schedule import Pass, passes_for

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)
SUPPORTED_KINDS = ("dense", "local", "strided", "local_strided", "fixed")


def default_block(seq_len: int, cap: int = 512) -> int:
    """Largest power of two <= cap dividing seq_len (at least 8, the TPU sublane count)."""
    b = cap
    while b >= 8:
        if seq_len % b == 0:
            return b
        b //= 2
    raise UnsupportedInput(f"sequence length {seq_len} must be a multiple of 8 for the pallas_tpu kernel")


def default_block_for(pattern: Pattern, seq_len: int) -> int:
    """Tile size when none is given: 512 for dense/strided work; for a band (or fixed's blocks), about
    the window (at least 128, the MXU width), because a query tile visits ceil((window - 1) / b) + 1 key
    blocks of b, so tiles much wider than the window mostly compute masked-out pairs."""
    cap = 512
    span = pattern.window or pattern.block
    if span:
        cap = max(128, min(512, 1 << (span.bit_length() - 1)))
    return default_block(seq_len, cap)


def residue_pass_block(block: int, seq_len: int, stride: int, floor: int = 128) -> int:
    """Tile of the strided pass: a tile holding many short residues computes mostly masked-out pairs
    (block-diagonal), so shrink it towards the residue length T/S, but not below `floor` (MXU width)."""
    target = max(seq_len // stride, floor)
    while block > target and block % 2 == 0 and (block // 2) % 8 == 0:
        block //= 2
    return block


def check_supported(q, k, v, pattern: Pattern, block_q: int, block_k: int) -> None:
    """Raise UnsupportedInput (a ValueError) naming what to change."""
    check_pattern_and_shapes("pallas_tpu", q, k, v, pattern, SUPPORTED_KINDS)
    b, t, h, d = q.shape
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in SUPPORTED_DTYPES:
            raise UnsupportedInput(f"pallas_tpu supports float32 and bfloat16 inputs; {name} is {x.dtype}")
    if d % 8 or d > 512:
        raise UnsupportedInput(f"pallas_tpu needs head_dim a multiple of 8 and <= 512 (128 is best), got {d}")
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if blk % 8 or t % blk:
            raise UnsupportedInput(f"{name}={blk} must be a multiple of 8 dividing the sequence length {t}")
    pattern.check_seq_len(t)


def check_compiled_blocks(plan: list["PassPlan"]) -> None:
    """On a TPU (not in the interpreter) the lane-dense row statistics come in (8, rows) tiles, which
    Mosaic takes for rows a multiple of 128 or the whole sequence."""
    for pp in plan:
        if pp.block_q % LANES and pp.block_q != pp.q_layout.seq_len:
            raise UnsupportedInput(
                f"pallas_tpu on a TPU needs query tiles of a multiple of 128 rows or the whole sequence; "
                f"block_q={pp.block_q} in a pass over {pp.q_layout.seq_len} rows (use a sequence length that is a "
                f"multiple of 128, or block_q=128)")


# ------------------------------------------------------------------------------------ passes, chained

def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class PassPlan:
    """One pass with its tile sizes and the layouts of its query-side and key-side arrays."""
    p: Pass
    block_q: int
    block_k: int
    q_layout: TileLayout
    kv_layout: TileLayout

    def keys(self, x):
        """[B, T, Hk, D] natural -> this pass's keys in kv_layout. fixed's summary pass takes the last c
        positions of every block (a strided slice) and pads them to whole key blocks; padding keys
        are never visible (their gathered index is beyond every query's threshold)."""
        if self.p.gathers_keys:
            x = summary_keys.gather(x, self.p.mask.block, self.p.mask.c, self.kv_layout.seq_len)
        return self.kv_layout.to(x)

    def dropout(self, dropout: Dropout | None) -> PassDropout | None:
        """What this pass's kernels need to drop probabilities: the rate and how flat rows map to positions."""
        if dropout is None:
            return None
        summary = (self.p.mask.block, self.p.mask.c) if self.p.gathers_keys else ()
        return PassDropout(dropout, self.p.stride if self.p.residue_major else 0, summary)

    def add_key_grads(self, acc, g, heads: int):
        """Gradient g of this pass's keys (kv_layout, per query head) added at their natural positions of
        acc [B, T, H, D] f32 (None when this is the first pass)."""
        g = self.kv_layout.back(g, heads)
        if not self.p.gathers_keys:
            return g if acc is None else acc + g
        return summary_keys.add_back(acc, g, self.p.mask.block, self.p.mask.c)


def plan_passes(pattern, q, k, block_q, block_k) -> list[PassPlan]:
    """The passes of `pattern` for q [B, T, H, D] and k [B, T, Hk, D]: tiles and layouts of each."""
    t, heads, d = q.shape[1:]
    kv_heads = k.shape[2]
    plan = []
    for p in passes_for(pattern, t):
        bq, bk, n_keys = block_q, block_k, t
        if p.residue_major:
            bq, bk = residue_pass_block(bq, t, p.stride), residue_pass_block(bk, t, p.stride)
        if p.gathers_keys:
            n_keys = t // p.mask.block * p.mask.c
            bk = min(bk, _round_up(n_keys, 8))
            n_keys = _round_up(n_keys, bk)
        plan.append(PassPlan(p, bq, bk, *_layouts(t, p.stride or 1, n_keys, d, bq, bk, heads, kv_heads)))
    return plan


def _layouts(t, stride, n_keys, d, bq, bk, heads, kv_heads) -> tuple[TileLayout, TileLayout]:
    """A pass's query-side and key-side layouts. The kernels index both sides' tiles alike, so both are
    in place (the key side with the query tile's kv heads) or both transposed."""
    group = heads // kv_heads
    in_place_heads = heads_per_block(heads, kv_heads)  # 0: no legal in-place block
    stacked = heads_per_block(heads, kv_heads, in_place=False, head_dim=d)
    kv_stride = stride if n_keys == t else 1
    q_layout = TileLayout.choose(t, stride, d, (bq,), in_place_heads, stacked)
    kv_layout = TileLayout.choose(n_keys, kv_stride, d, (bk,), in_place_heads // group, stacked)
    if q_layout.in_place != kv_layout.in_place:
        q_layout, kv_layout = TileLayout(t, stride, d, False, stacked), TileLayout(n_keys, kv_stride, d, False, stacked)
    return q_layout, kv_layout


def _forward(q, k, v, pattern, block_q, block_k, interpret, dropout=None, seeds=None):
    """q: [B, T, H, D], k/v: [B, T, Hk, D] -> o [B, T, H, D] in q.dtype, lse [B, H, T] f32.
    Each pass after the first starts from the previous passes' (o, lse), so the last one writes the
    merged output; in place, no [B, T, H, D] array is copied on the way (on a TPU, kernels.tpu_compile
    shows it)."""
    b, _, h, _ = q.shape
    plan = plan_passes(pattern, q, k, block_q, block_k)
    o = lse = None
    for n, pp in enumerate(plan):
        last = n == len(plan) - 1
        lay = pp.q_layout
        partial = None if o is None else (lay.to(o), lay.lanes_to(lse))
        o_p, lse_p = pass_forward(lay.to(q), pp.keys(k), pp.keys(v), pp.p.mask, lay, kv_layout=pp.kv_layout,
                                  batch=b, heads=h, kv_heads=k.shape[2], block_q=pp.block_q, block_k=pp.block_k,
                                  out_dtype=q.dtype if last else jnp.float32, partial=partial, interpret=interpret,
                                  drop=pp.dropout(dropout), seeds=seeds)
        o, lse = lay.back(o_p, h), lay.lanes_back(lse_p)
    return o, lse


def _backward(q, k, v, o, lse, do, pattern, block_q, block_k, interpret, dropout=None, seeds=None):
    """Gradients from the merged (o, lse): each pass is a flash-attention backward over its own keys,
    and each pass after the first adds the earlier passes' f32 gradients before writing (dk, dv of
    fixed's gathered summary keys are added at their positions by XLA instead)."""
    b, t, h, d = q.shape
    hk = k.shape[2]
    # rowsum(dO * o) as a contraction over head_dim: XLA writes [B, H, T] directly, no elementwise pass
    delta = jnp.einsum("bthd,bthd->bht", do, o, preferred_element_type=jnp.float32)
    plan = plan_passes(pattern, q, k, block_q, block_k)
    dq = dk = dv = None
    for n, pp in enumerate(plan):
        last = n == len(plan) - 1
        lay = pp.q_layout
        chain_dkv = dk is not None and not pp.p.gathers_keys
        dq_p, dk_p, dv_p = pass_backward(
            lay.to(q), pp.keys(k), pp.keys(v), lay.to(do), lay.lanes_to(lse), lay.lanes_to(delta), pp.p.mask, lay,
            kv_layout=pp.kv_layout, batch=b, heads=h, kv_heads=hk, block_q=pp.block_q, block_k=pp.block_k,
            dq_dtype=q.dtype if last else jnp.float32,
            dkv_dtype=k.dtype if last and hk == h and not pp.p.gathers_keys else jnp.float32,
            dq_partial=None if dq is None else lay.to(dq),
            dkv_partial=(pp.kv_layout.to(dk), pp.kv_layout.to(dv)) if chain_dkv else None, interpret=interpret,
            drop=pp.dropout(dropout), seeds=seeds)
        dq = lay.back(dq_p, h)
        dk = pp.add_key_grads(None if chain_dkv else dk, dk_p, h)
        dv = pp.add_key_grads(None if chain_dkv else dv, dv_p, h)
    if hk != h:  # GQA: dk, dv were computed per query head; head h belongs to kv head h // group
        dk = dk.reshape(b, t, hk, h // hk, d).sum(axis=3)
        dv = dv.reshape(b, t, hk, h // hk, d).sum(axis=3)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype)


# ------------------------------------------------------------------------------------------ public API

# attention(q, k, v, seeds, pattern, block_q, block_k, interpret, dropout): seeds [B, H] int32, no gradient
_attention = flash_vjp(_forward, _backward)


def sparse_attention_tpu(q, k, v, pattern: Pattern, *, block_q: int | None = None,
                         block_k: int | None = None, interpret=None, dropout_rate: float = 0.0, dropout_seed=None):
    """Causal sparse attention on TPU. q: [B, T, H, D], k/v: [B, T, Hk, D] -> [B, T, H, D] in q.dtype.

    block_q/block_k default to `default_block_for(pattern, T)`; the strided pass shrinks them with
    `residue_pass_block`. interpret: None runs the
    TPU interpreter (pltpu.InterpretParams()) off-TPU and compiles on TPU; True/False/InterpretParams
    force it. dropout_rate > 0: probabilities dropped inside the kernels by kernels/dropout.py's hash
    of (dropout_seed: an int32 scalar or [B, H] seeds, batch row, head, query, key position).
    """
    t = q.shape[1]
    block_q = block_q or default_block_for(pattern, t)
    block_k = block_k or default_block_for(pattern, t)
    check_supported(q, k, v, pattern, block_q, block_k)
    dropout, seeds = for_kernels(dropout_rate, dropout_seed, q.shape[0], q.shape[2])
    if interpret is None:
        interpret = target_platform() != "tpu"
    if interpret is False:
        check_compiled_blocks(plan_passes(pattern, q, k, block_q, block_k))
    if interpret is True:
        interpret = pltpu.InterpretParams()
    return _attention(q, k, v, seeds, pattern, block_q, block_k, interpret or False, dropout)
