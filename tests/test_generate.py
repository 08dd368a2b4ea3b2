"""Cached generation: logits equal a full forward pass for every pattern's cache layout, rows of
different lengths are independent, sampling filters do what they say, and bad lengths are refused."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from gpt_jax import kv_cache
from gpt_jax.generate import cached_logits, generate, sample_logits
from gpt_jax.model import GPT, GPTConfig, init_cache
from kernels.patterns import dense, local_strided

VOCAB = 100


def build(schedule, **attention):
    cfg = tiny_config(attention=dict(schedule=schedule, window=8, stride=8, **attention))
    model_cfg = GPTConfig.from_config(cfg, vocab_size=VOCAB)
    params = nn.unbox(GPT(model_cfg).init(jax.random.key(0), jnp.zeros((1, 64), jnp.int32))["params"])
    # Sharpen attention (q and k weights x4): outputs then depend strongly on which keys are visible,
    # so a cache that shows a layer the wrong keys cannot hide inside float32 tolerance.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 4 if "c_attn" in jax.tree_util.keystr(path) else x, params)
    return model_cfg, params


def full_logits(model_cfg, params, tokens):
    return np.asarray(GPT(model_cfg).apply({"params": params}, jnp.asarray(tokens)), np.float32)


SCHEDULES = {
    "dense+local_strided": (("dense", "local_strided"), {}),
    "local+strided": (("local", "strided"), {}),
    "fixed": (("fixed", "dense"), dict(block=16, c=4)),
    "per-head local/strided": (("local/strided", "fixed/dense"), dict(block=16, c=4)),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_cached_logits_equal_a_full_forward_pass(name):
    schedule, extra = SCHEDULES[name]
    model_cfg, params = build(schedule, **extra)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, (3, 64)).astype(np.int32)
    lengths, n = [3, 13, 30], 33  # prompts shorter and longer than the window, decoding past the stride
    prompts = [tokens[i, :l].tolist() for i, l in enumerate(lengths)]
    continuation = np.stack([tokens[i, l:l + n] for i, l in enumerate(lengths)])
    got = cached_logits(model_cfg, params, prompts, continuation)
    ref = full_logits(model_cfg, params, tokens)
    want = np.stack([ref[i, l - 1:l + n] for i, l in enumerate(lengths)])
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    # The test can tell patterns apart: the same weights with dense attention everywhere differ.
    dense_cfg = GPTConfig(**{**model_cfg.__dict__, "patterns": (dense(),) * model_cfg.n_layer})
    other = full_logits(dense_cfg, params, tokens)
    assert np.abs(np.stack([other[i, l - 1:l + n] for i, l in enumerate(lengths)]) - want).max() > 1e-2


def test_local_strided_cache_reads_band_plus_one_residue():
    """A local_strided layer stores a ring of `window` slots and a residue-major table, and one step
    reads window + L/stride entries: independent of the position, unlike a dense layer's L."""
    p = local_strided(64, 64)
    cache = kv_cache.init_layer(p, batch=2, block_size=2048, heads=1, head_dim=4, dtype=jnp.float32)
    assert cache["band_k"].shape == (2, 64, 1, 4)
    assert cache["res_k"].shape == (2, 64, 32, 1, 4)
    assert kv_cache.keys_read_per_token(p, 2048) == 64 + 32
    assert kv_cache.keys_read_per_token(dense(), 2048) == 2048


def test_batched_rows_match_single_rows_and_greedy_matches_argmax():
    model_cfg, params = build(("dense", "local_strided"))
    prompts = [[5, 6, 7], list(range(10, 31)), [42]]
    batch = generate(model_cfg, params, prompts, max_new_tokens=12, key=jax.random.key(1), temperature=0.0)
    for i, p in enumerate(prompts):
        alone = generate(model_cfg, params, [p], max_new_tokens=12, key=jax.random.key(1), temperature=0.0)
        np.testing.assert_array_equal(batch.tokens[i], alone.tokens[0])
    # Greedy: each token is the argmax of a full forward pass over the prompt and the tokens so far.
    seq = list(prompts[1])
    for _ in range(4):
        seq.append(int(np.argmax(full_logits(model_cfg, params, np.array([seq]))[0, -1])))
    assert batch.tokens[1, :4].tolist() == seq[len(prompts[1]):]
    assert batch.tokens.dtype == np.int32 and batch.tokens.shape == (3, 12)
    assert batch.lengths.tolist() == [12, 12, 12]


def test_stop_token_ends_a_row_and_pads_it():
    model_cfg, params = build(("dense", "local_strided"))
    prompts = [[5, 6, 7], [50, 51]]
    free = generate(model_cfg, params, prompts, max_new_tokens=6, key=jax.random.key(0), temperature=0.0)
    stop = int(free.tokens[0, 2])  # row 0's third greedy token
    res = generate(model_cfg, params, prompts, max_new_tokens=6, key=jax.random.key(0), temperature=0.0,
                   stop_token=stop)
    first = int(np.flatnonzero(free.tokens[0] == stop)[0])
    assert res.lengths[0] == first + 1
    np.testing.assert_array_equal(res.tokens[0, :first + 1], free.tokens[0, :first + 1])
    assert (res.tokens[0, first + 1:] == stop).all()
    hits = np.flatnonzero(free.tokens[1] == stop)
    assert res.lengths[1] == (hits[0] + 1 if len(hits) else 6)


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)

    def support(**kw):
        return set(np.asarray(jax.vmap(lambda k: sample_logits(logits, k, temperature=1.0, **kw)[0])(keys)).tolist())

    assert support() == {0, 1, 2, 3}
    assert support(top_k=2) == {0, 1}
    assert support(top_p=0.6) == {0, 1}   # 0.5 alone is short of 0.6
    assert support(top_p=0.5) == {0}
    assert support(top_p=0.85) == {0, 1, 2}
    assert int(sample_logits(logits, keys[0], temperature=0.0)[0]) == 0
    # Seeds: the same key gives the same sample, temperature > 0 gives varied ones across keys.
    model_cfg, params = build(("dense", "local_strided"))
    a = generate(model_cfg, params, [[1, 2, 3]], max_new_tokens=8, key=jax.random.key(7), temperature=1.0)
    b = generate(model_cfg, params, [[1, 2, 3]], max_new_tokens=8, key=jax.random.key(7), temperature=1.0)
    c = generate(model_cfg, params, [[1, 2, 3]], max_new_tokens=8, key=jax.random.key(8), temperature=1.0)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()


def test_bad_lengths_are_refused():
    model_cfg, params = build(("dense", "local_strided"))
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        generate(model_cfg, params, [[1] * 60], max_new_tokens=5, key=jax.random.key(0))
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model_cfg, params, [[1, 2], []], max_new_tokens=5, key=jax.random.key(0))
    # Exactly full is fine: prompt + new tokens == block_size.
    res = generate(model_cfg, params, [[1] * 60], max_new_tokens=4, key=jax.random.key(0), temperature=0.0)
    assert res.tokens.shape == (1, 4)


def test_cache_starts_empty_and_tracks_positions():
    model_cfg, params = build(("dense", "local_strided"))
    cache = init_cache(model_cfg, 2)
    tokens = jnp.array([[1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                        [4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], jnp.int32)
    _, cache = GPT(model_cfg).apply({"params": params}, tokens, cache=cache, lengths=jnp.array([3, 5]))
    assert cache["pos"].tolist() == [3, 5]
    _, cache = GPT(model_cfg).apply({"params": params}, jnp.array([[9], [9]]), cache=cache)
    assert cache["pos"].tolist() == [4, 6]
