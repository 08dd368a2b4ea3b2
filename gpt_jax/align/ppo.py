"""Stage 3: PPO against the reward model with a per-token KL penalty to the SFT model.

As InstructGPT: the policy starts from SFT (align.sft_workdir), the value function from the reward
model (align.reward_workdir; a separate network with the same scalar head, read at every position),
and a frozen copy of SFT is the reference. Each iteration samples a rollout batch, scores it with
the reward model, forms per-token rewards (-beta * (log pi - log pi_ref), plus the score at the last
token), estimates advantages with GAE, and runs several epochs of minibatch updates of the clipped
policy objective (plus the optional PPO-ptx pretraining term) and the clipped value loss. Beta is
fixed or follows Ziegler et al.'s adaptive controller; its value is part of the checkpoint, and the
rollouts of iteration i depend only on (seed, i) and the parameters, so a resumed run is exact.
"""

from __future__ import annotations

import functools
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gpt_jax import sharding as shd
from gpt_jax.data import build_dataset
from gpt_jax.errors import UserError
from gpt_jax.metrics import MetricsWriter
from gpt_jax.model import GPT
from gpt_jax.optim import make_optimizer
from gpt_jax.train_step import cross_entropy

from gpt_jax.align import common, task
from gpt_jax.align.config import optimizer_config
from gpt_jax.align.data import encode_prompt, load_prompts
from gpt_jax.align.losses import KLController, gae, kl_penalized_rewards, policy_loss, token_logprobs
from gpt_jax.align.losses import value_loss, whiten
from gpt_jax.align.models import AlignTrainer, ScalarHeadGPT
from gpt_jax.align.rollout import generate


def _logp(trainer, params, batch, temperature: float):
    """log pi(response token t) [B, n], read at the position before each token (batch: seq [B, T],
    idx [B, n] = position of the logits predicting response token t, resp [B, n])."""
    logits = trainer.apply(params, batch["seq"])
    at = jnp.take_along_axis(logits, batch["idx"][:, :, None], axis=1)
    return token_logprobs(at.astype(jnp.float32) / temperature, batch["resp"])


def _values(trainer, params, batch):
    return jnp.take_along_axis(trainer.apply(params, batch["seq"]), batch["idx"], axis=1)


def _values_and_score(trainer, params, batch):
    """The scalar head read at each response token's preceding position (values [B, n]) and at the
    final token (the reward model's score [B]): one compiled pass for the value net and the RM."""
    out = trainer.apply(params, batch["seq"])
    return (jnp.take_along_axis(out, batch["idx"], axis=1),
            jnp.take_along_axis(out, batch["last"][:, None], axis=1)[:, 0])


def ppo_policy_loss(trainer, params, batch, dropout_key, *, clip, temperature, ptx_coef):
    del dropout_key  # no dropout in PPO: the ratio must compare the same function
    logp = _logp(trainer, params, batch, temperature)
    loss, clip_frac, approx_kl = policy_loss(logp, batch["old_logp"], batch["adv"], batch["mask"], clip)
    aux = {"policy_loss": loss, "clip_frac": clip_frac, "approx_kl": approx_kl}
    if ptx_coef > 0:
        ptx = cross_entropy(trainer.apply(params, batch["ptx"][:, :-1]), batch["ptx"][:, 1:])
        aux["ptx_loss"] = ptx
        loss = loss + ptx_coef * ptx
    return loss, aux


def ppo_value_loss(trainer, params, batch, dropout_key, *, clip):
    del dropout_key
    loss, clip_frac = value_loss(_values(trainer, params, batch), batch["old_values"], batch["returns"],
                                 batch["mask"], clip)
    return loss, {"value_loss": loss, "value_clip_frac": clip_frac}


@functools.partial(jax.jit, static_argnames=("gamma", "lam", "whiten_adv"))
def _advantages(score, old_logp, ref_logp, old_values, mask, lengths, beta, *, gamma, lam, whiten_adv):
    rewards, kl = kl_penalized_rewards(score, old_logp, ref_logp, mask, lengths, beta)
    adv, returns = gae(rewards, old_values, mask, gamma, lam)
    if whiten_adv:
        adv = whiten(adv, mask)
    return adv, returns, kl


@functools.lru_cache(maxsize=2)
def _engine(model_cfg, mesh, rules, policy_opt: tuple, value_opt: tuple, clip, value_clip, temperature, ptx_coef):
    """The policy and value trainers and the jitted inference passes, cached per setting so that a
    process running PPO again (a notebook, a test resuming a run) reuses the compiled functions."""
    policy = AlignTrainer(GPT(model_cfg), make_optimizer(ml_collections.ConfigDict(dict(policy_opt))), mesh, rules,
                          functools.partial(ppo_policy_loss, clip=clip, temperature=temperature, ptx_coef=ptx_coef))
    value = AlignTrainer(ScalarHeadGPT(model_cfg), make_optimizer(ml_collections.ConfigDict(dict(value_opt))), mesh,
                         rules, functools.partial(ppo_value_loss, clip=value_clip))
    logp_fn = policy.jit_forward(functools.partial(_logp, temperature=temperature))
    return policy, value, logp_fn, value.jit_forward(_values_and_score)


