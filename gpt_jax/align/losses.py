"""The alignment losses as pure functions of arrays (jit-able, tested against hand-computed values).

Conventions: response-aligned arrays are [batch, n] with a 0/1 `mask` that is a prefix of each row
(token t of the response is real when t < length); sums and means run over real tokens only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def masked_mean(x, mask):
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_cross_entropy(logits, targets, mask):
    """SFT: mean next-token loss over the positions where mask is 1 (response tokens and their
    end-of-text), in float32 whatever the compute dtype."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return masked_mean(ce, mask)


def token_logprobs(logits, tokens):
    """log p(tokens) under logits [..., vocab] (float32)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


def pairwise_loss(rewards, valid):
    """InstructGPT's reward-model loss with each prompt's K-choose-2 pairs in one batch element.

    rewards [B, K]: r(x, y_k) with the K responses ordered best first; valid [B, K]: which of the K
    slots hold a response (prompts have K from 2 to K_max). For every pair i < j of valid slots,
    y_i is better: per prompt, the mean over its pairs of -log sigmoid(r_i - r_j); then the mean
    over prompts. Returns (loss, accuracy over all pairs, number of pairs)."""
    k = rewards.shape[1]
    i, j = np.triu_indices(k, 1)
    diff = rewards[:, i] - rewards[:, j]                           # [B, K(K-1)/2]
    pair = (valid[:, i] & valid[:, j]).astype(jnp.float32)
    n_pairs = pair.sum(axis=1)
    per_prompt = jnp.sum(-jax.nn.log_sigmoid(diff) * pair, axis=1) / jnp.maximum(n_pairs, 1.0)
    has_pairs = (n_pairs > 0).astype(jnp.float32)
    loss = jnp.sum(per_prompt * has_pairs) / jnp.maximum(has_pairs.sum(), 1.0)
    accuracy = jnp.sum((diff > 0) * pair) / jnp.maximum(pair.sum(), 1.0)
    return loss, accuracy, pair.sum()


def kl_penalized_rewards(score, logp, ref_logp, mask, lengths, beta):
    """Per-token PPO rewards: -beta * (log pi - log pi_ref) at every response token, plus the reward
    model's score at the last one. Returns (rewards [B, n], per-sequence KL [B])."""
    mask = mask.astype(jnp.float32)
    kl = (logp - ref_logp) * mask
    last = jax.nn.one_hot(lengths - 1, logp.shape[1], dtype=jnp.float32)
    return -beta * kl + last * score[:, None], kl.sum(axis=1)


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalized advantage estimation over response tokens; the value after the last token is 0.

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1}.
    Returns (advantages, returns = advantages + values), both zero where mask is 0."""
    mask = mask.astype(jnp.float32)
    values = values * mask

    def step(carry, x):
        next_adv, next_value = carry
        r, v, m = x
        adv = (r + gamma * next_value - v + gamma * lam * next_adv) * m
        return (adv, v), adv

    xs = (rewards.T[::-1], values.T[::-1], mask.T[::-1])  # time-major, last token first
    zeros = jnp.zeros(rewards.shape[0], jnp.float32)
    _, adv = jax.lax.scan(step, (zeros, zeros), xs)
    adv = adv[::-1].T
    return adv, (adv + values) * mask


def whiten(x, mask, eps: float = 1e-8):
    """(x - mean) / std over the real tokens of the whole batch."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * jax.lax.rsqrt(var + eps) * mask


def policy_loss(logp, old_logp, advantages, mask, clip: float = 0.2):
    """PPO's clipped surrogate: mean over tokens of max(-A * ratio, -A * clip(ratio, 1-eps, 1+eps)).

    Returns (loss, clip fraction: the share of tokens where the clipped term is the one taken,
    approximate KL(old || new))."""
    ratio = jnp.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).astype(jnp.float32), mask)
    approx_kl = masked_mean(0.5 * (logp - old_logp) ** 2, mask)
    return loss, clip_frac, approx_kl


def value_loss(values, old_values, returns, mask, clip: float = 0.2):
    """Clipped value loss: 0.5 * mean over tokens of max((V - R)^2, (V_clip - R)^2) with
    V_clip = V_old + clip(V - V_old, -eps, eps). Returns (loss, clip fraction)."""
    clipped_values = old_values + jnp.clip(values - old_values, -clip, clip)
    a, b = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * masked_mean(jnp.maximum(a, b), mask), masked_mean((b > a).astype(jnp.float32), mask)


def adaptive_kl_coef(beta: float, kl: float, target: float, horizon: float, n_steps: int) -> float:
    """Ziegler et al. (2019): e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n / horizon),
    n being the number of episodes since the last update."""
    error = float(np.clip(kl / target - 1.0, -0.2, 0.2))
    return float(beta * (1.0 + error * n_steps / horizon))


class KLController:
    """Fixed beta, or the adaptive controller when `target` > 0. Its value lives in the checkpoint."""

    def __init__(self, beta: float, target: float = 0.0, horizon: float = 10000.0):
        self.value, self.target, self.horizon = float(beta), float(target), float(horizon)

    def update(self, kl: float, n_steps: int) -> float:
        if self.target > 0:
            self.value = adaptive_kl_coef(self.value, kl, self.target, self.horizon, n_steps)
        return self.value
