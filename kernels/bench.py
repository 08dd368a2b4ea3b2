"""Attention benchmark: our kernel against cuDNN, splash attention, XLA, the reference and FlexAttention.

    python -m kernels.bench --pattern local_strided --window 256 --stride 256 \
        --seq 2048,8192,32768 --tokens 32768 --heads 16 --head-dim 128 --dtype bfloat16 --out runs/bench

batch = tokens // seq, so every sequence length moves the same number of tokens.
FLOP convention: each row counts only the (query, key) pairs of the pattern *that row computes*
(`Pattern.pairs`): forward = pairs * 4 * head_dim * heads * batch (two matmuls of 2 FLOPs per
multiply-add), forward+backward = 3.5x that (backward = 2.5x forward: five matmuls, one of them the
recomputed scores). Dense rows count dense causal pairs, band rows count local(window) pairs, so the
TFLOP/s column is useful work per second, never the padded or masked-out work.
Timing: one compile + warm-up calls, then the median of --repeats timed calls, each ended by
block_until_ready (torch: cuda synchronize). Alternatives the platform cannot run are "n/a (reason)".
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import kernels
from kernels import patterns
from kernels.errors import NotAvailable, UnsupportedInput

ALL_IMPLS = ("ours", "cudnn_dense", "cudnn_band", "splash", "xla_mask", "reference", "flex")
# Switches of our kernels per variant, as {module: {name: value}}: ping-pong off (GPU forward), the
# strided pass on XLA-transposed copies instead of in place (both backends), 16 heads per TPU grid step
# instead of 8 (where 16 divide the heads).
VARIANTS = {"default": {}, "no-pingpong": {"pallas_gpu": {"PINGPONG": False}},
            "transposed": {"pallas_gpu": {"STRIDED_IN_PLACE": False}, "pallas_tpu_layout": {"IN_PLACE": False}},
            "heads-16": {"pallas_tpu_layout": {"TILE_HEADS": 16}},
            # the GPU kernels' CTAs running 2, 4 or 8 tiles each (kernels/NOTES.md)
            **{f"tiles-{n}": {"pallas_gpu": {"FORWARD_TILES": n, "BACKWARD_TILES": n}} for n in (2, 4, 8)},
            "tiles-4-regs-240": {"pallas_gpu": {"FORWARD_TILES": 4, "BACKWARD_TILES": 4, "REGISTERS": (240, 24)}}}
BWD_FACTOR = 3.5
MAX_SCORES_BYTES = 16 * 2**30  # skip materialized-score baselines above this (they OOM or crawl)


def flops_forward(pattern, seq, batch, heads, head_dim) -> int:
    return pattern.pairs(seq) * 4 * head_dim * heads * batch


def _time(fn, args, repeats, warmup):
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _on_gpu():
    return jax.devices()[0].platform == "gpu"


def _jax_alternative(name, pattern, seq, batch, heads, head_dim, dtype, interpret, block_k=None, dropout=0.0):
    """(attention fn of q, k, v, pattern it computes) for a JAX alternative, or NotAvailable."""
    drop = dict(dropout_rate=dropout, dropout_seed=jnp.int32(seq) if dropout else None)
    if dropout and name not in ("ours", "reference"):
        raise NotAvailable("no attention dropout")
    if name == "ours":
        impl = kernels.auto_impl()
        if impl == "reference" and not interpret:
            raise NotAvailable("no kernel for this platform; --interpret runs the TPU interpreter")
        impl = "pallas_tpu" if impl == "reference" else impl
        return (lambda q, k, v: kernels.sparse_attention(q, k, v, pattern, impl=impl, block_k=block_k,
                                                         **drop)), pattern
    if name == "splash":
        try:
            from kernels.bench_splash import splash_attention
        except ImportError as e:
            raise NotAvailable(f"splash attention is not importable: {e}") from None
        return splash_attention(pattern, seq, heads, head_dim, interpret), pattern
    if name in ("cudnn_dense", "cudnn_band"):
        if not _on_gpu():
            raise NotAvailable("cuDNN needs a CUDA GPU")
        if name == "cudnn_dense":
            return (lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                 implementation="cudnn")), patterns.dense()
        if not pattern.window:
            raise NotAvailable(f"{pattern} has no band")
        w = pattern.window
        return (lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=(w - 1, 0), implementation="cudnn")), patterns.local(w)
    scores_bytes = batch * heads * seq * seq * 4
    if scores_bytes > MAX_SCORES_BYTES:
        raise NotAvailable(f"would materialize {scores_bytes / 2**30:.0f} GiB of scores")
    if name == "xla_mask":
        if pattern.kind == "heads":
            raise NotAvailable("per-head patterns have one mask per head group")
        pos = np.arange(seq)
        mask = jnp.asarray(pattern.mask(pos, pos))[None, None]
        return (lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")), pattern
    if name == "reference":
        return (lambda q, k, v: kernels.reference_attention(q, k, v, pattern, **drop)), pattern
    raise ValueError(f"unknown impl {name!r}")


def _bench_jax(name, pattern, seq, batch, heads, head_dim, dtype, repeats, warmup, interpret, block_k=None,
               dropout=0.0):
    attn, computed = _jax_alternative(name, pattern, seq, batch, heads, head_dim, dtype, interpret, block_k,
                                      dropout)
    keys = jax.random.split(jax.random.key(seq), 4)
    q, k, v, do = (jax.random.normal(kk, (batch, seq, heads, head_dim), dtype) for kk in keys)
    fwd = jax.jit(attn)

    @jax.jit
    def fwd_bwd(q, k, v, do):
        out, vjp = jax.vjp(attn, q, k, v)
        return out, vjp(do)

    return computed, _time(fwd, (q, k, v), repeats, warmup), _time(fwd_bwd, (q, k, v, do), repeats, warmup)


@contextlib.contextmanager
def variant_switches(variant: str):
    """Set our kernels' switches for one variant (VARIANTS), restoring them afterwards."""
    saved = []
    try:
        for module_name, switches in VARIANTS[variant].items():
            try:
                module = importlib.import_module(f"kernels.{module_name}")
            except ImportError:  # the other backend's kernel, not in use on this platform
                continue
            for name, value in switches.items():
                saved.append((module, name, getattr(module, name)))
                setattr(module, name, value)
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