def assemble(prompts: list[list[int]], tokens: np.ndarray, lengths: np.ndarray, block_size: int, pad: int):
    """Rollout arrays: seq [B, T] (prompt, response, padding), idx [B, n] (the position whose logits
    predict response token t), resp [B, n], mask [B, n], last [B] (the final token's position)."""
    b, n = tokens.shape
    seq = np.full((b, block_size), pad, np.int32)
    idx = np.zeros((b, n), np.int32)
    for i, (p, length) in enumerate(zip(prompts, lengths)):
        seq[i, :len(p)] = p
        seq[i, len(p):len(p) + length] = tokens[i, :length]
        idx[i] = np.minimum(len(p) - 1 + np.arange(n), block_size - 1)
    mask = (np.arange(n)[None] < lengths[:, None]).astype(np.float32)
    resp = np.where(mask > 0, tokens, 0).astype(np.int32)
    last = np.array([len(p) + length - 1 for p, length in zip(prompts, lengths)], np.int32)
    return {"seq": seq, "idx": idx, "resp": resp, "mask": mask, "last": last}


def run_ppo(config, workdir: str, *, stop_at_iteration: int | None = None) -> common.StageResult:
    c = config.ppo
    sft_dir, rm_dir = config.align.sft_workdir, config.align.reward_workdir
    tok = common.tokenizer_of(sft_dir, "align.sft_workdir")
    prompt_texts = load_prompts(common.data_path(config, "ppo_prompts"))
    model_cfg, signature = common.model_config(config, tok)
    mesh = common.make_mesh(config)
    if c.rollout_batch % c.minibatch:
        raise UserError(f"ppo.rollout_batch={c.rollout_batch} is not a multiple of ppo.minibatch={c.minibatch}")
    shd.check_batch(c.minibatch, 1, mesh)
    if c.ptx_coef > 0:
        shd.check_batch(c.ptx_batch, 1, mesh)
    prompts = [encode_prompt(tok, p) for p in prompt_texts]
    too_long = [i for i, p in enumerate(prompts) if len(p) + c.max_new_tokens > model_cfg.block_size]
    if too_long:
        raise UserError(f"PPO prompt {too_long[0] + 1} has {len(prompts[too_long[0]])} tokens: with "
                        f"ppo.max_new_tokens={c.max_new_tokens} it exceeds model.block_size={model_cfg.block_size}")
    stage_dir = common.check_stage_dir(workdir, "ppo", signature, c.keep_checkpoints)
    gpt_abstract, head_abstract = common.abstract_states(config, model_cfg, mesh)
    # Both earlier stages are checked (existence, stage, model) before anything is written.
    sft, _ = common.restore_previous(sft_dir, "align.sft_workdir", ("sft",), signature, gpt_abstract)
    rm, rm_meta = common.restore_previous(rm_dir, "align.reward_workdir", ("reward",), signature, head_abstract)
    ref_params, rm_params = sft.params, rm.params

    n_updates = c.iterations * c.epochs * (c.rollout_batch // c.minibatch)
    value_opt = optimizer_config(c, n_updates)
    value_opt.lr = c.value_lr
    policy, value, logp_fn, head_fn = _engine(
        model_cfg, mesh, tuple(tuple(r) for r in config.sharding_rules),
        tuple(sorted(optimizer_config(c, n_updates).items())), tuple(sorted(value_opt.items())),
        float(c.clip), float(c.value_clip), float(c.temperature), float(c.ptx_coef))
    abstract = {"policy": policy.abstract_state, "value": value.abstract_state}
    if stage_dir.latest is not None:
        checkpointer, states = stage_dir.resume(config, tok, abstract, unit="iteration")
        kl_ctl = KLController(stage_dir.meta["kl_coef"], c.kl_target, c.kl_horizon)
    else:
        checkpointer = stage_dir.create(config, tok)
        states = {"policy": policy.state_from_params(sft.params), "value": value.state_from_params(rm.params)}
        kl_ctl = KLController(c.beta, c.kl_target, c.kl_horizon)
    del sft, rm
    ptx_data = build_dataset(config.data, workdir, config.seed) if c.ptx_coef > 0 else None
    common.log(f"ppo: {len(prompts)} prompts, {c.iterations} iterations of {c.rollout_batch} rollouts, "
               f"{c.epochs} epochs of minibatch {c.minibatch}; beta {kl_ctl.value:g}"
               f"{f' (adaptive, target KL {c.kl_target:g})' if c.kl_target > 0 else ' (fixed)'}; reward model "
               f"held-out accuracy {rm_meta.get('pairwise_accuracy', float('nan')):.3f}")

    sharding = policy.batch_sharding
    key = jax.random.key(config.seed + 2)
    writer = MetricsWriter(workdir)

    def save(it):
        checkpointer.save(it, states, {"model_signature": signature, "stage": "ppo", "kl_coef": kl_ctl.value,
                                       "data": {"next_step": it}, "sft_workdir": sft_dir, "reward_workdir": rm_dir})

    from gpt_jax.train import StopSignal

    it = int(stage_dir.latest or 0)
    interrupted = False
    last_metrics = {}
    try:
        with StopSignal() as stop:
            while it < c.iterations:
                t0 = time.perf_counter()
                rng = np.random.default_rng((config.seed, 13, it))
                pick = rng.choice(len(prompts), c.rollout_batch, replace=len(prompts) < c.rollout_batch)
                batch_prompts = [prompts[i] for i in pick]
                gen = generate(model_cfg, states["policy"].params, batch_prompts, max_new_tokens=c.max_new_tokens,
                               key=jax.random.fold_in(key, it), temperature=c.temperature, top_k=c.top_k,
                               top_p=c.top_p, stop_token=tok.eot_id)
                lengths = np.maximum(np.asarray(gen.lengths, np.int32), 1)
                roll = assemble(batch_prompts, np.asarray(gen.tokens), lengths, model_cfg.block_size, tok.eot_id)
                dev = jax.device_put(roll, sharding)
                old_logp = logp_fn(states["policy"].params, dev)
                ref_logp = logp_fn(ref_params, dev)
                old_values, _ = head_fn(states["value"].params, dev)
                _, score = head_fn(rm_params, dev)
                beta = kl_ctl.value
                adv, returns, kl = _advantages(score, old_logp, ref_logp, old_values, dev["mask"], jnp.asarray(lengths),
                                               beta, gamma=float(c.gamma), lam=float(c.lam),
                                               whiten_adv=bool(c.whiten_advantages))
                t_roll = time.perf_counter() - t0
                data = {**roll, "old_logp": old_logp, "ref_logp": ref_logp, "old_values": old_values, "adv": adv,
                        "returns": returns}
                data = {k: np.asarray(v) for k, v in data.items()}

                sums, count = {}, 0
                for epoch in range(c.epochs):
                    perm = np.random.default_rng((config.seed, 17, it, epoch)).permutation(c.rollout_batch)
                    for m, start_row in enumerate(range(0, c.rollout_batch, c.minibatch)):
                        rows = perm[start_row:start_row + c.minibatch]
                        mb = {k: v[rows] for k, v in data.items()}
                        if ptx_data is not None:
                            mb["ptx"] = ptx_data.train_batch(it * 10_000 + epoch * 100 + m, c.ptx_batch,
                                                             model_cfg.block_size)
                        mb = jax.device_put(mb, sharding)
                        states["policy"], pm = policy.train_step(states["policy"], mb, key)
                        states["value"], vm = value.train_step(states["value"], mb, key)
                        for k, v in {**pm, **vm}.items():
                            if k not in ("loss", "grad_norm"):
                                sums[k] = sums.get(k, 0.0) + v
                        count += 1
                kl_mean = float(np.mean(np.asarray(kl)))
                kl_ctl.update(kl_mean, c.rollout_batch)
                it += 1

                texts = [tok.decode([t for t in row[:n] if t != tok.eot_id]) for row, n in zip(roll["resp"], lengths)]
                task_scores = [task.score(prompt_texts[i], t) for i, t in zip(pick, texts)]
                task_scores = [s for s in task_scores if s is not None]
                score_np = np.asarray(score)
                metrics = {
                    "score": float(score_np.mean()), "reward": float(np.mean(score_np - beta * np.asarray(kl))),
                    "kl": kl_mean, "kl_coef": beta, "response_length": float(lengths.mean()),
                    "stopped": float(np.mean([tok.eot_id in row[:n] for row, n in zip(roll["resp"], lengths)])),
                    **{k: float(v) / count for k, v in jax.device_get(sums).items()},
                    "rollout_s": t_roll, "iteration_s": time.perf_counter() - t0,
                }
                if task_scores:
                    metrics["task_score"] = float(np.mean(task_scores))
                last_metrics = metrics
                writer.write(it, "ppo", metrics)
                if it % c.log_every == 0 or it == c.iterations:
                    shown = ("score", "reward", "kl", "kl_coef", "task_score", "policy_loss", "value_loss",
                             "clip_frac", "response_length", "iteration_s")
                    common.log(f"ppo iteration {it}/{c.iterations}: "
                               + " | ".join(f"{k} {metrics[k]:.4g}" for k in shown if k in metrics))
                if it == stop_at_iteration:
                    stop.signum = signal.SIGTERM
                if stop.signum is not None and it < c.iterations:
                    save(it)
                    interrupted = True
                    break
                if c.ckpt_every and it % c.ckpt_every == 0 and it < c.iterations:
                    save(it)
        if not interrupted and stage_dir.latest != c.iterations:
            save(it)
        checkpointer.wait()
    finally:
        writer.close()
        checkpointer.close()
    return common.StageResult(step=it, interrupted=interrupted, workdir=workdir, metrics=last_metrics)
