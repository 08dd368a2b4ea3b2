"""Compile the Mosaic GPU kernels for an H100 on a machine without one, and report what ptxas says.

jax's CUDA plugin (`pip install -e '.[gpu_compile]'`: jax[cuda13] with the CUDA libraries, and nvdisasm;
any x86-64 Linux machine) compiles for a GPU it is only told about: `jax.experimental.topologies` with a target
description of the H100 (below). Mosaic GPU then lowers each kernel to PTX and runs ptxas in-process,
as it would before a launch, and dumps the ptxas report. That shows, per kernel, what decides how
many CTAs share an SM and whether the kernel spills, before any GPU time is paid for:

    python -m kernels.gpu_compile --seq 2048,8192,32768 --tokens 32768 --heads 16 --head-dim 128

Compiled, not run: times come only from kernels.bench on the GPU itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import itertools
import json
import math
import os
import re
import tempfile

# What XLA needs to know of the target (stream_executor.GpuTargetConfigProto, text format): an
# H100 SXM (sm_90, 132 SMs, 228 KiB of shared memory per SM, 227 KiB per block at most).
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84942979072
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability { major: 9 minor: 0 }
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
HBM_GIB = {"h100": 80}  # what gpt_jax.plan --compile_for judges a GPU's memory against
GPUS_PER_HOST = 8
SMS = 132
SMEM_PER_SM = 233472  # bytes; the driver keeps 1 KiB of it per resident CTA
REGISTERS_PER_SM = 65536
THREADS_PER_SM = 2048
CTAS_PER_SM = 32


def have_cuda_plugin() -> bool:
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda13") is not None
    except ModuleNotFoundError:  # no jax_plugins package at all
        return False


def require_cuda_plugin(what: str) -> None:
    """Raise ValueError naming `what` needs jax's CUDA plugin, unless it is installed."""
    if not have_cuda_plugin():
        raise ValueError(f"{what} needs jax's CUDA plugin: pip install -e '.[gpu_compile]' (no GPU needed)")


