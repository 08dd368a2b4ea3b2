"""What the Pallas TPU kernel should take at a shape, estimated from what it visits (no TPU needed).

MXU time: the (query, key) pairs of the visited blocks (not only the visible ones) x 4 FLOPs per pair
and head_dim forward, 14 backward (QK^T is recomputed by the dq and by the dk/dv kernel), at the chip's
bf16 peak. Step time: the grid steps of every kernel x about 0.35 us, the fixed cost per step that
jax's TPU pipelining guide gives. HBM traffic is not modelled. Estimates to check on a TPU, not
measurements:

    python -m kernels.tpu_estimate --seq 2048,8192,32768 --tokens 32768 --heads 16 --head-dim 128,64
"""

from __future__ import annotations

import argparse
from unittest import mock

import jax
import jax.numpy as jnp

from kernels import pallas_tpu_layout, patterns
from kernels.pallas_tpu import default_block_for, plan_passes
from kernels.schedule import forward_schedule, transposed_schedule

PEAK_TFLOPS = {"v5e": 197.0, "v6e": 918.0}  # dense bf16 per chip
STEP_US = 0.35


def estimate(pattern, seq: int, batch: int, heads: int, head_dim: int, chip: str = "v5e", tile_heads: int = 8):
    """Dict of heads a step per pass, visited pairs, MXU ms and step ms (forward and backward)."""
    x = jax.ShapeDtypeStruct((batch, seq, heads, head_dim), jnp.bfloat16)
    block = default_block_for(pattern, seq)
    with mock.patch.object(pallas_tpu_layout, "TILE_HEADS", tile_heads):  # set for this plan only
        plan = plan_passes(pattern, x, x, block, block)
    pairs = steps_fwd = steps_bwd = 0
    for pp in plan:
        n_keys = pp.kv_layout.seq_len
        fwd = forward_schedule(pp.p.mask, seq, pp.block_q, pp.block_k, n_keys)
        bwd = transposed_schedule(pp.p.mask, seq, pp.block_q, pp.block_k, n_keys)
        fwd_steps, head_steps = len(fwd.visits()), batch * heads // pp.q_layout.heads_per_block
        pairs += int((fwd.kind != 0).sum()) * pp.block_q * pp.block_k * batch * heads
        steps_fwd += fwd_steps * head_steps
        steps_bwd += (fwd_steps + len(bwd.visits())) * head_steps  # the dq kernel walks fwd, dk/dv walks bwd
    ms = lambda flops: flops / (PEAK_TFLOPS[chip] * 1e12) * 1e3
    return dict(seq=seq, head_dim=head_dim, tile_heads=tile_heads,
                heads_a_step=[pp.q_layout.heads_per_block for pp in plan], visited_pairs=pairs,
                mxu_fwd_ms=ms(4 * head_dim * pairs), mxu_bwd_ms=ms(14 * head_dim * pairs),
                steps_fwd=steps_fwd, steps_bwd=steps_bwd,
                step_fwd_ms=steps_fwd * STEP_US / 1e3, step_bwd_ms=steps_bwd * STEP_US / 1e3)


def shape_parser(description: str) -> argparse.ArgumentParser:
    """The shape options the TPU estimate and compile commands share (the benchmark's, TPU-sized)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--pattern", default="local_strided")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--seq", default="2048,8192,32768")
    p.add_argument("--tokens", type=int, default=32768, help="batch = tokens // seq")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", default="128", help="comma-separated")
    return p


def main(argv=None):
    p = shape_parser(__doc__.split("\n\n")[0])
    p.add_argument("--tile-heads", default="8,16", help="comma-separated TILE_HEADS to compare")
    p.add_argument("--chip", default="v5e", choices=sorted(PEAK_TFLOPS))
    args = p.parse_args(argv)
    try:
        pattern = patterns.from_name(args.pattern, window=args.window, stride=args.stride)
    except ValueError as e:
        raise SystemExit(f"error: --pattern {args.pattern}: {e}")
    rows = [estimate(pattern, seq, max(1, args.tokens // seq), args.heads, d, args.chip, n)
            for d in map(int, args.head_dim.split(",")) for n in map(int, args.tile_heads.split(","))
            for seq in map(int, args.seq.split(","))]
    print(f"{pattern}, {args.heads} heads, {args.tokens} tokens a batch, {args.chip}: estimates, not measurements")
    print("| head_dim | TILE_HEADS | seq | heads a step | MXU fwd / bwd ms | grid steps fwd / bwd | step cost fwd / bwd ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['head_dim']} | {r['tile_heads']} | {r['seq']} | {r['heads_a_step']} | "
              f"{r['mxu_fwd_ms']:.2f} / {r['mxu_bwd_ms']:.2f} | {r['steps_fwd']} / {r['steps_bwd']} | "
              f"{r['step_fwd_ms']:.2f} / {r['step_bwd_ms']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
