"""gpt_jax.bench_plain, the yardstick for bench_train: it must compute what gpt_jax's model computes,
or comparing their step times says nothing."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli
from gpt_jax.bench_plain import PlainGPT
from gpt_jax.config import get_base_config
from gpt_jax.model import GPT, GPTConfig
from test_cli import TINY


def plain_weights(ours: dict, cfg: GPTConfig) -> dict:
    """gpt_jax.model.GPT's parameters in PlainGPT's tree: fused [C, 3, H, D] and [H, D, C] kernels
    flattened to the [C, 3C] and [C, C] of plain Dense layers."""
    c = cfg.n_embd
    flat = lambda p, shape: {k: v.reshape(shape if k == "kernel" else (-1,)) for k, v in p.items()}  # noqa: E731
    out = {"wte": ours["wte"], "wpe": ours["wpe"], "ln_f": ours["ln_f"]}
    for i in range(cfg.n_layer):
        h = ours[f"h_{i}"]
        out[f"h_{i}"] = {"ln_1": h["ln_1"], "ln_2": h["ln_2"], "c_attn": flat(h["attn"]["c_attn"], (c, 3 * c)),
                         "attn_proj": flat(h["attn"]["c_proj"], (c, c)), "c_fc": h["mlp"]["c_fc"],
                         "mlp_proj": h["mlp"]["c_proj"]}
    return out


@pytest.mark.parametrize("use_bias", [True, False])
def test_plain_model_computes_gpt_jax_model(use_bias):
    cfg = get_base_config()
    cfg.model.update(n_layer=2, n_head=4, n_embd=32, block_size=32, use_bias=use_bias, dtype="float32")
    cfg.attention.update(schedule=("dense",), impl="reference")
    model_cfg = GPTConfig.from_config(cfg, vocab_size=61)
    tokens = jax.random.randint(jax.random.key(1), (3, 32), 0, 61)
    ours = nn.unbox(GPT(model_cfg).init(jax.random.key(0), tokens)["params"])
    # Fresh weights large enough that activations are of order one: biases are non-zero, LayerNorm
    # scales differ from one, and GELU's tanh form differs measurably from its exact form.
    keys = iter(jax.random.split(jax.random.key(2), 64))
    ours = jax.tree_util.tree_map_with_path(
        lambda path, x: (path[-1].key == "scale") + 0.3 * jax.random.normal(next(keys), x.shape), ours)
    plain = PlainGPT(model_cfg)
    want_tree = jax.eval_shape(plain.init, jax.random.key(0), tokens)["params"]
    weights = plain_weights(ours, model_cfg)
    assert jax.tree_util.tree_structure(weights) == jax.tree_util.tree_structure(want_tree)
    assert jax.tree_util.tree_map(jnp.shape, weights) == jax.tree_util.tree_map(jnp.shape, want_tree)
    np.testing.assert_allclose(plain.apply({"params": weights}, tokens), GPT(model_cfg).apply({"params": ours}, tokens),
                               rtol=1e-5, atol=1e-5)


def test_bench_plain_learns_and_reports(tmp_path):
    out = tmp_path / "plain.json"
    proc = run_cli("gpt_jax.bench_plain", *TINY, "--config.attention.schedule=dense", "--config.train.lr=3e-3",
                   "--config.train.warmup_steps=0", "--iters", "20", "--warmup", "0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert (r["batch_size"], r["seq_len"]) == (8, 64)
    assert r["ms_p10"] <= r["ms_per_iter"] <= r["ms_p90"]
    # 20 AdamW steps on real bytes take the loss well below a uniform guess over the vocabulary
    assert r["final_loss"] < np.log(257) - 1.0
    assert "ms/iter" in proc.stdout


def test_bench_plain_refuses_sparse_schedules():
    proc = run_cli("gpt_jax.bench_plain", *TINY, "--iters", "1")
    assert_one_line_error(proc, "dense attention only")
