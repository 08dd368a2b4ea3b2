"""The Pallas TPU kernels lowered for real TPUs on this CPU machine (no TPU needed).

`lower(lowering_platforms=("tpu",))` under an abstract mesh that names the chip runs Pallas's Mosaic
lowering: the (8, 128) block-shape rule, scalar prefetch, and every op of the kernel bodies. What it
cannot check is Mosaic's own compilation inside libtpu, which happens only on a TPU.
"""

import math
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

from kernels import patterns
from kernels.errors import UnsupportedInput
from kernels.pallas_tpu import sparse_attention_tpu

CHIPS = ("TPU v5 lite", "TPU v6 lite")  # Colab's v5e and v6e


def _lower_grad(chip, seq, heads, head_dim, pattern, block=None):
    device = AbstractDevice(device_kind=chip, num_cores=1, platform="tpu")
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=device)
    x = jax.ShapeDtypeStruct((1, seq, heads, head_dim), jnp.bfloat16)
    attend = lambda q, k, v: sparse_attention_tpu(q, k, v, pattern, block_q=block, block_k=block, interpret=False)
    loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32))
    with use_abstract_mesh(mesh):  # the gradient runs both passes' forward, dq and dk/dv kernels
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x).lower(lowering_platforms=("tpu",))
    return lowered.as_text().splitlines()


def _result_elements(line):
    """Element count of an op's result type (the last tensor<...> of its line)."""
    dims = re.findall(r"tensor<([0-9x]+)x[a-z]+[0-9]*>", line)[-1]
    return math.prod(int(n) for n in dims.split("x"))


@pytest.mark.parametrize("chip,head_dim", [(chip, 128) for chip in CHIPS] + [("TPU v5 lite", 64)])
def test_lowers_in_place_at_the_benchmark_shape(chip, head_dim):
    """T = 32K, 16 heads, window = stride = 256: 128 rows per residue, so both passes read and write
    the [B, T, H, D] arrays in place, 8 heads a step. XLA transposes only the [B, H, T] row statistics
    and does no arithmetic on a [B, T, H, D] array: the merge and the gradient sums are in the kernels.
    Every kernel reads and writes the row statistics lane-dense."""
    lines = _lower_grad(chip, 32768, 16, head_dim, patterns.local_strided(256, 256))
    assert sum("tpu_custom_call" in line for line in lines) == 6
    full = 32768 * 16 * head_dim  # elements of a [B, T, H, D] array
    transposes = [line for line in lines if "stablehlo.transpose" in line]
    assert transposes and max(_result_elements(t) for t in transposes) <= full // head_dim
    arithmetic = ("stablehlo.add", "stablehlo.multiply", "stablehlo.divide", "stablehlo.exponential")
    assert not [line for line in lines
                if line.strip().split(" = ")[-1].startswith(arithmetic) and _result_elements(line) >= full]
    # lse and delta cross HBM lane-dense ([B, H, 8, T]), never as (T, 1) columns
    calls = [line for line in lines if 'kernel_name = "sparse_attention_' in line]
    assert len(calls) == 6 and not [line for line in calls if re.search(r"tensor<[0-9x]+x1xf32>", line)]


@pytest.mark.parametrize("seq,head_dim,pattern", [
    (2048, 128, patterns.local_strided(256, 256)),  # 8 rows per residue: packed, transposed strided pass
    (4096, 96, patterns.local_strided(128, 64)),    # head_dim 96: transposed layout for both passes
    (4096, 128, patterns.dense()),
    (8192, 128, patterns.fixed(128, 8)),            # block-diagonal pass, then 512 gathered summary keys
], ids=["packed residues", "head_dim 96", "dense", "fixed"])
def test_lowers_in_the_other_layouts(seq, head_dim, pattern):
    lines = _lower_grad("TPU v5 lite", seq, 4, head_dim, pattern)
    assert sum("tpu_custom_call" in line for line in lines) == 3 * (1 + (pattern.kind in ("local_strided", "fixed")))


def test_tiles_mosaic_would_refuse_are_refused_first():
    """The backward's lane-dense statistics are (1, block_q) tiles: Mosaic's lowering takes block_q = 128
    and refuses 64 at T = 4096. The kernel says so itself, as an UnsupportedInput that auto falls back on."""
    assert _lower_grad("TPU v5 lite", 4096, 4, 128, patterns.local(256), block=128)
    with pytest.raises(UnsupportedInput, match="multiple of 128 rows"):
        _lower_grad("TPU v5 lite", 4096, 4, 128, patterns.local(256), block=64)
