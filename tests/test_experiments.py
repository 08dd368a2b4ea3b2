"""Every experiment config parses, names only keys the base config has, and builds its model."""

import glob
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from conftest import REPO
from gpt_jax.config import get_base_config
from gpt_jax.model import GPT, GPTConfig, count_params

EXPERIMENTS = sorted(glob.glob(os.path.join(REPO, "experiments", "*.py")))


def load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def flat_keys(d, prefix=""):
    keys = set()
    for k, v in d.items():
        keys |= flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return keys


def test_the_required_experiments_exist():
    names = {os.path.basename(p)[:-3] for p in EXPERIMENTS}
    assert {"default", "shakespeare_char", "gpt3_small", "gpt3_small_sparse", "long_context_sparse"} <= names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: os.path.basename(p))
def test_experiment_builds_its_model_abstractly(path):
    cfg = load(path)
    if os.path.basename(path).startswith("align_"):
        from gpt_jax.align.config import get_align_base_config as base
    else:
        base = get_base_config
    assert flat_keys(cfg.to_dict()) <= flat_keys(base().to_dict()), "a key the base config lacks"
    model_cfg = GPTConfig.from_config(cfg, vocab_size=257)
    model_cfg.validate()
    tokens = jax.ShapeDtypeStruct((1, model_cfg.block_size), jnp.int32)
    params = jax.eval_shape(lambda t: GPT(model_cfg).init(jax.random.key(0), t), tokens)
    assert count_params(nn.unbox(params["params"])) > 0
    assert cfg.train.batch_size % cfg.train.grad_accum == 0


def test_long_context_and_sparse_configs_are_what_they_claim():
    long_cfg = GPTConfig.from_config(load(os.path.join(REPO, "experiments", "long_context_sparse.py")))
    assert long_cfg.block_size >= 8192
    assert {p.kind for p in long_cfg.patterns} == {"dense", "local_strided"}
    sparse = GPTConfig.from_config(load(os.path.join(REPO, "experiments", "gpt3_small_sparse.py")))
    assert [p.kind for p in sparse.patterns] == ["dense", "local_strided"] * 6
    assert sparse.block_size == 2048


def test_shakespeare_char_is_nanogpts_config():
    c = load(os.path.join(REPO, "experiments", "shakespeare_char.py"))
    assert (c.model.n_layer, c.model.n_head, c.model.n_embd, c.model.block_size) == (6, 6, 384, 256)
    assert (c.model.dropout, c.model.attn_dropout, c.model.use_bias, c.data.tokenizer) == (0.2, 0.2, False, "char")
    assert (c.train.batch_size, c.train.lr, c.train.steps, c.train.warmup_steps) == (64, 1e-3, 5000, 100)
    assert (c.train.b2, c.train.lr * c.train.min_lr_ratio) == (0.99, pytest.approx(1e-4))
