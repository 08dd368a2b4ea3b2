"""Stage 2: the reward model, trained on rankings of K responses per prompt (InstructGPT's loss).

The backbone starts from the SFT checkpoint (align.sft_workdir) and a fresh scalar head reads the
final token. Each batch element is one prompt with all of its K-choose-2 pairs. After training the
head's bias is shifted so the demonstrations' rewards average 0, and the pairwise accuracy on
held-out prompts (a seeded share of the rankings, reward.val_fraction) is reported.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax import sharding as shd
from gpt_jax.errors import UserError
from gpt_jax.metrics import MetricsWriter
from gpt_jax.model import count_params
from gpt_jax.optim import make_optimizer

from gpt_jax.align import common
from gpt_jax.align.config import optimizer_config
from gpt_jax.align.data import batch_indices, load_demos, load_rankings, pad_sequences, ranking_arrays, sequence
from gpt_jax.align.losses import masked_mean, pairwise_loss
from gpt_jax.align.models import AlignTrainer, ScalarHeadGPT

EVAL_FILE = "reward_eval.json"


def _rewards(trainer, params, batch, dropout_key=None):
    """batch tokens [B, K, T], last [B, K] -> the scalar read at each sequence's last token [B, K]."""
    tokens = batch["tokens"]
    b, k, t = tokens.shape
    values = trainer.apply(params, tokens.reshape(b * k, t), dropout_key=dropout_key)
    return jnp.take_along_axis(values, batch["last"].reshape(b * k, 1), axis=1).reshape(b, k)


def reward_loss(trainer, params, batch, dropout_key):
    r = _rewards(trainer, params, batch, dropout_key)
    loss, accuracy, _ = pairwise_loss(r, batch["valid"])
    return loss, {"accuracy": accuracy, "reward_mean": masked_mean(r, batch["valid"])}


def _batches(arrays: dict, batch_size: int):
    """Consecutive batches, the last padded with rows whose slots are all invalid."""
    n = len(next(iter(arrays.values())))
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        real = idx < n
        batch = {k: v[np.minimum(idx, n - 1)] for k, v in arrays.items()}
        if "valid" in batch:
            batch["valid"] = batch["valid"] & real[:, None]
        yield batch, int(real.sum())


def score_all(rewards_fn, arrays: dict, batch_size: int, sharding) -> np.ndarray:
    """Rewards [n, K] for every row of `arrays` (tokens [n, K, T], last [n, K])."""
    out = []
    for batch, n_real in _batches(arrays, batch_size):
        out.append(np.asarray(rewards_fn(jax.device_put(batch, sharding)))[:n_real])
    return np.concatenate(out)


def pairwise_accuracy(rewards: np.ndarray, valid: np.ndarray, scores=None) -> dict:
    """Share of pairs (i better than j, i < j) with r_i > r_j; with the labeler's scores also the
    share among strictly ordered pairs (random tie-breaks excluded), the ceiling being 1."""
    hits = strict_hits = pairs = strict = 0
    for i_row, (r, v) in enumerate(zip(rewards, valid)):
        k = int(v.sum())
        for i in range(k):
            for j in range(i + 1, k):
                pairs += 1
                hits += r[i] > r[j]
                if scores is not None and scores[i_row] is not None and scores[i_row][i] > scores[i_row][j]:
                    strict += 1
                    strict_hits += r[i] > r[j]
    out = {"pairwise_accuracy": hits / max(pairs, 1), "pairs": pairs}
    if strict:
        out.update(strict_pairwise_accuracy=strict_hits / strict, strict_pairs=strict)
    return out


