"""gpt_jax.op_profile: op times read back from a real jax.profiler trace."""

import jax
import jax.numpy as jnp

from gpt_jax import op_profile


def test_busy_time_is_the_union_of_overlapping_ops():
    assert op_profile._union_length([(5, 15), (0, 10), (20, 25), (21, 22)]) == 20
    assert op_profile._union_length([]) == 0


def test_trace_names_the_ops_of_the_filtered_module(tmp_path):
    def sorts_columns(x):
        return jnp.sort(x, axis=0)[0] * 2.0

    def multiplies(x):
        return jnp.tanh(x @ x)

    sort_fn, matmul_fn = jax.jit(sorts_columns), jax.jit(multiplies)
    x = jax.random.normal(jax.random.key(0), (512, 512))
    jax.block_until_ready((sort_fn(x), matmul_fn(x)))
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(3):
            jax.block_until_ready((sort_fn(x), matmul_fn(x)))
    profile = op_profile.read_trace(str(tmp_path), module_filter="sorts_columns")
    assert profile.ops and all("sorts_columns" in r.module for r in profile.ops)
    assert any("sort" in r.op for r in profile.ops)
    assert 0 < profile.busy_ns <= profile.span_ns
    everything = op_profile.read_trace(str(tmp_path))
    assert any("multiplies" in r.module for r in everything.ops)
    table = op_profile.format_profile(profile, steps=3, wall_ms_per_step=1e3)
    assert "sort" in table and "device busy" in table and "idle" in table
