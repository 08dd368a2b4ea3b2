"""The alignment losses against hand-computed values and plain Python loops."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax.align import losses


def nll_sigmoid(x):
    return math.log1p(math.exp(-x))  # -log sigmoid(x)


def test_pairwise_loss_groups_all_k_choose_2_pairs_per_prompt():
    # Prompt 1: K=3 (a padded 4th slot), best first. Prompt 2: K=2.
    rewards = jnp.array([[3.0, 1.0, 2.0, 9.0], [0.5, 0.0, 0.0, 0.0]])
    valid = jnp.array([[True, True, True, False], [True, True, False, False]])
    loss, acc, pairs = losses.pairwise_loss(rewards, valid)
    first = (nll_sigmoid(3 - 1) + nll_sigmoid(3 - 2) + nll_sigmoid(1 - 2)) / 3  # mean over its 3 pairs
    second = nll_sigmoid(0.5)
    assert float(loss) == pytest.approx((first + second) / 2, rel=1e-6)  # then the mean over prompts
    # Not the mean over the 4 pooled pairs: each prompt counts once, as in InstructGPT.
    pooled = (3 * first + second) / 4
    assert abs(float(loss) - pooled) > 1e-3
    assert float(acc) == pytest.approx(3 / 4)  # (1,2) is the one pair in the wrong order
    assert float(pairs) == 4


def test_pairwise_loss_with_nine_responses_counts_36_pairs():
    r = jnp.arange(9.0)[::-1][None]  # perfectly ordered
    loss, acc, pairs = losses.pairwise_loss(r, jnp.ones((1, 9), bool))
    want = np.mean([nll_sigmoid(float(r[0, i] - r[0, j])) for i in range(9) for j in range(i + 1, 9)])
    assert float(pairs) == 36 and float(acc) == 1.0
    assert float(loss) == pytest.approx(want, rel=1e-6)


def gae_loop(rewards, values, length, gamma, lam):
    adv = [0.0] * len(rewards)
    last = 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_a_python_loop(gamma, lam):
    rng = np.random.default_rng(0)
    b, n = 5, 7
    rewards, values = rng.normal(size=(b, n)), rng.normal(size=(b, n))
    lengths = np.array([7, 1, 4, 6, 3])
    mask = (np.arange(n)[None] < lengths[:, None]).astype(np.float32)
    adv, ret = losses.gae(jnp.asarray(rewards * mask), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
    for i in range(b):
        want = gae_loop(list(rewards[i]), list(values[i]), lengths[i], gamma, lam)
        np.testing.assert_allclose(np.asarray(adv[i]), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(ret[i]), (np.array(want) + values[i]) * mask[i], rtol=1e-5, atol=1e-6)


def test_kl_penalized_rewards_put_the_score_on_the_last_token():
    logp = jnp.array([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    ref = jnp.array([[-1.5, -1.0, -0.5], [-2.0, -9.0, -9.0]])
    mask = jnp.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rewards, kl = losses.kl_penalized_rewards(jnp.array([2.0, -1.0]), logp, ref, mask, jnp.array([3, 1]), 0.1)
    np.testing.assert_allclose(np.asarray(rewards), [[-0.05, 0.1, 2.0], [-0.1 - 1.0, 0.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(np.asarray(kl), [0.5 - 1.0 + 0.0, 1.0], atol=1e-6)


def test_adaptive_kl_controller_follows_ziegler_et_al():
    # error clipped at +0.2: KL far above target
    assert losses.adaptive_kl_coef(0.1, 12.0, 6.0, 10000, 64) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    # inside the clip: error = 5.7 / 6 - 1 = -0.05
    assert losses.adaptive_kl_coef(0.1, 5.7, 6.0, 10000, 64) == pytest.approx(0.1 * (1 - 0.05 * 64 / 10000))
    # error clipped at -0.2
    assert losses.adaptive_kl_coef(0.3, 0.0, 6.0, 100, 50) == pytest.approx(0.3 * (1 - 0.2 * 50 / 100))
    ctl = losses.KLController(0.1, target=6.0, horizon=10000)
    for kl in (12.0, 5.7):
        expected = ctl.value * (1 + np.clip(kl / 6.0 - 1, -0.2, 0.2) * 64 / 10000)
        assert ctl.update(kl, 64) == pytest.approx(expected)
    fixed = losses.KLController(0.1)
    assert fixed.update(100.0, 64) == 0.1


def test_clipped_policy_objective_on_hand_made_numbers():
    ratio = np.array([[1.5, 1.5, 0.5, 0.5, 3.0]])
    adv = jnp.array([[1.0, -1.0, 1.0, -1.0, 7.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 1.0, 0.0]])  # the last token is padding
    old = jnp.zeros((1, 5))
    loss, clip_frac, _ = losses.policy_loss(jnp.log(jnp.asarray(ratio)), old, adv, mask, clip=0.2)
    # per token max(-A r, -A clip(r, 0.8, 1.2)): -1.2 (clipped), 1.5, -0.5, 0.8 (clipped)
    assert float(loss) == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8) / 4, rel=1e-6)
    assert float(clip_frac) == pytest.approx(0.5)


def test_clipped_value_loss_on_hand_made_numbers():
    values = jnp.array([[1.5, 0.9, 5.0]])
    old = jnp.array([[1.0, 1.0, 0.0]])
    returns = jnp.array([[2.0, 1.0, 0.0]])
    mask = jnp.array([[1.0, 1.0, 0.0]])
    loss, clip_frac = losses.value_loss(values, old, returns, mask, clip=0.2)
    # token 1: V_clip = 1.2, max((1.5-2)^2, (1.2-2)^2) = 0.64; token 2: V_clip = V = 0.9 -> 0.01
    assert float(loss) == pytest.approx(0.5 * (0.64 + 0.01) / 2, rel=1e-6)
    assert float(clip_frac) == pytest.approx(0.5)


def test_masked_cross_entropy_ignores_masked_positions():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 4, 6)), jnp.float32)
    targets = jnp.array([[1, 2, 3, 4], [5, 0, 1, 2]])
    mask = jnp.array([[0, 1, 1, 0], [0, 0, 0, 1]], jnp.float32)
    logp = np.asarray(jax_log_softmax(logits))
    want = -np.mean([logp[0, 1, 2], logp[0, 2, 3], logp[1, 3, 2]])
    assert float(losses.masked_cross_entropy(logits, targets, mask)) == pytest.approx(want, rel=1e-6)


def jax_log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