def run_one(name, pattern, seq, batch, heads, head_dim, dtype, repeats, warmup, interpret, block_k=None,
            variant="default", dropout=0.0):
    """One row of the table as a dict; errors and unavailable alternatives become 'n/a (reason)'.
    block_k: our kernel's key block (None: its default); variant: a VARIANTS key; dropout: attention
    dropout rate (ours and the reference only). The row's impl reads "ours:bk<N>:<variant>:drop<rate>"
    for what is not the default."""
    label = (name + (f":bk{block_k}" if block_k else "") + (f":{variant}" if variant != "default" else "")
             + (f":drop{dropout:g}" if dropout else ""))
    row = dict(impl=label, seq=seq, batch=batch, heads=heads, head_dim=head_dim, dtype=str(jnp.dtype(dtype)),
               pattern=str(pattern), device=jax.devices()[0].device_kind, block_k=block_k, variant=variant,
               dropout=dropout)
    try:
        if name == "flex":
            from kernels.bench_flex import bench_flex
            computed = pattern
            fwd_ms, fb_ms = bench_flex(pattern, seq, batch, heads, head_dim, str(jnp.dtype(dtype)), repeats, warmup)
        else:
            with variant_switches(variant):
                computed, fwd_ms, fb_ms = _bench_jax(name, pattern, seq, batch, heads, head_dim, dtype,
                                                     repeats, warmup, interpret, block_k, dropout)
    except (NotAvailable, UnsupportedInput) as e:
        return dict(row, status=f"n/a ({e})")
    except Exception as e:  # OOM, compiler errors: report, keep benchmarking the rest
        return dict(row, status=f"n/a (error: {type(e).__name__}: {str(e).splitlines()[0][:120]})")
    flops = flops_forward(computed, seq, batch, heads, head_dim)
    return dict(row, status="ok", computed=str(computed), pairs=computed.pairs(seq), flops_fwd=flops,
                flops_fwd_bwd=flops * BWD_FACTOR, fwd_ms=fwd_ms, fwd_bwd_ms=fb_ms,
                fwd_tflops=flops / fwd_ms / 1e9, fwd_bwd_tflops=flops * BWD_FACTOR / fb_ms / 1e9)


def format_table(rows) -> str:
    w = max([12] + [len(r["impl"]) for r in rows])  # variant labels ("ours:bk64:no-pingpong") are long
    head = f"{'impl':<{w}} {'seq':>6} {'batch':>5} {'computes':<36} {'fwd ms':>9} {'TFLOP/s':>8} {'f+b ms':>9} {'TFLOP/s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['impl']:<{w}} {r['seq']:>6} {r['batch']:>5} {r['status']}")
        else:
            lines.append(f"{r['impl']:<{w}} {r['seq']:>6} {r['batch']:>5} {r['computed']:<36} {r['fwd_ms']:>9.3f} "
                         f"{r['fwd_tflops']:>8.3g} {r['fwd_bwd_ms']:>9.3f} {r['fwd_bwd_tflops']:>8.3g}")
    return "\n".join(lines)


