"""FLOPs per token and model FLOPs utilization (MFU).

Matmul FLOPs are 6 per parameter per token (forward + backward), embeddings excluded except the
tied output projection, which is a real matmul. Attention counts only the (query, key) pairs the
layer's pattern computes: 4 * head_dim * heads FLOPs per pair forward (QK^T and PV), times 3 for
forward + backward. Dense causal layers count the causal half, not the full square nanoGPT counts.
"""

from __future__ import annotations

import jax

from gpt_jax.model import GPTConfig

# Dense bf16 peak per chip, FLOP/s, from vendor datasheets.
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def matmul_params(cfg: GPTConfig) -> int:
    """Parameters that take part in matmuls per token: blocks plus the tied output projection."""
    c, h = cfg.n_embd, cfg.mlp_ratio * cfg.n_embd
    per_layer = 4 * c * c + 2 * c * h
    return cfg.n_layer * per_layer + cfg.vocab_size * c


def attention_pairs_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """Average number of keys a query attends to, summed over layers."""
    return sum(p.pairs(seq_len) for p in cfg.patterns) / seq_len


def train_flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    attn = 3 * 4 * cfg.n_embd * attention_pairs_per_token(cfg, seq_len)
    return 6 * matmul_params(cfg) + attn


def device_peak_flops(device=None) -> float | None:
    """Peak bf16 FLOP/s of one device, or None when unknown (CPU)."""
    kind = (device or jax.devices()[0]).device_kind
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return peak
    return None
