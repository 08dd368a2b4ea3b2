"""What a model needs before you pay for it: parameters, FLOPs per token, and memory per device.

    python -m gpt_jax.plan --config experiments/gpt3_175b.py --mesh data=8,fsdp=16,tensor=8 \
        [--device-memory-gib 80] [--config.train.grad_accum=16] [--config.<any key>=<value>]
    python -m gpt_jax.plan --config experiments/gpt3_small_sparse.py --mesh fsdp=4 --compile_for v5e

Nothing is allocated: parameter shapes come from `jax.eval_shape` of the model's init, and their
shards from the config's logical sharding rules applied to the given mesh (no devices needed).

Assumptions of the memory estimate (per device, training):
- parameters in model.param_dtype (float32 master weights), gradients the same, AdamW's two moments
  in float32: 4 + 4 + 8 bytes per parameter, each sharded like its parameter;
- activations saved for the backward pass of one micro-batch (batch / grad_accum / (data x fsdp)
  sequences), in the compute dtype (bf16 for "auto": the accelerator case), with flash-style
  attention that keeps no [T, T] scores (cuDNN and our Pallas kernels; the masked reference on CPU
  keeps them). Per layer and token, in elements, with width h and tensor-parallel size t:
  remat none: 4h + 12h/t (LayerNorm inputs and outputs, q, k, v, attention output, MLP hidden before
  and after GELU; Korthikanti et al. 2022 without dropout masks); remat dots (matmul
  outputs q, k, v, attention output, MLP hidden (8h/t), the two projections (2h) and the block input
  (h): 3h + 8h/t); remat full: h (the block input) plus one layer's full set while it
  is recomputed. Logits: [T, vocab / t] in the compute dtype plus a float32 copy and its gradient.
- not counted: XLA temporaries and fragmentation, communication buffers, the data pipeline. The
  compiled train step prints its real figure before the first step (gpt_jax.train).

`--compile_for v5e` (or v6e) replaces the estimate's guesswork with XLA's own figure for a TPU slice
of the mesh's size: libtpu (`pip install -e '.[tpu]'`, no TPU needed) compiles the sharded train step,
Pallas attention kernels included, and its memory analysis says what one chip holds. `--compile_for
h100` does the same for H100s (hosts of 8) with jax's CUDA plugin (`pip install -e '.[gpu_compile]'`,
no GPU needed). Compiling GPT-3 Small takes minutes on a 2-core machine.
"""

from __future__ import annotations

import collections
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import flags

from gpt_jax import cli, kv_cache
from gpt_jax.errors import UserError, cli_entry
from gpt_jax.flops import matmul_params, train_flops_per_token
from gpt_jax.model import DTYPES, GPT, GPTConfig, count_params
from gpt_jax.sharding import MESH_AXES

GIB = 2 ** 30


def parse_mesh(text: str) -> dict[str, int]:
    """"data=8,fsdp=16,tensor=8" -> sizes (axes left out are 1)."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, eq, value = item.partition("=")
        if name not in sizes or not eq:
            raise UserError(f"bad --mesh {text!r}: expected data=N,fsdp=N,tensor=N, got {item!r}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise UserError(f"bad --mesh {text!r}: {name}={value!r} is not an integer") from None
        if sizes[name] < 1:
            raise UserError(f"bad --mesh {text!r}: {name} must be at least 1")
    return sizes


def vocab_for(config) -> int:
    if config.model.vocab_size:
        return config.model.vocab_size
    kind = config.data.tokenizer
    return {"byte": 257, "bpe": config.data.bpe_vocab_size}.get(kind) or 0


def param_bytes_per_device(model_cfg: GPTConfig, mesh: dict[str, int], rules) -> tuple[int, int]:
    """(parameters, bytes of one param_dtype copy held by one device) with the rules' sharding."""
    tokens = jax.ShapeDtypeStruct((1, model_cfg.block_size), jnp.int32)
    boxed = jax.eval_shape(lambda t: GPT(model_cfg).init(jax.random.key(0), t), tokens)["params"]
    specs = nn.get_partition_spec(boxed)
    shapes = nn.unbox(boxed)
    rules = tuple(tuple(r) for r in rules)
    itemsize = jnp.dtype(DTYPES[model_cfg.param_dtype]).itemsize
    per_device = 0
    for shape, spec in zip(jax.tree_util.tree_leaves(shapes),
                           jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules)
        n = 1
        for dim, axes in zip(shape.shape, tuple(mesh_spec) + (None,) * len(shape.shape)):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            n *= math.ceil(dim / math.prod(mesh[a] for a in axes))
        per_device += n * itemsize
    return count_params(shapes), per_device


