"""Which platform the code being traced will run on: this process's devices, or a TPU it only compiles for.

libtpu compiles for a TPU chip on a host without one (kernels.tpu_compile, gpt_jax.plan
--compile_for): the trace must then choose what it would choose on that chip (the Pallas TPU kernel,
compiled rather than interpreted; bf16 compute), though jax's own devices are CPUs.
"""

from __future__ import annotations

import contextlib

import jax

_target: str | None = None


def target_platform() -> str:
    """"tpu", "gpu" or "cpu": the platform being compiled for (default: jax's default backend)."""
    return _target or jax.default_backend()


@contextlib.contextmanager
def targeting(platform: str):
    """Trace for `platform` instead of this process's default backend, within the block."""
    global _target
    saved, _target = _target, platform
    try:
        yield
    finally:
        _target = saved