@functools.cache
def devices(count: int = 1) -> tuple:
    """`count` compile-only H100s (hosts of 8, or one host of fewer). Needs the CUDA plugin, not a
    GPU; call before jax picks its backends."""
    if count < 1 or (count > GPUS_PER_HOST and count % GPUS_PER_HOST):
        raise ValueError(f"H100s to compile for come {GPUS_PER_HOST} a host (or fewer on one), not {count}")
    # The plugin checks the CUDA libraries' versions through a driver that a machine without a GPU
    # lacks; the compile itself needs only the libraries.
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    from jax.experimental import topologies

    hosts, per_host = (count // GPUS_PER_HOST, GPUS_PER_HOST) if count > GPUS_PER_HOST else (1, count)
    return tuple(topologies.get_topology_desc(platform="cuda", topology=f"1x{hosts}x{per_host}",
                                              target_config=H100_TARGET).devices)


def h100():
    return devices(1)[0]


def kernel_count(hlo_text: str) -> int:
    """Mosaic GPU kernel launches in a compiled program."""
    return hlo_text.count('custom_call_target="mosaic_gpu')


@dataclasses.dataclass
class KernelReport:
    """What ptxas and the launch say of one compiled kernel."""
    name: str
    grid: int  # CTAs
    threads: int  # per CTA
    smem: int  # dynamic shared memory per CTA, bytes
    registers: int  # per thread, as launched (setmaxnreg moves them between warpgroups later)
    spill_stores: int  # bytes per thread
    spill_loads: int

    @property
    def ctas_per_sm(self) -> int:
        """How many CTAs of this kernel an SM holds at once (the tightest of its limits)."""
        return min(REGISTERS_PER_SM // (self.registers * self.threads), SMEM_PER_SM // (self.smem + 1024),
                   THREADS_PER_SM // self.threads, CTAS_PER_SM)

    @property
    def waves(self) -> float:
        return self.grid / (SMS * max(self.ctas_per_sm, 1))


def parse_ptxas(text: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ptxas's -v report of one kernel."""
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if registers is None or spills is None:
        raise ValueError(f"not a ptxas report: {text[:200]!r}")
    return int(registers.group(1)), int(spills.group(1)), int(spills.group(2))


def _mlir_int(token: str) -> int:
    """%c256, %c256_3, %c166968_i32 -> 256, 256, 166968 (MLIR names constants after their value)."""
    return int(re.match(r"%c(\d+)", token).group(1))


def parse_launch(mlir: str) -> tuple[int, int, int]:
    """(CTAs, threads per CTA, dynamic shared memory bytes) of the gpu.launch in a Mosaic GPU module."""
    m = re.search(r"gpu\.launch .*?blocks\(.*?\) in \(([^)]*)\) threads\(.*?\) in \(([^)]*)\)"
                  r" dynamic_shared_memory_size (%c\w+)", mlir)
    if m is None:
        raise ValueError("no gpu.launch with constant sizes in this module")
    sizes = lambda group: [_mlir_int(x.split("=")[1].strip()) for x in group.split(",")]  # noqa: E731
    return math.prod(sizes(m.group(1))), math.prod(sizes(m.group(2))), _mlir_int(m.group(3))


def read_dumps(folder: str) -> list[KernelReport]:
    """The kernels Mosaic GPU compiled with MOSAIC_GPU_DUMP_TO=folder, in the order they were compiled."""
    names = sorted({f[:-len(".ptxas")] for f in os.listdir(folder) if f.endswith(".ptxas")},
                   key=lambda n: os.path.getmtime(os.path.join(folder, n + ".ptxas")))
    out = []
    for name in names:
        with open(os.path.join(folder, name + ".ptxas")) as f:
            registers, stores, loads = parse_ptxas(f.read())
        with open(os.path.join(folder, name + ".after_layout_inference.txt")) as f:
            grid, threads, smem = parse_launch(f.read())
        out.append(KernelReport(re.sub(r"_\d+$", "", name), grid, threads, smem, registers, stores, loads))
    return out


def compile_kernels(fn, *shapes) -> list[KernelReport]:
    """Compile jax.jit(fn) for an H100 for arguments of these jax.ShapeDtypeStructs; report each
    Mosaic GPU kernel in it. Needs the CUDA plugin (require_cuda_plugin), not a GPU."""
    import jax
    from jax.sharding import SingleDeviceSharding

    from kernels.platform import targeting

    sharding = SingleDeviceSharding(h100())
    args = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding) for s in shapes]
    with tempfile.TemporaryDirectory() as folder:
        flags = {"MOSAIC_GPU_DUMP_TO": folder, "MOSAIC_GPU_DUMP_PTXAS": "1", "MOSAIC_GPU_DUMP_MLIR_PASSES": "1"}
        saved = {k: os.environ.get(k) for k in flags}
        os.environ.update(flags)  # read by Mosaic GPU at each kernel's compile
        try:
            with targeting("gpu"):
                jax.jit(fn).trace(*args).lower().compile()
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        return read_dumps(folder)


def attention_report(pattern, seq: int, batch: int, heads: int, head_dim: int, dtype="bfloat16",
                     block_k: int | None = None, dropout: float = 0.0) -> list[KernelReport]:
    """The kernels of kernels.sparse_attention(impl="pallas_gpu") forward and backward at this shape
    (with attention dropout at that rate when it is above 0)."""
    import jax
    import jax.numpy as jnp

    from kernels.pallas_gpu import sparse_attention_gpu

    def loss(q, k, v, seed):
        o = sparse_attention_gpu(q, k, v, pattern, block_k=block_k, dropout_rate=dropout, dropout_seed=seed)
        return jnp.sum(o.astype(jnp.float32))

    shape = jax.ShapeDtypeStruct((batch, seq, heads, head_dim), jnp.dtype(dtype))
    seed = jax.ShapeDtypeStruct((), jnp.int32)
    return compile_kernels(jax.grad(loss, argnums=(0, 1, 2)), shape, shape, shape, seed)


HEADER = (f"{'seq':>6} {'variant':<16} {'kernel':<14} {'CTAs':>6} {'thr':>4} {'smem KiB':>8} {'regs':>5} {'spill st/ld B':>13} "
          f"{'CTAs/SM':>7} {'waves':>6}")


def format_row(r: dict) -> str:
    spills = f"{r['spill_stores']} / {r['spill_loads']}"
    return (f"{r['seq']:>6} {r['variant']:<16} {r['name']:<14} {r['grid']:>6} {r['threads']:>4} {r['smem'] / 1024:8.1f} "
            f"{r['registers']:>5} {spills:>13} {r['ctas_per_sm']:>7} {r['waves']:6.1f}")


def main(argv=None):
    from kernels import patterns

    ap = argparse.ArgumentParser(prog="python -m kernels.gpu_compile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pattern", default="local_strided",
                    choices=["dense", "local", "strided", "local_strided", "fixed"])
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--block", type=int, default=128, help="fixed: block length")
    ap.add_argument("--c", type=int, default=16, help="fixed: summary positions per block")
    ap.add_argument("--seq", default="2048,8192,32768", help="comma-separated sequence lengths")
    ap.add_argument("--tokens", type=int, default=32768, help="batch = tokens / seq")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-k", type=int, default=None)
    ap.add_argument("--dropout", type=float, default=0.0, help="attention dropout rate inside the kernels")
    ap.add_argument("--variants", default="default", help="comma-separated variants of the kernel, as in "
                    "kernels.bench (e.g. default,tiles-4,tiles-4-regs-240)")
    ap.add_argument("--out", default="", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    try:
        require_cuda_plugin("kernels.gpu_compile")
        seqs = [int(s) for s in args.seq.split(",")]
        pattern = patterns.from_name(args.pattern, window=args.window, stride=args.stride, block=args.block, c=args.c)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    from kernels.bench import VARIANTS, variant_switches

    variants = [v for v in args.variants.split(",") if v]
    if not variants or set(variants) - set(VARIANTS):
        raise SystemExit(f"error: unknown --variants {args.variants!r}; choose from {', '.join(VARIANTS)}")
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # before jax starts its backends
    print(HEADER + "\n" + "-" * len(HEADER), flush=True)
    rows = []
    for seq, variant in itertools.product(seqs, variants):
        if args.tokens % seq:
            raise SystemExit(f"error: --tokens {args.tokens} is not a multiple of --seq {seq}")
        try:
            with variant_switches(variant):
                reports = attention_report(pattern, seq, args.tokens // seq, args.heads, args.head_dim,
                                           block_k=args.block_k, dropout=args.dropout)
        except ValueError as e:  # shapes the kernel refuses (kernels.errors.UnsupportedInput)
            raise SystemExit(f"error: {e}") from None
        for r in reports:
            rows.append({"seq": seq, "variant": variant, **dataclasses.asdict(r), "ctas_per_sm": r.ctas_per_sm,
                         "waves": r.waves})
            print(format_row(rows[-1]), flush=True)
    print("compiled for an H100 by ptxas, not run. regs: per thread at launch; CTAs/SM: the tightest of "
          "registers, shared memory and threads")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
