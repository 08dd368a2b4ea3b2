"""End-to-end training on the embedded corpus: it learns, and a stopped run resumes exactly."""

import numpy as np
import pytest

from conftest import tiny_config
from gpt_jax.data import build_dataset
from gpt_jax.metrics import read_metrics
from gpt_jax.train import run


def unigram_entropy_nats(tokens: np.ndarray) -> float:
    counts = np.bincount(np.asarray(tokens))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_tiny_model_learns_beyond_unigram_statistics(tmp_path):
    cfg = tiny_config(train=dict(steps=300, batch_size=16, lr=3e-3, warmup_steps=20, log_every=50,
                                 eval_every=300, eval_batches=8))
    result = run(cfg, str(tmp_path), progress=False)
    # The baseline: the best loss a model that ignores context can reach on this data.
    dataset = build_dataset(cfg.data, str(tmp_path), cfg.seed)
    baseline = unigram_entropy_nats(dataset.sources[0].train)
    assert result.val_loss < 0.8 * baseline, (result.val_loss, baseline)
    train = read_metrics(str(tmp_path), "train")
    assert train[-1]["loss"] < train[0]["loss"]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    cfg = tiny_config(train=dict(steps=12, ckpt_every=5), model=dict(dropout=0.1))
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run(cfg, straight, progress=False)
    first = run(cfg, resumed, stop_at_step=7, progress=False)
    assert first.interrupted and first.step == 7
    second = run(cfg, resumed, progress=False)
    assert second.step == 12 and not second.interrupted

    want = {r["step"]: r["loss"] for r in read_metrics(straight, "train")}
    got = {r["step"]: r["loss"] for r in read_metrics(resumed, "train")}
    assert sorted(got) == list(range(1, 13))
    for step in range(8, 13):  # the steps after the interruption, bit for bit
        assert got[step] == want[step], step


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    base = tiny_config(train=dict(steps=3, batch_size=8))
    accum = tiny_config(train=dict(steps=3, batch_size=8, grad_accum=4))
    run(base, str(tmp_path / "base"), progress=False)
    run(accum, str(tmp_path / "accum"), progress=False)
    a = [r["loss"] for r in read_metrics(str(tmp_path / "base"), "train")]
    b = [r["loss"] for r in read_metrics(str(tmp_path / "accum"), "train")]
    np.testing.assert_allclose(b, a, rtol=1e-5)


def test_remat_does_not_change_the_loss(tmp_path):
    run(tiny_config(train=dict(steps=2)), str(tmp_path / "plain"), progress=False)
    run(tiny_config(train=dict(steps=2), model=dict(remat="full")), str(tmp_path / "remat"), progress=False)
    a = [r["loss"] for r in read_metrics(str(tmp_path / "plain"), "train")]
    b = [r["loss"] for r in read_metrics(str(tmp_path / "remat"), "train")]
    np.testing.assert_allclose(b, a, rtol=1e-5)


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_other_tokenizers_train_from_a_file(tmp_path, tokenizer):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    cfg = tiny_config(data=dict(path=str(text), tokenizer=tokenizer, bpe_vocab_size=300),
                      train=dict(steps=40, log_every=1))
    run(cfg, str(tmp_path / "wd"), progress=False)
    losses = [r["loss"] for r in read_metrics(str(tmp_path / "wd"), "train")]
    assert losses[-1] < 0.5 * losses[0]


def test_weight_decay_moves_matrices_only():
    """GPT-3's AdamW decays embeddings and kernels, never biases or LayerNorm scales (the fused qkv
    bias is three-dimensional, so rank cannot tell): with zero gradients after warm-up, only the
    decay moves parameters, also with the optimizer state built from the boxed parameters."""
    import jax
    import jax.numpy as jnp

    from gpt_jax import sharding as shd
    from gpt_jax.model import GPT, GPTConfig
    from gpt_jax.optim import make_optimizer
    from gpt_jax.train_step import Trainer

    cfg = tiny_config(train=dict(warmup_steps=1, weight_decay=0.1))
    trainer = Trainer(GPT(GPTConfig.from_config(cfg, 64)), make_optimizer(cfg.train),
                      shd.make_mesh(dict(data=1, fsdp=1, tensor=1)), cfg.sharding_rules)
    state = trainer.init_state(jax.random.key(0))
    zero = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    ones = jax.tree_util.tree_map(jnp.ones_like, state.params)  # biases start at 0, where decay shows nothing
    opt_state = state.opt_state
    for _ in range(3):  # past the warm-up's zero learning rate
        updates, opt_state = trainer.tx.update(zero, opt_state, ones)
    moved = {jax.tree_util.keystr(p): bool(jnp.any(u != 0)) for p, u in jax.tree_util.tree_leaves_with_path(updates)}
    matrix = {k: not k.endswith(("['bias']", "['scale']")) for k in moved}
    assert moved == matrix
    assert moved["['h_0']['attn']['c_attn']['kernel']"] and moved["['wte']['embedding']"] and moved["['wpe']"]
    assert not moved["['h_0']['attn']['c_attn']['bias']"]  # [3, heads, head_dim]
