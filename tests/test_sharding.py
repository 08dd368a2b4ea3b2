"""Sharding equivalence: the same step on 1 device and on a data=2, fsdp=2, tensor=2 mesh of 8
fake CPU devices gives the same loss, gradients and updated parameters, laid out as the rules say."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, tiny_config
from gpt_jax.errors import UserError
from gpt_jax.sharding import mesh_shape

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sharding") / "results.npz")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": os.pathsep.join([REPO, HERE]), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sharding_check.py"), out], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out + ".json") as f:
        specs = json.load(f)
    return dict(np.load(out)), specs


def test_loss_and_gradients_match_across_meshes(sharded_results):
    arrays, _ = sharded_results
    np.testing.assert_allclose(arrays["mesh/loss"], arrays["single/loss"], rtol=1e-6)
    grad_keys = [k for k in arrays if k.startswith("single/grad/")]
    assert len(grad_keys) > 10
    for key in grad_keys:
        np.testing.assert_allclose(arrays[key.replace("single/", "mesh/")], arrays[key], rtol=2e-4, atol=1e-6,
                                   err_msg=key)


def test_train_step_updates_match_across_meshes(sharded_results):
    arrays, _ = sharded_results
    np.testing.assert_allclose(arrays["mesh/step_loss"], arrays["single/step_loss"], rtol=1e-6)
    for key in (k for k in arrays if k.startswith("single/param/")):
        np.testing.assert_allclose(arrays[key.replace("single/", "mesh/")], arrays[key], rtol=1e-4, atol=1e-6,
                                   err_msg=key)


def test_parameter_and_optimizer_state_shardings_follow_the_rules(sharded_results):
    _, specs = sharded_results
    expect = {  # logical axes -> mesh axes through DEFAULT_RULES
        "['wte']['embedding']": ["tensor", "fsdp"],                   # (vocab, embed)
        "['wpe']": [None, "fsdp"],                                     # (positions, embed)
        "['h_0']['attn']['c_attn']['kernel']": ["fsdp", None, "tensor", None],  # (embed, qkv, heads, kv)
        "['h_0']['attn']['c_proj']['kernel']": ["tensor", None, "fsdp"],        # (heads, kv, embed)
        "['h_1']['mlp']['c_fc']['kernel']": ["fsdp", "tensor"],        # (embed, mlp)
        "['h_1']['mlp']['c_proj']['kernel']": ["tensor", "fsdp"],      # (mlp, embed)
        "['ln_f']['scale']": ["fsdp"],
    }
    for path, spec in expect.items():
        got = specs[f"mesh/{path}"]
        got += [None] * (len(spec) - len(got))  # trailing unsharded dims may be left out
        assert got == spec, path
        # AdamW's two moments of that parameter are sharded the same way, not replicated
        moments = [v for k, v in specs.items() if k.startswith("mesh/opt") and k.endswith(path)]
        assert len(moments) == 2, (path, moments)
        for m in moments:
            assert m + [None] * (len(spec) - len(m)) == spec, (path, m)


def test_attention_kernel_runs_on_each_devices_shard(sharded_results):
    """A Pallas kernel is not partitioned by XLA, so the model hands it each device's shard: on
    data=2 x fsdp=2 x tensor=2 the [8, 64, 4, 16] activations reach it as [2, 64, 2, 16] blocks."""
    _, specs = sharded_results
    assert specs["single/kernel_shapes"] and specs["mesh/kernel_shapes"]
    assert {tuple(map(tuple, s)) for s in specs["single/kernel_shapes"]} == {((8, 64, 4, 16), (8, 64, 4, 16))}
    assert {tuple(map(tuple, s)) for s in specs["mesh/kernel_shapes"]} == {((2, 64, 2, 16), (2, 64, 2, 16))}


def test_kernel_shard_spec_follows_the_rules_and_keeps_what_does_not_divide():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.sharding import AbstractMesh, AxisType
    from jax.sharding import PartitionSpec as P

    from gpt_jax.config import DEFAULT_RULES
    from gpt_jax.kernel_sharding import shard_spec

    mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"), (AxisType.Auto,) * 3)
    x = lambda b, h: jax.ShapeDtypeStruct((b, 64, h, 16), jnp.float32)
    with nn.logical_axis_rules(DEFAULT_RULES):
        assert shard_spec(mesh, x(8, 4), x(8, 4)) == P(("data", "fsdp"), None, "tensor", None)
        assert shard_spec(mesh, x(1, 4), x(1, 4)) == P(None, None, "tensor", None)   # init's batch of 1
        assert shard_spec(mesh, x(8, 4), x(8, 1)) == P(("data", "fsdp"), None, None, None)  # 1 kv head
    with nn.logical_axis_rules((("act_length", "data"),) + DEFAULT_RULES):
        with pytest.raises(UserError, match="sequence and head_dim unsharded"):
            shard_spec(mesh, x(8, 4), x(8, 4))


def test_a_pallas_kernel_lowers_for_a_tpu_mesh_only_per_shard():
    """The failure per_shard prevents, shown by lowering for 8 TPU v5e chips on this CPU: jit of the Pallas
    TPU kernel on batch- and head-sharded inputs is refused by Mosaic; per_shard's gradient lowers."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType, NamedSharding, use_abstract_mesh
    from jax.sharding import PartitionSpec as P

    from gpt_jax.config import DEFAULT_RULES
    from gpt_jax.kernel_sharding import per_shard
    from kernels import patterns
    from kernels.pallas_tpu import sparse_attention_tpu

    chip = AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
    mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"), (AxisType.Auto,) * 3, abstract_device=chip)
    x = jax.ShapeDtypeStruct((8, 1024, 4, 128), jnp.bfloat16,
                             sharding=NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None)))
    kernel = lambda q, k, v: sparse_attention_tpu(q, k, v, patterns.local_strided(128, 128), interpret=False)
    loss = lambda q, k, v: jnp.sum(per_shard(kernel, q, k, v).astype(jnp.float32))
    with use_abstract_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x).lower(lowering_platforms=("tpu",))
        assert sum("tpu_custom_call" in line for line in lowered.as_text().splitlines()) == 6
        with pytest.raises(NotImplementedError, match="cannot be automatically partitioned"):
            jax.jit(kernel).trace(x, x, x).lower(lowering_platforms=("tpu",))


def test_mesh_shape_inference_and_errors():
    assert mesh_shape(dict(data=-1, fsdp=2, tensor=1), 8) == (4, 2, 1)
    with pytest.raises(UserError, match="= 8 devices, but 4 are available"):
        mesh_shape(dict(data=2, fsdp=2, tensor=2), 4)
    with pytest.raises(UserError, match="at most one mesh axis may be -1"):
        mesh_shape(dict(data=-1, fsdp=-1, tensor=1), 4)
    assert tiny_config().mesh.data == -1