def activation_bytes_per_sequence(model_cfg: GPTConfig, tensor: int) -> int:
    """Activations saved for the backward pass of one sequence on one device (assumptions above)."""
    dtype = "bfloat16" if model_cfg.dtype == "auto" else model_cfg.dtype
    e = jnp.dtype(DTYPES[dtype]).itemsize
    s, h, t = model_cfg.block_size, model_cfg.n_embd, tensor
    full_layer = 4 * h + 12 * h / t
    per_layer = {"none": full_layer, "dots": 3 * h + 8 * h / t, "full": h}[model_cfg.remat]
    layers = model_cfg.n_layer * per_layer + (full_layer if model_cfg.remat == "full" else 0)
    logits = model_cfg.vocab_size / t * (e + 8) / e
    return int(s * (layers + logits) * e)


def plan(config, mesh: dict[str, int], device_memory_gib: float) -> str:
    try:
        model_cfg = GPTConfig.from_config(config, vocab_for(config) or None)
        model_cfg.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    train = config.train
    s = model_cfg.block_size
    n_params, param_dev = param_bytes_per_device(model_cfg, mesh, config.sharding_rules)
    devices = math.prod(mesh.values())
    shards = mesh["data"] * mesh["fsdp"]
    micro = train.batch_size / train.grad_accum / shards
    lines = [f"model: {n_params:,} parameters ({n_params / 1e9:.3f}B), {model_cfg.n_layer} layers x "
             f"{model_cfg.n_embd} wide, {model_cfg.n_head} heads, context {s}, vocab {model_cfg.vocab_size}",
             f"mesh: data={mesh['data']} x fsdp={mesh['fsdp']} x tensor={mesh['tensor']} = {devices} devices"]

    lines.append("FLOPs per token (attention counts the (query, key) pairs each pattern computes at "
                 f"context {s}):")
    n_mm = matmul_params(model_cfg)
    lines.append(f"  matmuls: {2 * n_mm / 1e9:.3f} GFLOP forward, {6 * n_mm / 1e9:.3f} GFLOP train "
                 f"(6 x {n_mm:,} matmul parameters, tied output projection included)")
    by_pattern = collections.Counter(model_cfg.patterns)
    attn_train = 0.0
    for pattern, count in by_pattern.items():
        keys = pattern.pairs(s) / s
        fwd = 4 * model_cfg.n_embd * keys * count
        attn_train += 3 * fwd
        lines.append(f"  attention, {count} x {pattern}: {keys:.1f} keys per query on average, "
                     f"{fwd / 1e9:.3f} GFLOP forward, {3 * fwd / 1e9:.3f} GFLOP train; a cached decode step "
                     f"reads {kv_cache.keys_read_per_token(pattern, s):g} keys per head and layer")
    total = train_flops_per_token(model_cfg, s)
    lines.append(f"  total: {total / 1e9:.3f} GFLOP per trained token ({100 * attn_train / total:.1f}% attention); "
                 f"{total * train.batch_size * s / 1e15:.2f} PFLOP per step of {train.batch_size} x {s} tokens")

    act_seq = activation_bytes_per_sequence(model_cfg, mesh["tensor"])
    act = act_seq * math.ceil(micro)
    parts = {"params": param_dev, "gradients": param_dev, "optimizer (AdamW mu, nu)": 2 * param_dev,
             "activations": act}
    lines.append(f"memory per device (training; micro-batch {train.batch_size} / grad_accum {train.grad_accum} / "
                 f"(data x fsdp = {shards}) = {micro:g} sequences, remat={model_cfg.remat}):")
    if micro != int(micro) or micro < 1:
        lines.append("  warning: the micro-batch is not a whole number of sequences per device; "
                     "change train.batch_size, train.grad_accum or the mesh (gpt_jax.train refuses this)")
    for name, b in parts.items():
        lines.append(f"  {name:<26} {b / GIB:10.2f} GiB")
    need = sum(parts.values())
    verdict = "fits" if need <= device_memory_gib * GIB else "does NOT fit"
    lines.append(f"  {'total':<26} {need / GIB:10.2f} GiB: {verdict} in {device_memory_gib:g} GiB per device "
                 "(estimate; see the assumptions in gpt_jax/plan.py)")
    return "\n".join(lines)


GPU_CHIPS = ("h100",)


def compile_target(chip: str, count: int):
    """(devices, platform, HBM GiB, kernel_count) to compile for `count` chips of `chip`, no such
    chip needed: libtpu for a TPU slice, jax's CUDA plugin for H100s."""
    from kernels import gpu_compile, tpu_compile

    try:
        if chip in GPU_CHIPS:
            gpu_compile.require_cuda_plugin("compiling for an H100")
            return gpu_compile.devices(count), "gpu", gpu_compile.HBM_GIB[chip], gpu_compile.kernel_count
        tpu_compile.require_libtpu("compiling for a TPU")
        return tpu_compile.devices(chip, count), "tpu", tpu_compile.HBM_GIB[chip], tpu_compile.kernel_count
    except ValueError as e:
        raise UserError(f"--compile_for {chip}: {e}") from None


