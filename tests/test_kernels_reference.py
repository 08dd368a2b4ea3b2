"""reference_attention (the oracle of every kernel test) against a naive per-row numpy loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import patterns
from kernels.reference import reference_attention


def _visible(pattern, i, j):
    """The pattern's definition, written out per pair (independent of Pattern.mask)."""
    d = i - j
    if d < 0:
        return False
    if pattern.kind == "dense":
        return True
    if pattern.kind == "local":
        return d < pattern.window
    if pattern.kind == "strided":
        return d % pattern.stride == 0
    if pattern.kind == "local_strided":
        return d < pattern.window or d % pattern.stride == 0
    b, c = pattern.block, pattern.c
    return i // b == j // b or j % b >= b - c


def _naive(q, k, v, pattern, q_offset=0, k_offset=0):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, tq, h, d = q.shape
    group = h // k.shape[2]
    out = np.zeros_like(q)
    lse = np.full((b, h, tq), -np.inf)
    for bi in range(b):
        for hi in range(h):
            # per-head patterns: equal contiguous head groups, group g with parts[g]
            head_pattern = pattern.parts[hi * len(pattern.parts) // h] if pattern.kind == "heads" else pattern
            for t in range(tq):
                keys = [s for s in range(k.shape[1]) if _visible(head_pattern, q_offset + t, k_offset + s)]
                if not keys:
                    continue
                scores = np.array([q[bi, t, hi] @ k[bi, s, hi // group] for s in keys]) / np.sqrt(d)
                m = scores.max()
                w = np.exp(scores - m)
                out[bi, t, hi] = (w[:, None] * v[bi, keys, hi // group]).sum(0) / w.sum()
                lse[bi, hi, t] = m + np.log(w.sum())
    return out, lse


@pytest.mark.parametrize("pattern", [
    patterns.dense(), patterns.local(3), patterns.strided(4), patterns.local_strided(3, 4),
    patterns.local_strided(5, 2), patterns.fixed(4, 1), patterns.fixed(4, 2),
], ids=str)
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_reference_matches_naive_loop(pattern, kv_heads):
    keys = jax.random.split(jax.random.key(kv_heads * 100 + len(str(pattern))), 3)
    q = jax.random.normal(keys[0], (2, 12, 2, 8))
    k = jax.random.normal(keys[1], (2, 12, kv_heads, 8))
    v = jax.random.normal(keys[2], (2, 12, kv_heads, 8))
    out, lse = reference_attention(q, k, v, pattern, return_lse=True)
    ref_out, ref_lse = _naive(q, k, v, pattern)
    np.testing.assert_allclose(out, ref_out, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(lse, ref_lse, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("pattern", [patterns.local_strided(3, 4), patterns.fixed(4, 1), patterns.local(2)], ids=str)
def test_reference_with_offsets_and_empty_rows(pattern):
    # a 4-row query chunk at positions 9..12 against keys 0..12, and keys offset past some queries
    keys = jax.random.split(jax.random.key(11), 3)
    q = jax.random.normal(keys[0], (1, 4, 2, 8))
    k = jax.random.normal(keys[1], (1, 13, 1, 8))
    v = jax.random.normal(keys[2], (1, 13, 1, 8))
    out = reference_attention(q, k, v, pattern, q_offset=9)
    np.testing.assert_allclose(out, _naive(q, k, v, pattern, q_offset=9)[0], rtol=2e-5, atol=2e-6)

    out, lse = reference_attention(q, k[:, :6], v[:, :6], pattern, q_offset=0, k_offset=2, return_lse=True)
    ref_out, ref_lse = _naive(q, k[:, :6], v[:, :6], pattern, q_offset=0, k_offset=2)
    assert np.isneginf(ref_lse[0, :, :2]).all()  # queries 0 and 1 precede every key
    np.testing.assert_allclose(out, ref_out, rtol=2e-5, atol=2e-6)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    assert np.isfinite(np.asarray(out)).all()


def test_reference_keeps_dtype():
    x = jnp.ones((1, 8, 2, 8), jnp.bfloat16)
    assert reference_attention(x, x, x, patterns.dense()).dtype == jnp.bfloat16


def test_keys_per_row_and_pairs_match_the_mask():
    for pattern in (patterns.dense(), patterns.local(5), patterns.strided(3), patterns.local_strided(5, 3),
                    patterns.local_strided(2, 7), patterns.fixed(6, 2)):
        pos = np.arange(42)
        m = pattern.mask(pos, pos)
        assert [pattern.keys_per_row(i) for i in range(42)] == m.sum(1).tolist()
        assert pattern.pairs(42) == m.sum()


def test_per_head_patterns_match_naive_loop():
    """heads(local, strided, fixed): 6 query heads in three groups of 2, over 3 kv heads (GQA)."""
    pattern = patterns.heads(patterns.local(3), patterns.strided(4), patterns.fixed(4, 2))
    keys = jax.random.split(jax.random.key(42), 3)
    q = jax.random.normal(keys[0], (1, 12, 6, 8))
    k, v = (jax.random.normal(kk, (1, 12, 3, 8)) for kk in keys[1:])
    out, lse = reference_attention(q, k, v, pattern, return_lse=True)
    ref_out, ref_lse = _naive(q, k, v, pattern)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 3"):
        reference_attention(q[:, :, :4], k[:, :, :2], v[:, :, :2], pattern)
