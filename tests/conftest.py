"""Shared test helpers. Tests run on CPU; GPU-only and TPU-only tests carry the `gpu` / `tpu` markers and
skip without one; `tpu_aot` tests compile for a TPU with libtpu and `gpu_aot` tests for an H100 with jax's
CUDA plugin, and skip without them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "tpu: needs a TPU (skipped without one)")
    config.addinivalue_line("markers", "tpu_aot: compiles for a TPU chip with libtpu, no TPU needed (skipped "
                            "without libtpu: pip install -e '.[tpu]')")
    config.addinivalue_line("markers", "gpu_aot: compiles for an H100 with jax's CUDA plugin, no GPU needed "
                            "(skipped without it: pip install -e '.[gpu_compile]')")


def pytest_collection_modifyitems(config, items):
    import jax

    backend = jax.default_backend()
    for marker, name in (("gpu", "a CUDA GPU"), ("tpu", "a TPU")):
        if backend != marker:
            for item in items:
                if marker in item.keywords:
                    item.add_marker(pytest.mark.skip(reason=f"needs {name}"))
    from kernels.tpu_compile import have_libtpu

    if not have_libtpu():
        for item in items:
            if "tpu_aot" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="needs libtpu (pip install -e '.[tpu]')"))
    from kernels.gpu_compile import have_cuda_plugin

    if not have_cuda_plugin():
        for item in items:
            if "gpu_aot" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="needs jax's CUDA plugin (pip install -e '.[gpu_compile]')"))


def tiny_config(**sections):
    """A model small enough to train for hundreds of steps on a CPU in seconds.

    `sections` updates config sections, e.g. tiny_config(train=dict(steps=5)).
    """
    from gpt_jax.config import get_base_config

    c = get_base_config()
    c.model.update(block_size=64, n_layer=2, n_head=2, n_embd=64, vocab_multiple=64, dtype="float32")
    c.attention.update(schedule=("dense", "local_strided"), window=16, stride=16, impl="reference")
    c.train.update(steps=20, batch_size=8, lr=3e-3, warmup_steps=5, log_every=1, eval_every=0,
                   eval_batches=2, ckpt_every=0, sample_tokens=0)
    for name, values in sections.items():
        c[name].update(values)
    return c


def run_cli(module: str, *args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m module args...` from the repo root, as a user would."""
    full_env = {**os.environ, "PYTHONPATH": REPO, **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """A CLI refused bad input as promised: exit 2, no traceback, one `error:` line naming it."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
