"""Run an attention kernel on each device's shard of a mesh.

XLA cannot partition a Pallas kernel: a Mosaic custom call on sharded operands is refused (or, at
best, run on gathered copies). Attention is independent per batch row and per head, so the kernel
goes inside `jax.shard_map` over the activation sharding that the logical rules give
[batch, seq, heads, head_dim], and each device runs it on its own [b/n, t, h/m, d] block.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

from gpt_jax.errors import UserError

ACT_AXES = ("act_batch", "act_length", "act_heads", "kv")


def _axis_size(mesh, entry) -> int:
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[n] for n in names if n is not None)


def shard_spec(mesh, q, k) -> P:
    """The [batch, seq, heads, head_dim] spec of q, k and v from the context's logical rules. A dim that
    its mesh axes do not divide (a batch of 1 at init, kv heads fewer than the tensor axis) stays whole."""
    spec = list(nn.logical_to_mesh_axes(ACT_AXES))
    spec += [None] * (4 - len(spec))
    if spec[1] is not None or spec[3] is not None:
        raise UserError(f"attention kernels need the sequence and head_dim unsharded; the sharding rules map "
                        f"act_length to {spec[1]!r} and kv to {spec[3]!r} (set them to None)")
    if q.shape[0] % _axis_size(mesh, spec[0]):
        spec[0] = None
    if q.shape[2] % _axis_size(mesh, spec[2]) or k.shape[2] % _axis_size(mesh, spec[2]):
        spec[2] = None
    return P(*spec)


def per_shard(fn, q, k, v, *per_head):
    """fn(q, k, v, *per_head) -> [batch, seq, heads, head_dim], run per device under the context's mesh
    (as is without one, or on a single device). per_head: [batch, heads] arrays (dropout seeds), split
    as q's batch and heads are."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(q, k, v, *per_head)
    spec = shard_spec(mesh, q, k)
    in_specs = (spec, spec, spec) + (P(spec[0], spec[2]),) * len(per_head)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False)(q, k, v, *per_head)
