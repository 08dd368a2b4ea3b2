"""Steady-state training speed of an experiment: ms per iteration, tokens/s and MFU.

    python -m gpt_jax.bench_train --config experiments/shakespeare_char.py \
        --config.data.path=../shared/data/tinyshakespeare.txt [--iters 50] [--warmup 10] [--out bench.json]

Times the compiled train step alone (the batches are placed on the devices beforehand), as
nanoGPT's bench.py does; compilation and warm-up steps are left out. `--profile DIR` then traces
five more steps and prints the time per XLA op and how long the device sat idle (gpt_jax/op_profile.py).
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from absl import flags

from gpt_jax import cli, op_profile
from gpt_jax import sharding as shd
from gpt_jax.data import build_dataset
from gpt_jax.errors import UserError, cli_entry
from gpt_jax.flops import device_peak_flops, train_flops_per_token
from gpt_jax.model import GPT
from gpt_jax.optim import make_optimizer
from gpt_jax.train import build_model
from gpt_jax.train_step import Trainer


PROFILE_STEPS = 5  # traced after the timed steps by --profile


def benchmark(config, *, iters: int, warmup: int, distinct_batches: int = 8, profile_dir: str = "",
              profile_steps: int = PROFILE_STEPS) -> dict:
    dataset = build_dataset(config.data, None, config.seed)
    model_cfg = build_model(config, dataset.tokenizer.vocab_size)
    mesh = shd.make_mesh(config.mesh)
    train = config.train
    shd.check_batch(train.batch_size, train.grad_accum, mesh)
    trainer = Trainer(GPT(model_cfg), make_optimizer(train), mesh, config.sharding_rules, grad_accum=train.grad_accum)
    state = trainer.init_state(jax.random.key(config.seed))
    seq = model_cfg.block_size
    batches = [shd.host_local_batch(dataset.train_batch(i, train.batch_size, seq), mesh) for i in range(distinct_batches)]
    key = jax.random.key(1)

    t0 = time.perf_counter()
    step_fn = trainer.train_step.lower(state, batches[0], key).compile()
    compile_s = time.perf_counter() - t0

    def run(i):
        nonlocal state
        state, metrics = step_fn(state, batches[i % distinct_batches], jax.random.fold_in(key, i))
        return metrics["loss"]

    timing, loss = time_steps(run, iters=iters, warmup=warmup)
    profile = None
    if profile_dir:  # after the timed steps, so tracing cannot slow them
        with jax.profiler.trace(profile_dir):
            t = time.perf_counter()
            jax.block_until_ready([run(i) for i in range(profile_steps)])
            traced_ms = 1e3 * (time.perf_counter() - t) / profile_steps
        profile = op_profile.format_profile(op_profile.read_trace(profile_dir), profile_steps, traced_ms)
    return {
        "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
        "batch_size": train.batch_size, "seq_len": seq, "params": sum(x.size for x in jax.tree_util.tree_leaves(state.params)),
        "attention": [str(p) for p in model_cfg.patterns], "impl": config.attention.impl,
        "compile_s": compile_s, **throughput(timing, model_cfg, train), "final_loss": float(loss), "profile": profile,
    }


def time_steps(run, *, iters: int, warmup: int) -> tuple[dict, jax.Array]:
    """Call run(i) (one step; returns an array to wait on) `warmup` untimed times, then `iters` timed
    ones, each waited for. ({ms_per_iter: median, ms_p10, ms_p90}, the last step's output)."""
    out = None
    for i in range(warmup):
        out = run(i)
    jax.block_until_ready(out)  # (--warmup 0 runs no step before the timed ones)
    times = []
    for i in range(warmup, warmup + iters):
        t = time.perf_counter()
        out = jax.block_until_ready(run(i))
        times.append(time.perf_counter() - t)
    return {"ms_per_iter": 1e3 * float(np.median(times)), "ms_p10": 1e3 * float(np.percentile(times, 10)),
            "ms_p90": 1e3 * float(np.percentile(times, 90))}, out


def throughput(timing: dict, model_cfg, train) -> dict:
    """The timing plus tokens/s, TFLOP/s and MFU of a step of train.batch_size sequences."""
    seq = model_cfg.block_size
    s = timing["ms_per_iter"] / 1e3
    flops = train_flops_per_token(model_cfg, seq) * train.batch_size * seq
    peak = train.peak_flops or device_peak_flops()
    return {**timing, "tokens_per_s": train.batch_size * seq / s, "tflops_per_s": flops / s / 1e12,
            "mfu": flops / s / (peak * jax.device_count()) if peak else None}


def timing_table(r: dict) -> str:
    """The header and the row of a result's speed (scripts/gpu_checks.sh reads the row after "ms/iter")."""
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (unknown peak)"
    return (f"{'ms/iter (median)':>18} {'p10':>7} {'p90':>7} {'tokens/s':>11} {'TFLOP/s':>8} {'MFU':>8}\n"
            f"{r['ms_per_iter']:18.2f} {r['ms_p10']:7.2f} {r['ms_p90']:7.2f} {r['tokens_per_s']:11,.0f} "
            f"{r['tflops_per_s']:8.2f} {mfu:>8}")


def define_timing_flags(fv):
    flags.DEFINE_integer("iters", 50, "timed iterations", flag_values=fv)
    flags.DEFINE_integer("warmup", 10, "untimed iterations after compilation", flag_values=fv)
    flags.DEFINE_string("out", "", "write the result as JSON here", flag_values=fv)


def check_timing_flags(fv):
    if fv.iters < 1 or fv.warmup < 0:
        raise UserError("--iters must be at least 1 and --warmup at least 0")


def _define_flags(fv):
    define_timing_flags(fv)
    flags.DEFINE_string("profile", "", f"trace {PROFILE_STEPS} more steps into this folder and print the time "
                        "per XLA op", flag_values=fv)


@cli_entry
def main(argv):
    fv = cli.parse(argv, "gpt_jax.bench_train", _define_flags)
    check_timing_flags(fv)
    r = benchmark(fv.config, iters=fv.iters, warmup=fv.warmup, profile_dir=fv.profile)
    print(f"{r['device']} x{r['devices']}: {r['params'] / 1e6:.2f}M params, batch {r['batch_size']} x {r['seq_len']}, "
          f"attention impl {r['impl']}")
    print(f"compile {r['compile_s']:.1f} s")
    print(timing_table(r))
    if r["profile"]:
        print(f"\nXLA ops of the step, traced over {PROFILE_STEPS} steps into {fv.profile}:\n{r['profile']}")
    if fv.out:
        with open(fv.out, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
