"""Compile the Pallas TPU kernel for a TPU chip on a machine without one, and show what XLA adds.

libtpu (`pip install -e .[tpu]`, any x86-64 Linux machine) compiles for a chip it is only told about
(`jax.experimental.topologies`): the compile a TPU would run, Mosaic's included, without running it.
The compiled program is XLA's after layout assignment, where TPU arrays are tiled (8 x 128 on their
last two dimensions), so it shows which reshapes are free (`bitcast`) and which move a whole array
(`copy`, `reshape`, `transpose`, fusions). Compiled, not timed:

    python -m kernels.tpu_compile --chip v5e --seq 2048,8192,32768 --tokens 32768 --heads 16 --head-dim 128,64
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re

CHIPS = {"v5e": "TPU v5 lite", "v6e": "TPU v6 lite"}  # Colab's TPUs: device kinds
HBM_GIB = {"v5e": 16, "v6e": 32}  # per chip
# Top-level ops of a compiled program that write no array data of their own: views, tuples, the kernels.
FREE_OPS = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple", "custom-call", "copy-start",
            "copy-done", "after-all"}
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
               "u32": 4, "f64": 8, "s64": 8}


def have_libtpu() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def require_libtpu(what: str) -> None:
    """Raise ValueError naming `what` needs libtpu, unless it is installed."""
    if not have_libtpu():
        raise ValueError(f"{what} needs libtpu: pip install -e '.[tpu]' (no TPU needed to compile)")


@functools.cache
def devices(chip: str, count: int = 1) -> tuple:
    """`count` devices (a power of two: a 1x1, 1x2, 2x2, 2x4, ... slice) of `chip` that libtpu compiles
    for; needs libtpu, not a TPU."""
    if chip not in CHIPS:
        raise ValueError(f"unknown TPU chip {chip!r}: choose from {', '.join(CHIPS)}")
    if count < 1 or count & (count - 1):
        raise ValueError(f"a {chip} slice to compile for has a power-of-two number of chips, not {count}")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no cloud metadata server to ask
    from jax.experimental import topologies

    x = 1 << ((count.bit_length() - 1) // 2)
    y = count // x
    return tuple(topologies.get_topology_desc(topology_name=f"{chip}:{x}x{y}", platform="tpu",
                                              chips_per_host_bounds=(min(x, 2), min(y, 2), 1)).devices)


@contextlib.contextmanager
def tracing_for(chip: str):
    """Trace as on `chip`: the kernels and the model choose what they would on a TPU (kernels.platform),
    and Pallas reads the chip from an abstract mesh, as the process has no TPU."""
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

    from kernels.platform import targeting

    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,),
                        abstract_device=AbstractDevice(device_kind=CHIPS[chip], num_cores=1, platform="tpu"))
    with targeting("tpu"), use_abstract_mesh(mesh):
        yield


def compile_for(chip: str, fn, *shapes):
    """jax.jit(fn) compiled for one `chip` device, for arguments of these jax.ShapeDtypeStructs."""
    import jax
    from jax.sharding import SingleDeviceSharding

    sharding = SingleDeviceSharding(devices(chip)[0])
    args = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding) for s in shapes]
    with tracing_for(chip):
        return jax.jit(fn).trace(*args).lower().compile()


def _array_bytes(type_text: str) -> int:
    """Bytes of every array in an HLO result type such as `bf16[1,128,2048]{...}` or a tuple of them."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]", type_text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * DTYPE_BYTES.get(dtype, 4)
    return total


def data_ops(hlo_text: str, free=FREE_OPS) -> list[tuple[str, str, int]]:
    """(opcode, result type, bytes written) of the top-level ops of the compiled entry computation
    that write array data outside the kernels (the opcodes in `free` excluded)."""
    entry = hlo_text[hlo_text.index("\nENTRY"):]
    ops = []
    for line in entry.splitlines()[1:]:
        m = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+ = ", line)
        if not m:
            continue
        rest = line[m.end():]
        if rest.startswith("("):  # a tuple type: up to its closing parenthesis
            depth, i = 0, 0
            for i, ch in enumerate(rest):
                depth += {"(": 1, ")": -1}.get(ch, 0)
                if depth == 0:
                    break
            type_text, rest = rest[:i + 1], rest[i + 1:].lstrip()
        else:
            type_text, _, rest = rest.partition(" ")
        opcode = rest.split("(", 1)[0]
        if opcode not in free:
            ops.append((opcode, type_text.split("{")[0], _array_bytes(type_text)))
    return ops


