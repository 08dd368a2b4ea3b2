"""FlexAttention (torch) timings for kernels.bench, with the same pattern as a mask_mod and block mask.

Compiled once per process (torch.compile of flex_attention) with a raised recompile limit: without
it torch silently falls back to an eager path that materializes the scores (OOM at T=32K).
"""

from __future__ import annotations

import statistics
import time

from kernels.errors import NotAvailable

_compiled = {}


def _torch():
    try:
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        raise NotAvailable(f"torch with FlexAttention is not importable: {e}") from None
    if not torch.cuda.is_available():
        raise NotAvailable("torch sees no CUDA device")
    if "flex" not in _compiled:
        for name in ("recompile_limit", "cache_size_limit"):  # the newer name, then the older one
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 1000)
        _compiled["flex"] = torch.compile(flex_attention)
    return torch, create_block_mask, _compiled["flex"]


def mask_mod_for(pattern):
    """The pattern as a FlexAttention mask_mod: Pattern.visible on torch index tensors."""
    if pattern.kind == "heads":
        raise NotAvailable("per-head patterns are not wired to FlexAttention here")
    return lambda b, h, q_idx, kv_idx: pattern.visible(q_idx, kv_idx)


def _median_ms(torch, fn, repeats, warmup):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def bench_flex(pattern, seq, batch, heads, head_dim, dtype, repeats, warmup):
    """(forward ms, forward+backward ms) of FlexAttention on [batch, heads, seq, head_dim] inputs."""
    torch, create_block_mask, flex = _torch()
    tdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    block_mask = create_block_mask(mask_mod_for(pattern), B=None, H=None, Q_LEN=seq, KV_LEN=seq, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(seq)
    q, k, v, do = (torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=tdtype, generator=gen)
                   for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_(True)

    def fwd():
        with torch.no_grad():
            flex(q, k, v, block_mask=block_mask)

    def fwd_bwd():
        flex(q, k, v, block_mask=block_mask).backward(do)

    return _median_ms(torch, fwd, repeats, warmup), _median_ms(torch, fwd_bwd, repeats, warmup)
