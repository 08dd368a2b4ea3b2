"""The device mesh (data, fsdp, tensor) and the shardings derived from logical axis rules."""

from __future__ import annotations

import math
import os

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from gpt_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed() -> None:
    """Join a multi-host job when the environment describes one (SLURM, TPU pods, or explicit vars)."""
    explicit = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if explicit or os.environ.get("SLURM_NTASKS", "1") != "1" or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","):
        jax.distributed.initialize()


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise UserError(f"at most one mesh axis may be -1, got data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]}")
    if any(s == 0 or s < -1 for s in sizes):
        raise UserError(f"mesh sizes must be positive or -1, got data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise UserError(f"mesh axes of size {known} do not divide the {num_devices} available devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise UserError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices, "
                        f"but {num_devices} are available")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
    """Auto axis types on purpose: the model states shardings through flax logical constraints."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_shardings(boxed_tree, mesh, rules):
    """NamedShardings for a tree of flax LogicallyPartitioned leaves (from eval_shape of init)."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh) -> NamedSharding:
    """Split the first (batch) axis over data and fsdp, whatever the rank of the array."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch(batch_size: int, grad_accum: int, mesh) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % grad_accum:
        raise UserError(f"train.batch_size={batch_size} is not a multiple of train.grad_accum={grad_accum}")
    micro = batch_size // grad_accum
    if micro % shards:
        raise UserError(f"micro-batch {micro} (batch_size / grad_accum) is not a multiple of data x fsdp = {shards}")


def host_local_batch(global_batch: np.ndarray, mesh) -> jax.Array:
    """Place this host's rows of a global batch that every host computed identically."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(global_batch, sharding)
    return jax.make_array_from_callback(global_batch.shape, sharding, lambda idx: global_batch[idx])