def kernel_count(hlo_text: str) -> int:
    return hlo_text.count('custom_call_target="tpu_custom_call"')


def attention_report(chip: str, pattern, seq: int, batch: int, heads: int, head_dim: int, dtype="bfloat16",
                     block: int | None = None) -> dict:
    """Compile the kernel's forward, and its forward + backward for a given output gradient (as in a
    training step), for `chip`; per direction the kernels launched, the bytes XLA ops write outside
    them, and the largest such op."""
    import jax
    import jax.numpy as jnp

    from kernels.pallas_tpu import sparse_attention_tpu

    x = jax.ShapeDtypeStruct((batch, seq, heads, head_dim), jnp.dtype(dtype))
    attend = lambda q, k, v: sparse_attention_tpu(q, k, v, pattern, block_q=block, block_k=block,  # noqa: E731
                                                  interpret=False)
    fwd_bwd = lambda q, k, v, do: jax.vjp(attend, q, k, v)[1](do)  # noqa: E731
    row = dict(chip=chip, pattern=str(pattern), seq=seq, batch=batch, heads=heads, head_dim=head_dim)
    for name, fn, args in (("fwd", attend, (x, x, x)), ("fwd_bwd", fwd_bwd, (x, x, x, x))):
        text = compile_for(chip, fn, *args).as_text()
        ops = data_ops(text)
        largest = max(ops, key=lambda op: op[2], default=None)
        row[name] = dict(kernels=kernel_count(text), xla_bytes=sum(op[2] for op in ops), xla_ops=len(ops),
                         largest=f"{largest[0]} {largest[1]}" if largest else "-")
    return row


def main(argv=None):
    from kernels.tpu_estimate import shape_parser

    p = shape_parser(__doc__.split("\n\n")[0])
    p.add_argument("--chip", default="v5e", help=f"comma-separated: {', '.join(CHIPS)}")
    p.add_argument("--variants", default="default", help="comma-separated kernels.bench variants")
    args = p.parse_args(argv)
    from kernels import patterns
    from kernels.bench import VARIANTS, variant_switches

    chips = args.chip.split(",")
    if set(chips) - set(CHIPS):
        raise SystemExit(f"error: --chip {args.chip}: choose from {', '.join(CHIPS)}")
    variants = args.variants.split(",")
    if set(variants) - set(VARIANTS):
        raise SystemExit(f"error: --variants {args.variants}: choose from {', '.join(VARIANTS)}")
    try:
        pattern = patterns.from_name(args.pattern, window=args.window, stride=args.stride)
        seqs, dims = [int(s) for s in args.seq.split(",")], [int(d) for d in args.head_dim.split(",")]
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    try:
        require_libtpu("kernels.tpu_compile")
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(f"{pattern}, {args.heads} heads, {args.tokens} tokens a batch: compiled for the chip, not run")
    print("| chip | variant | head_dim | seq | kernels fwd / fwd+bwd | XLA writes outside the kernels, "
          "fwd / fwd+bwd (MiB) | largest XLA op (fwd+bwd) |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for chip in chips:
        for variant in variants:
            for d in dims:
                for seq in seqs:
                    with variant_switches(variant):
                        r = attention_report(chip, pattern, seq, max(1, args.tokens // seq), args.heads, d)
                    r["variant"] = variant
                    rows.append(r)
                    f, b = r["fwd"], r["fwd_bwd"]
                    print(f"| {chip} | {variant} | {d} | {seq} | {f['kernels']} / {b['kernels']} | "
                          f"{f['xla_bytes'] / 2**20:.0f} / {b['xla_bytes'] / 2**20:.0f} | {b['largest']} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
