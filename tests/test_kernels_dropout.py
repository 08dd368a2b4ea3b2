"""Attention dropout's mask (kernels/dropout.py) and the reference that applies it; the Mosaic GPU
kernels are checked against this reference in tests/test_kernels_gpu_interpret.py and, compiled, in
tests/test_kernels_gpu.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import dropout, patterns
from kernels.reference import reference_attention


def _mask(seed, rate, batch=2, heads=3, seq=512):
    seeds = dropout.head_seeds(jnp.int32(seed), batch, heads)
    return np.asarray(dropout.keep_mask(seeds, jnp.arange(seq), jnp.arange(seq), dropout.Dropout(rate)))


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_mask_keeps_one_minus_rate_with_no_pattern_between_neighbours(rate):
    """1.5M draws: the kept fraction is 1 - rate to 4 standard deviations, and pairs of neighbouring
    keys, neighbouring queries and neighbouring heads are kept together as often as independent draws
    would be (a hash whose outputs for i ^ 1 and i were related would fail here)."""
    keep = _mask(1234, rate)
    p = 1.0 - rate
    n = keep.size
    assert abs(keep.mean() - p) < 4 * np.sqrt(p * (1 - p) / n)
    for pair in (keep[..., 1:] & keep[..., :-1], keep[..., 1:, :] & keep[..., :-1, :], keep[:, 1:] & keep[:, :-1]):
        assert abs(pair.mean() - p * p) < 4 * np.sqrt(p * p * (1 - p * p) / pair.size)
    # every query row and every key column drops: no row or column is left whole
    assert keep.all(axis=-1).sum() == 0 and keep.all(axis=-2).sum() == 0


def test_masks_of_different_seeds_agree_as_independent_ones():
    a, b = _mask(1, 0.3), _mask(2, 0.3)
    agree = (a == b).mean()
    assert abs(agree - (0.7 ** 2 + 0.3 ** 2)) < 0.005


def test_reference_drops_the_masks_probabilities_under_gqa():
    """reference_attention with dropout against a plain loop: softmax per (row, head) over the
    visible keys, the mask's probabilities zeroed and the kept ones scaled by 1 / (1 - rate), times
    the head's kv group's values."""
    b, t, h, hk, d, rate = 2, 24, 4, 2, 8, 0.4
    keys = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(keys[0], (b, t, h, d))
    k, v = (jax.random.normal(kk, (b, t, hk, d)) for kk in keys[1:])
    pattern = patterns.local(6)
    seed = dropout.seed_from_key(jax.random.key(11))
    got = reference_attention(q, k, v, pattern, dropout_rate=rate, dropout_seed=seed)
    keep = _mask_for(seed, b, h, t, rate)
    visible = np.asarray(pattern.mask(np.arange(t), np.arange(t)))
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    want = np.zeros((b, t, h, d))
    for bi in range(b):
        for hi in range(h):
            g = hi // (h // hk)
            s = np.where(visible, qn[bi, :, hi] @ kn[bi, :, g].T / np.sqrt(d), -np.inf)
            p = np.exp(s - s.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            want[bi, :, hi] = (p * keep[bi, hi] / (1 - rate)) @ vn[bi, :, g]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(got - reference_attention(q, k, v, pattern)).max() > 0.1  # it did drop


def _mask_for(seed, b, h, t, rate):
    seeds = dropout.head_seeds(seed, b, h)
    return np.asarray(dropout.keep_mask(seeds, jnp.arange(t), jnp.arange(t), dropout.Dropout(rate)))


def test_a_slice_of_the_seeds_gives_the_slice_of_the_result():
    """What a mesh does: each device gets the [batch, heads] seeds of its own rows and heads, so a
    part of the batch and heads computed alone equals that part of the whole (also for per-head
    patterns, whose groups are run one by one)."""
    b, t, h, d = 4, 32, 4, 8
    q, k, v = (jax.random.normal(kk, (b, t, h, d)) for kk in jax.random.split(jax.random.key(5), 3))
    seeds = dropout.head_seeds(jnp.int32(77), b, h)
    attend = lambda q, k, v, pattern, seed: kernels.sparse_attention(  # noqa: E731
        q, k, v, pattern, impl="reference", dropout_rate=0.3, dropout_seed=seed)
    whole = attend(q, k, v, patterns.dense(), seeds)
    part = attend(q[2:, :, 2:], k[2:, :, 2:], v[2:, :, 2:], patterns.dense(), seeds[2:, 2:])
    np.testing.assert_allclose(part, whole[2:, :, 2:], atol=1e-6)
    np.testing.assert_allclose(attend(q, k, v, patterns.dense(), jnp.int32(77)), whole, atol=1e-6)
    # a per-head pattern's second group is its pattern on the second half of the heads and seeds
    pattern = patterns.from_name("local/strided", window=8, stride=8)
    whole = attend(q, k, v, pattern, seeds)
    second = attend(q[:, :, 2:], k[:, :, 2:], v[:, :, 2:], pattern.parts[1], seeds[:, 2:])
    np.testing.assert_allclose(second, whole[:, :, 2:], atol=1e-6)


def test_bad_dropout_arguments_raise():
    q = jnp.zeros((1, 16, 2, 8))
    with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\), got 1.0"):
        kernels.sparse_attention(q, q, q, patterns.dense(), impl="reference", dropout_rate=1.0, dropout_seed=0)
    with pytest.raises(ValueError, match="needs a dropout_seed"):
        kernels.sparse_attention(q, q, q, patterns.dense(), impl="reference", dropout_rate=0.1)
    with pytest.raises(ValueError, match=r"\[batch, heads\] = \(1, 2\), got \(2, 2\)"):
        kernels.sparse_attention(q, q, q, patterns.dense(), impl="reference", dropout_rate=0.1,
                                 dropout_seed=jnp.zeros((2, 2), jnp.int32))