def plot(rows, path) -> None:
    try:
        import matplotlib
    except ImportError:  # the table and the JSON are the results; the plot is a view of them
        print(f"matplotlib is not installed: no plot at {path}")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "fwd_ms", "forward"), (axes[1], "fwd_bwd_ms", "forward + backward")):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = [(r["seq"], r[key]) for r in rows if r["impl"] == impl and r["status"] == "ok"]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="ms", title=title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{rows[0]['pattern']}, {rows[0]['heads']} heads x {rows[0]['head_dim']}, "
                 f"{rows[0]['dtype']}, {rows[0]['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pattern", default="local_strided", help="dense, local, strided, local_strided or fixed; "
                   "patterns joined by '/' split the heads between them (local/strided)")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--block", type=int, default=0, help="fixed pattern block")
    p.add_argument("--c", type=int, default=0, help="fixed pattern summary columns")
    p.add_argument("--seq", default="2048,8192,32768", help="comma-separated sequence lengths")
    p.add_argument("--tokens", type=int, default=32768, help="batch = tokens // seq")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    p.add_argument("--impls", default=",".join(ALL_IMPLS), help=f"comma-separated subset of {ALL_IMPLS}")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--interpret", action="store_true", help="time our TPU kernel and splash attention in the CPU "
                   "interpreter")
    p.add_argument("--block-k", default="", help="comma-separated key blocks to time our kernel at, one row "
                   "each (default: the kernel's own choice)")
    p.add_argument("--variants", default="default", help="comma-separated variants of our kernel, one row "
                   f"each: {', '.join(VARIANTS)}")
    p.add_argument("--dropout", default="0", help="comma-separated attention dropout rates; rows with a rate "
                   "above 0 time ours and the reference only (kernels/dropout.py's mask)")
    p.add_argument("--out", default=None, help="directory for bench.json and bench.png")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        pattern = patterns.from_name(args.pattern, window=args.window, stride=args.stride, block=args.block, c=args.c)
    except ValueError as e:
        raise SystemExit(f"error: --pattern {args.pattern}: {e}")
    impls = [s for s in args.impls.split(",") if s]
    unknown = set(impls) - set(ALL_IMPLS)
    if unknown:
        raise SystemExit(f"unknown --impls {sorted(unknown)}; choose from {ALL_IMPLS}")
    try:
        block_ks = [int(b) for b in args.block_k.split(",") if b.strip()] or [None]
    except ValueError:
        raise SystemExit(f"--block-k takes comma-separated integers, got {args.block_k!r}") from None
    variants = [v for v in args.variants.split(",") if v]
    if not variants or set(variants) - set(VARIANTS):
        raise SystemExit(f"unknown --variants {args.variants!r}; choose from {', '.join(VARIANTS)}")
    try:
        rates = [float(r) for r in args.dropout.split(",") if r.strip()] or [0.0]
        if any(not 0.0 <= r < 1.0 for r in rates):
            raise ValueError
    except ValueError:
        raise SystemExit(f"--dropout takes comma-separated rates in [0, 1), got {args.dropout!r}") from None
    rows = []
    for seq in (int(s) for s in args.seq.split(",")):
        batch = max(1, args.tokens // seq)
        for rate, name in itertools.product(rates, impls):
            if rate and name not in ("ours", "reference"):
                continue  # nothing else drops with the same mask
            ours = name == "ours"
            for bk, variant in itertools.product(block_ks if ours else [None], variants if ours else ["default"]):
                rows.append(run_one(name, pattern, seq, batch, args.heads, args.head_dim, jnp.dtype(args.dtype),
                                    args.repeats, args.warmup, args.interpret, bk, variant, rate))
                print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print(f"\n{pattern}; FLOPs = pairs computed x 4 x head_dim x heads x batch (x{BWD_FACTOR} fwd+bwd); "
          f"density {pattern.density(int(args.seq.split(',')[-1])):.4f} at the longest seq\n")
    print(format_table(rows))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=1)
        plot(rows, os.path.join(args.out, "bench.png"))
    return rows


if __name__ == "__main__":
    main()
