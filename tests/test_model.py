"""The GPT model: parameter counts, init scales, attention dispatch and pattern equivalences."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from gpt_jax.gpt3 import gpt3_config
from gpt_jax.model import GPT, GPTConfig, count_params

# GPT-3 paper, appendix: parameter counts (millions) with vocab 50257 and context 2048.
GPT3_PARAMS_M = {"medium": 355.9, "large": 760.3, "xl": 1315.7, "2_7b": 2651.6, "6_7b": 6658.4,
                 "13b": 12853.4, "175b": 174604.3}


def abstract_params(model_cfg):
    tokens = jax.ShapeDtypeStruct((1, model_cfg.block_size), jnp.int32)
    shapes = jax.eval_shape(lambda t: GPT(model_cfg).init(jax.random.key(0), t), tokens)
    return nn.unbox(shapes["params"])


def test_gpt3_small_has_exactly_125_226_240_parameters():
    cfg = GPTConfig.from_config(gpt3_config("small"))
    assert count_params(abstract_params(cfg)) == 125_226_240


@pytest.mark.parametrize("size", sorted(GPT3_PARAMS_M))
def test_gpt3_family_parameter_counts(size):
    cfg = GPTConfig.from_config(gpt3_config(size))
    assert count_params(abstract_params(cfg)) / 1e6 == pytest.approx(GPT3_PARAMS_M[size], rel=5e-3)


def test_sparse_schedule_does_not_change_parameters():
    dense_cfg = GPTConfig.from_config(gpt3_config("small"))
    sparse_cfg = GPTConfig.from_config(gpt3_config("small", sparse=True))
    assert [p.kind for p in sparse_cfg.patterns[:4]] == ["dense", "local_strided"] * 2
    assert count_params(abstract_params(sparse_cfg)) == count_params(abstract_params(dense_cfg))


def init_tiny(**attention):
    cfg = tiny_config(attention=attention)
    model_cfg = GPTConfig.from_config(cfg, vocab_size=100)
    params = nn.unbox(GPT(model_cfg).init(jax.random.key(0), jnp.zeros((1, 64), jnp.int32))["params"])
    return model_cfg, params


def test_init_scales_follow_gpt2():
    model_cfg, params = init_tiny()
    std = lambda x: float(jnp.std(x))  # noqa: E731
    assert std(params["wte"]["embedding"]) == pytest.approx(0.02, rel=0.05)
    # Residual projections are scaled by 1/sqrt(2 * n_layer).
    want = 0.02 / np.sqrt(2 * model_cfg.n_layer)
    assert std(params["h_0"]["attn"]["c_proj"]["kernel"]) == pytest.approx(want, rel=0.1)
    assert std(params["h_1"]["mlp"]["c_proj"]["kernel"]) == pytest.approx(want, rel=0.1)
    assert float(jnp.abs(params["h_0"]["attn"]["c_attn"]["bias"]).max()) == 0.0
    assert "lm_head" not in params  # tied: the output projection is wte


def test_logits_are_causal():
    model_cfg, params = init_tiny()
    tokens = jax.random.randint(jax.random.key(1), (2, 64), 0, 100)
    changed = tokens.at[:, 40].set((tokens[:, 40] + 1) % 100)
    a = GPT(model_cfg).apply({"params": params}, tokens)
    b = GPT(model_cfg).apply({"params": params}, changed)
    np.testing.assert_array_equal(a[:, :40], b[:, :40])
    assert float(jnp.abs(a[:, 40:] - b[:, 40:]).max()) > 0


def test_dispatch_implementations_agree():
    tokens = jax.random.randint(jax.random.key(2), (2, 64), 0, 100)
    outs = {}
    for impl in ("reference", "xla", "auto"):
        model_cfg, params = init_tiny(impl=impl)
        outs[impl] = GPT(model_cfg).apply({"params": params}, tokens)
    np.testing.assert_allclose(outs["xla"], outs["reference"], atol=1e-5)
    np.testing.assert_allclose(outs["auto"], outs["reference"], atol=1e-5)


def test_sparse_layers_equal_dense_when_the_pattern_covers_the_context():
    tokens = jax.random.randint(jax.random.key(3), (2, 64), 0, 100)
    dense_cfg, params = init_tiny(schedule=("dense",))
    wide_cfg, _ = init_tiny(schedule=("dense", "local_strided"), window=64, stride=16)
    narrow_cfg, _ = init_tiny(schedule=("dense", "local_strided"), window=8, stride=16)
    run = lambda cfg: GPT(cfg).apply({"params": params}, tokens)  # noqa: E731
    np.testing.assert_allclose(run(wide_cfg), run(dense_cfg), atol=1e-5)
    assert float(jnp.abs(run(narrow_cfg) - run(dense_cfg)).max()) > 1e-3


def test_validation_errors():
    cfg = tiny_config(model=dict(n_head=3))
    with pytest.raises(ValueError, match="n_head=3 does not divide model.n_embd=64"):
        GPTConfig.from_config(cfg, 100).validate()
    cfg = tiny_config(model=dict(block_size=72))
    with pytest.raises(ValueError, match="block_size=72 is not a multiple of 16"):
        GPTConfig.from_config(cfg, 100).validate()
    cfg = tiny_config(attention=dict(schedule=("local/strided/dense",)))  # 2 heads in 3 groups
    with pytest.raises(ValueError, match="splits the heads into 3 groups"):
        GPTConfig.from_config(cfg, 100).validate()


@pytest.mark.parametrize("backend,impl,pattern,want", [
    ("tpu", "auto", "dense", "kernels"),
    ("cpu", "auto", "dense", "xla"),
    ("cpu", "auto", "local_strided", "kernels"),
    ("cpu", "pallas", "dense", "kernels"),
    ("gpu", "auto", "dense", "cudnn"),
    ("cpu", "xla", "local_strided", "reference"),
])
def test_attention_dispatch_routes(monkeypatch, backend, impl, pattern, want):
    from gpt_jax import attention
    from kernels.patterns import from_name

    calls = []
    monkeypatch.setattr(attention, "_backend", lambda: backend)
    monkeypatch.setattr(attention.kernels, "sparse_attention", lambda *a, **k: calls.append("kernels"))
    monkeypatch.setattr(attention, "reference_attention", lambda *a, **k: calls.append("reference"))
    monkeypatch.setattr(attention.jax.nn, "dot_product_attention",
                        lambda *a, implementation=None, **k: calls.append(implementation))
    q = jnp.zeros((1, 16, 2, 8))
    attention.attend(q, q, q, from_name(pattern, window=4, stride=4), impl)
    assert calls == [want]


def _qkv(seed, heads=4, kv_heads=2, seq=32, head_dim=16):
    keys = jax.random.split(jax.random.key(seed), 3)
    shapes = [(2, seq, heads, head_dim), (2, seq, kv_heads, head_dim), (2, seq, kv_heads, head_dim)]
    return [jax.random.normal(kk, s, jnp.float32) for kk, s in zip(keys, shapes)]


@pytest.mark.parametrize("name", ["dense", "local_strided", "local/strided"])
def test_attention_dropout_is_unbiased_and_drops(name):
    """Averaged over dropout keys, attention with probability dropout is plain attention (kept
    probabilities scaled by 1 / (1 - rate)); one key differs from it."""
    from gpt_jax.attention import attend_with_dropout
    from kernels import reference_attention
    from kernels.patterns import from_name

    pattern = from_name(name, window=8, stride=8, block=8, c=2)
    q, k, v = _qkv(7)
    want = reference_attention(q, k, v, pattern)
    draws = jax.vmap(lambda key: attend_with_dropout(q, k, v, pattern, 0.3, key))(
        jax.random.split(jax.random.key(8), 4000))
    assert float(jnp.abs(draws[0] - want).max()) > 0.1
    np.testing.assert_allclose(draws.mean(0), want, atol=0.06)
    np.testing.assert_allclose(attend_with_dropout(q, k, v, pattern, 0.0, jax.random.key(9)), want, atol=1e-5)


def test_attention_dropout_acts_only_in_training():
    plain_cfg, params = init_tiny()
    model_cfg = dataclasses.replace(plain_cfg, attn_dropout=0.5)
    tokens = jax.random.randint(jax.random.key(4), (2, 64), 0, 100)
    run = lambda cfg, **kw: GPT(cfg).apply({"params": params}, tokens, **kw)  # noqa: E731
    np.testing.assert_allclose(run(model_cfg), run(plain_cfg), atol=1e-6)
    rngs = {"dropout": jax.random.key(5)}
    trained = run(model_cfg, deterministic=False, rngs=rngs)
    assert float(jnp.abs(trained - run(plain_cfg, deterministic=False, rngs=rngs)).max()) > 1e-2


def test_dropout_rates_are_validated():
    cfg = tiny_config(model=dict(attn_dropout=1.0))
    with pytest.raises(ValueError, match=r"model.attn_dropout must be in \[0, 1\), got 1.0"):
        GPTConfig.from_config(cfg, 100).validate()


def test_embedding_gradient_accumulates_in_the_parameter_dtype():
    """A token seen 4096 times gets a gradient of 4096 per unit cotangent; summed in bfloat16 it
    would stop at 256."""
    from gpt_jax.model import embed_tokens

    table = jnp.zeros((3, 8), jnp.float32)
    tokens = jnp.zeros((4, 1024), jnp.int32).at[0, 0].set(2)
    grad = jax.grad(lambda t: embed_tokens(t, tokens, jnp.bfloat16).astype(jnp.float32).sum())(table)
    np.testing.assert_array_equal(grad[:, 0], [4095.0, 0.0, 1.0])
