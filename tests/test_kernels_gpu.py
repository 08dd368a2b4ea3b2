"""GPU-only checks (marker `gpu`; skipped without a CUDA device). The Mosaic GPU kernel is not written
yet, so these pin down what `auto` does on a GPU today and that the cuDNN baselines run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import bench, patterns

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.devices()[0].platform != "gpu", reason="needs a CUDA GPU"),
]


def test_auto_on_gpu_warns_and_matches_reference():
    keys = jax.random.split(jax.random.key(5), 3)
    q, k, v = (jax.random.normal(kk, (1, 512, 2, 64), jnp.bfloat16) for kk in keys)
    pattern = patterns.local_strided(64, 64)
    with pytest.warns(UserWarning, match="pallas_gpu"):
        out = kernels.sparse_attention(q, k, v, pattern)
    ref = kernels.reference_attention(q, k, v, pattern)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2)


def test_bench_cudnn_rows_run_on_gpu():
    rows = bench.main(["--seq", "1024", "--tokens", "2048", "--heads", "2", "--head-dim", "128",
                       "--window", "128", "--stride", "128", "--impls", "cudnn_dense,cudnn_band,xla_mask",
                       "--repeats", "3"])
    assert all(r["status"] == "ok" and r["fwd_ms"] > 0 for r in rows), rows
