"""The GPT-3 optimizer recipe: AdamW (0.9, 0.95, eps 1e-8), global-norm clip 1.0, weight decay on
matrices only, linear warmup then cosine decay to 10% of the peak learning rate."""

from __future__ import annotations

import jax
import optax


def lr_schedule(train_cfg) -> optax.Schedule:
    decay_steps = train_cfg.decay_steps or train_cfg.steps
    warmup = min(train_cfg.warmup_steps, decay_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train_cfg.lr, warmup_steps=warmup,
        decay_steps=max(decay_steps, warmup + 1), end_value=train_cfg.lr * train_cfg.min_lr_ratio)


NO_DECAY = ("bias", "scale")  # parameter names never decayed: biases and LayerNorm scales


def decay_mask(params):
    """Decay matrices (embeddings and kernels); never biases or LayerNorm scales. By name, not by
    rank: the fused qkv bias is [3, heads, head_dim], three-dimensional and still a bias."""
    def decays(path, _):
        names = {getattr(k, "key", getattr(k, "name", None)) for k in path}  # boxed leaves add a 'value'
        return not names & set(NO_DECAY)
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(train_cfg.grad_clip),
        optax.adamw(lr_schedule(train_cfg), b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                     weight_decay=train_cfg.weight_decay, mask=decay_mask),
    )