def run_reward(config, workdir: str, *, stop_at_step: int | None = None) -> common.StageResult:
    c = config.reward
    sft_dir = config.align.sft_workdir
    tok = common.tokenizer_of(sft_dir, "align.sft_workdir")
    rankings = load_rankings(common.data_path(config, "rank_data"), c.max_k)
    demos = load_demos(common.data_path(config, "sft_data"))
    model_cfg, signature = common.model_config(config, tok)
    mesh = common.make_mesh(config)
    shd.check_batch(c.batch_size, c.grad_accum, mesh)
    stage_dir = common.check_stage_dir(workdir, "reward", signature, c.keep_checkpoints)

    order = np.random.default_rng((config.seed, 11)).permutation(len(rankings))
    n_val = int(round(len(rankings) * c.val_fraction))
    if c.val_fraction > 0 and (n_val < 1 or n_val >= len(rankings)):
        raise UserError(f"reward.val_fraction={c.val_fraction} leaves no train or no held-out prompts "
                               f"out of {len(rankings)} rankings")
    val = [rankings[i] for i in order[:n_val]]
    train = [rankings[i] for i in order[n_val:]]
    train_arrays = ranking_arrays(tok, train, model_cfg.block_size, c.max_k)
    val_arrays = ranking_arrays(tok, val, model_cfg.block_size, c.max_k) if val else None
    demo_tokens, demo_last = pad_sequences([sequence(tok, p, r) for p, r in demos[:c.bias_demos]],
                                           model_cfg.block_size, tok.eot_id, "demonstration")

    trainer = AlignTrainer(ScalarHeadGPT(model_cfg), make_optimizer(optimizer_config(c, c.steps)), mesh,
                           config.sharding_rules, reward_loss, grad_accum=c.grad_accum)
    if stage_dir.latest is not None:
        checkpointer, state = stage_dir.resume(config, tok, trainer.abstract_state)
    else:
        gpt_abstract, _ = common.abstract_states(config, model_cfg, mesh)
        sft, _ = common.restore_previous(sft_dir, "align.sft_workdir", ("sft",), signature, gpt_abstract)
        fresh = trainer.init_state(jax.random.key(config.seed))
        state = trainer.state_from_params({"gpt": sft.params, "head": fresh.params["head"]})
        del fresh
        checkpointer = stage_dir.create(config, tok)
    start = int(state.step)
    k_counts = train_arrays["valid"].sum(1)
    common.log(f"reward: {len(train)} train and {len(val)} held-out rankings (K from {k_counts.min()} to "
               f"{k_counts.max()}, {int((k_counts * (k_counts - 1) // 2).sum())} train pairs); "
               f"model {count_params(state.params) / 1e6:.2f}M parameters")

    rewards_fn = trainer.jit_forward(lambda tr, p, b: _rewards(tr, p, b))
    writer = MetricsWriter(workdir)

    def batch_at(step):
        rows = batch_indices(len(train), c.batch_size, config.seed, step)
        return jax.device_put({k: v[rows] for k, v in train_arrays.items()}, trainer.batch_sharding)

    def held_out(params) -> dict:
        if val_arrays is None:
            return {}
        r = score_all(lambda b: rewards_fn(params, b), {"tokens": val_arrays["tokens"], "last": val_arrays["last"]},
                      c.batch_size, trainer.batch_sharding)
        return pairwise_accuracy(r, val_arrays["valid"], [s for _, _, s in val])

    def every(step, state):
        if c.eval_every and step % c.eval_every == 0 and step < c.steps and val_arrays is not None:
            result = held_out(state.params)
            writer.write(step, "reward_val", result)
            common.log(f"reward step {step}: held-out pairwise accuracy {result['pairwise_accuracy']:.3f}")

    meta = {"model_signature": signature, "stage": "reward"}

    def save(step, state, **extra):
        checkpointer.save(step, state, {**meta, "data": {"next_step": step}, **extra})

    try:
        state, step, interrupted = common.run_steps(
            name="reward", trainer=trainer, state=state, start=start, steps=c.steps, batch_at=batch_at,
            writer=writer, log_every=c.log_every, ckpt_every=c.ckpt_every, save=save, seed=config.seed,
            stop_at_step=stop_at_step, every=every)
        result = {}
        if not interrupted and "bias_shift" not in (stage_dir.meta or {}):
            # Demonstrations laid out as [n / max_k, max_k, T]: the shape already compiled for held-out scoring.
            rows = np.arange(len(demo_tokens) - len(demo_tokens) % -c.max_k) % len(demo_tokens)
            demo = {"tokens": demo_tokens[rows].reshape(-1, c.max_k, demo_tokens.shape[1]),
                    "last": demo_last[rows].reshape(-1, c.max_k)}
            demo_r = score_all(lambda b: rewards_fn(state.params, b), demo, c.batch_size,
                               trainer.batch_sharding).reshape(-1)[:len(demo_tokens)]
            shift = float(demo_r.mean())
            params = dict(state.params, head=dict(state.params["head"], bias=state.params["head"]["bias"] - shift))
            state = state.replace(params=params)
            result = {"bias_shift": shift, **held_out(state.params)}
            writer.write(step, "reward_val", result)
            common.log(f"reward: bias shifted by {-shift:+.4f} so the {len(demo_tokens)} demonstrations average 0; "
                       + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
            save(step, state, **result)
            if jax.process_index() == 0:
                with open(os.path.join(workdir, EVAL_FILE), "w") as f:
                    json.dump({"step": step, "held_out_rankings": len(val), **result}, f, indent=2)
        checkpointer.wait()
    finally:
        writer.close()
        checkpointer.close()
    return common.StageResult(step=step, interrupted=interrupted, workdir=workdir, metrics=result)
