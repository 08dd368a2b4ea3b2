"""Attention patterns: masks, key counts, reachability, and agreement where patterns coincide."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.patterns import dense, fixed, from_name, heads, local, local_strided, strided
from kernels.reference import reference_attention

PATTERNS = [dense(), local(7), strided(5), local_strided(8, 8), local_strided(12, 5), local_strided(3, 8), fixed(8, 2)]


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_keys_per_row_matches_mask(pattern):
    t = 97
    mask = pattern.mask(np.arange(t), np.arange(t))
    assert not np.triu(mask, k=1).any(), "a key after the query is visible"
    assert all(mask[i, i] for i in range(t)), "a query cannot see itself"
    assert [int(mask[i].sum()) for i in range(t)] == [pattern.keys_per_row(i) for i in range(t)]
    assert pattern.pairs(t) == int(mask.sum())


def test_local_strided_by_definition():
    p = local_strided(4, 6)
    mask = p.mask(np.arange(30), np.arange(30))
    for i in range(30):
        for j in range(30):
            d = i - j
            assert mask[i, j] == (d >= 0 and (d < 4 or d % 6 == 0))


@pytest.mark.parametrize("window,stride", [(8, 8), (12, 8), (16, 4), (5, 3)])
def test_local_strided_reaches_everything_in_two_hops(window, stride):
    t = 80
    m = local_strided(window, stride).mask(np.arange(t), np.arange(t)).astype(np.int32)
    two_hops = (m @ m) > 0
    assert two_hops[np.tril_indices(t)].all()


def test_two_hops_fail_when_window_below_stride():
    # The guarantee needs window >= stride: with a gap some earlier positions stay out of reach.
    t = 80
    m = local_strided(2, 8).mask(np.arange(t), np.arange(t)).astype(np.int32)
    assert not ((m @ m) > 0)[np.tril_indices(t)].all()


def test_density_matches_anchor_figures():
    # ANCHORS.md: share of causal pairs for window = stride = 256.
    p = local_strided(256, 256)
    assert p.density(2048) == pytest.approx(0.238, abs=5e-4)
    assert p.density(8192) == pytest.approx(0.0653, abs=5e-5)


def test_reference_agrees_where_patterns_coincide():
    keys = jax.random.split(jax.random.key(11), 3)
    q, k, v = (jax.random.normal(kk, (2, 32, 4, 16)) for kk in keys)
    dense_out = reference_attention(q, k, v, dense())
    xla_out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    np.testing.assert_allclose(dense_out, xla_out, atol=2e-6)
    # A window covering the sequence, or a stride of 1, is dense attention.
    np.testing.assert_allclose(reference_attention(q, k, v, local(32)), dense_out, atol=1e-6)
    np.testing.assert_allclose(reference_attention(q, k, v, strided(1)), dense_out, atol=1e-6)
    np.testing.assert_allclose(reference_attention(q, k, v, local_strided(40, 16)), dense_out, atol=1e-6)
    # A real sparse pattern is not.
    assert float(jnp.abs(reference_attention(q, k, v, local_strided(4, 8)) - dense_out).max()) > 1e-2


def test_from_name_and_errors():
    assert from_name("local_strided", window=4, stride=8) == local_strided(4, 8)
    with pytest.raises(ValueError, match="unknown attention pattern"):
        from_name("diagonal")
    with pytest.raises(ValueError, match="not a multiple of 8"):
        local_strided(8, 8).check_seq_len(60)


def test_per_head_patterns():
    p = from_name("local/strided", window=4, stride=6)
    assert p == heads(local(4), strided(6)) and str(p) == "heads(local(window=4) | strided(stride=6))"
    assert p.seq_multiple == 6 and from_name("fixed/strided", block=4, c=1, stride=6).seq_multiple == 12
    t = 40  # each head group computes its own pattern's pairs: a head on average the mean
    assert p.pairs(t) == (local(4).pairs(t) + strided(6).pairs(t)) / 2
    with pytest.raises(ValueError, match="one mask per head group"):
        p.mask(np.arange(4), np.arange(4))
    with pytest.raises(ValueError, match="two or more"):
        heads(local(4))
    with pytest.raises(ValueError, match="multiple of 2"):
        p.check_heads(3)