def compiled_report(config, mesh: dict[str, int], chip: str) -> str:
    """Compile the train step for `chip` devices (a TPU slice, or H100s) with this mesh, none needed,
    and report XLA's memory per device and the Pallas attention kernels it launches."""
    from kernels.platform import targeting
    from gpt_jax.optim import make_optimizer
    from gpt_jax.sharding import batch_sharding, check_batch
    from gpt_jax.train_step import Trainer

    count = math.prod(mesh.values())
    devices, platform, hbm_gib, kernel_count = compile_target(chip, count)
    shape = tuple(mesh[a] for a in MESH_AXES)
    device_mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)
    train = config.train
    check_batch(train.batch_size, train.grad_accum, device_mesh)  # as gpt_jax.train would
    with targeting(platform):  # bf16 compute and the compiled Pallas kernels, as on that chip
        model_cfg = GPTConfig.from_config(config, vocab_for(config) or None)
        trainer = Trainer(GPT(model_cfg), make_optimizer(train), device_mesh, config.sharding_rules,
                          grad_accum=train.grad_accum)
        batch = jax.ShapeDtypeStruct((train.batch_size, model_cfg.block_size + 1), jnp.int32,
                                     sharding=batch_sharding(device_mesh))
        lowered = trainer.train_step.trace(trainer.abstract_state, batch, jax.random.key(0)).lower()
    head = f"compiled for {count} x {chip} ({'libtpu' if platform == 'tpu' else 'CUDA plugin'}; not run)"
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:  # XLA refuses a program that cannot fit
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return f"{head}: does NOT fit: {str(e).strip().splitlines()[0]}"
    m = compiled.memory_analysis()
    # the state is donated: its outputs reuse the argument buffers (alias), so the peak is about
    # arguments + outputs - aliased + temporaries
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    verdict = "fits" if peak <= hbm_gib * GIB else "does NOT fit"
    return "\n".join([
        f"{head}: {kernel_count(compiled.as_text())} Pallas kernel launches a step",
        f"  arguments (state shards, batch) {m.argument_size_in_bytes / GIB:10.2f} GiB per chip",
        f"  temporaries                     {m.temp_size_in_bytes / GIB:10.2f} GiB",
        f"  outputs not aliased to inputs   {(m.output_size_in_bytes - m.alias_size_in_bytes) / GIB:10.2f} GiB",
        f"  total                           {peak / GIB:10.2f} GiB: {verdict} in {hbm_gib} GiB "
        f"of {chip} memory (XLA's figure for the compiled step)",
        *step_work(compiled)])


def step_work(compiled) -> list[str]:
    """Report lines of what a compiled step does per chip: its top-level ops (on a GPU, about one
    kernel launch each) and the bytes their results take (what a step writes, kernels included)."""
    from kernels.tpu_compile import FREE_OPS, data_ops

    ops = data_ops(compiled.as_text(), free=FREE_OPS - {"custom-call"})
    calls = sum(op == "custom-call" for op, _, _ in ops)
    return [
        f"  ops a step                      {len(ops):10d} ({calls} custom calls: library calls and Pallas "
        f"kernels; {len(ops) - calls} fusions, GEMMs among them, and other ops; loop bodies not counted)",
        f"  written a step                  {sum(n for _, _, n in ops) / GIB:10.2f} GiB per chip (the results of "
        f"the compiled step's ops, kernels included)"]


def _define_flags(fv):
    flags.DEFINE_string("mesh", "data=1,fsdp=1,tensor=1", "mesh sizes, e.g. data=8,fsdp=16,tensor=8", flag_values=fv)
    flags.DEFINE_float("device_memory_gib", 80.0, "memory of one device, to say whether it fits (default: 80, "
                       "or the HBM of the --compile_for chip)", flag_values=fv)
    flags.DEFINE_string("compile_for", None, "also compile the train step for the mesh's size of this chip (v5e, "
                        "v6e with libtpu; h100 with jax's CUDA plugin; none of them needed) and print XLA's "
                        "memory per chip", flag_values=fv)


@cli_entry
def main(argv):

    fv = cli.parse(argv, "gpt_jax.plan", _define_flags)
    mesh = parse_mesh(fv.mesh)
    memory_gib = fv.device_memory_gib
    if fv.compile_for:
        from kernels import gpu_compile, tpu_compile
        gpu = fv.compile_for in GPU_CHIPS
        try:  # say so before the estimate, not after
            if gpu:
                gpu_compile.require_cuda_plugin("--compile_for")
            else:
                tpu_compile.require_libtpu("--compile_for")
        except ValueError as e:
            raise UserError(str(e)) from None
        if gpu:  # before jax starts its backends
            os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
        if not fv["device_memory_gib"].present:  # judge the estimate by that chip's memory
            memory_gib = {**tpu_compile.HBM_GIB, **gpu_compile.HBM_GIB}.get(fv.compile_for, memory_gib)
    print(plan(fv.config, mesh, memory_gib), flush=True)
    if fv.compile_for:
        print(compiled_report(fv.config, mesh, fv.compile_for))


if __name__ == "__main__":
    main()
