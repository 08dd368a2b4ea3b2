"""The base config of the alignment stages: the pretraining base config plus the `align`, `task`,
`sft`, `rank`, `reward`, `ppo` and `eval` sections. experiments/align_*.py start from it.

The model, attention, data (tokenizer) and mesh sections mean what they mean for pretraining; every
stage builds the same model shape, and a checkpoint of another shape is refused.
"""

from __future__ import annotations

import ml_collections

from gpt_jax.config import get_base_config


def _optimizer(**overrides) -> dict:
    """The GPT-3 optimizer recipe's keys (gpt_jax.optim reads them); `steps` is set by each stage."""
    d = dict(lr=1e-4, min_lr_ratio=0.1, warmup_steps=0, decay_steps=0, b1=0.9, b2=0.95, eps=1e-8,
             weight_decay=0.1, grad_clip=1.0)
    d.update(overrides)
    return d


def get_align_base_config() -> ml_collections.ConfigDict:
    c = get_base_config()
    c.align = ml_collections.ConfigDict(dict(
        data_dir="runs/align/data",      # `data` writes the task files here; the stages read them from here
        sft_data="",                     # JSONL {"prompt", "response"}; "" = <data_dir>/sft.jsonl
        rank_prompts="",                 # JSONL {"prompt"} that `rank` samples for; "" = <data_dir>/rank_prompts.jsonl
        rank_data="",                    # JSONL {"prompt", "responses": [best first]}; "" = <data_dir>/rankings.jsonl
        ppo_prompts="",                  # JSONL {"prompt"}; "" = <data_dir>/ppo_prompts.jsonl
        eval_prompts="",                 # JSONL {"prompt"}; "" = <data_dir>/eval_prompts.jsonl
        init_workdir="",                 # a gpt_jax.train workdir SFT starts from; "" = a fresh random model
        sft_workdir="runs/align/sft",    # read by rank, reward (backbone) and ppo (policy and reference)
        reward_workdir="runs/align/reward",  # read by ppo (reward model and value initialization)
        ppo_workdir="runs/align/ppo",    # the default --workdir of `ppo`
    ))
    c.task = ml_collections.ConfigDict(dict(
        seed=0, families="arith,reverse,word", n_sft=4000, n_rank=1000, n_ppo=2000, n_eval=300,
        eval_fraction=0.1,               # share of arithmetic/reverse prompts held out for evaluation
        max_operand=99,
        demo_noise=0.0,                  # share of SFT demonstrations wrapped in filler the scorer rejects
    ))
    c.sft = ml_collections.ConfigDict(dict(
        steps=1000, batch_size=32, grad_accum=1, pack=True, log_every=10, ckpt_every=250, keep_checkpoints=2,
        **_optimizer(lr=1e-3, warmup_steps=50),
    ))
    c.rank = ml_collections.ConfigDict(dict(
        k_min=4, k_max=9,                # responses per prompt: uniform in [k_min, k_max] (InstructGPT: 4 to 9)
        samples=16,                      # draws per prompt; the distinct ones are kept, then k of them
        temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=16, batch_size=128,
    ))
    c.reward = ml_collections.ConfigDict(dict(
        steps=500, batch_size=8,          # prompts per step; each carries its K responses
        grad_accum=1, max_k=9, val_fraction=0.1, log_every=10, ckpt_every=250, keep_checkpoints=2,
        eval_every=100, bias_demos=512,   # demonstrations used to center the reward at 0
        **_optimizer(lr=3e-4, warmup_steps=20),
    ))
    c.ppo = ml_collections.ConfigDict(dict(
        iterations=100,                  # rollout batches
        rollout_batch=64, minibatch=16, epochs=4,
        temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=16,
        beta=0.02,                       # KL coefficient (the start value when adaptive)
        kl_target=0.0,                   # > 0: Ziegler et al.'s adaptive controller with this target KL (nats/seq)
        kl_horizon=10000,
        gamma=1.0, lam=0.95, clip=0.2, value_clip=0.2, whiten_advantages=True,
        ptx_coef=0.0,                    # PPO-ptx: weight of the pretraining loss on `data` (0 = off)
        ptx_batch=8,
        value_lr=1e-4,
        log_every=1, ckpt_every=20, keep_checkpoints=2,
        **_optimizer(lr=2e-5, min_lr_ratio=1.0, weight_decay=0.0),
    ))
    c.eval = ml_collections.ConfigDict(dict(temperature=1.0, batch_size=128, max_new_tokens=16, seed=1234))
    return c


def optimizer_config(section, steps: int) -> ml_collections.ConfigDict:
    """What gpt_jax.optim.make_optimizer reads, from a stage section and its number of updates."""
    keys = _optimizer().keys()
    d = {k: section[k] for k in keys}
    return ml_collections.ConfigDict(dict(d, steps=max(int(steps), 1)))


def tasks_demo_config() -> ml_collections.ConfigDict:
    """The CPU-sized demo on the offline instruction task (experiments/align_tasks*.py start here):
    a 2-layer, 96-wide byte-level GPT, dense and local+strided layers alternating, from random init."""
    c = get_align_base_config()
    c.model.update(block_size=64, n_layer=2, n_head=4, n_embd=96, vocab_multiple=64)
    c.attention.update(schedule=("dense", "local_strided"), window=16, stride=16)
    c.data.update(tokenizer="byte")
    c.align.update(data_dir="runs/align/data", sft_workdir="runs/align/sft", reward_workdir="runs/align/reward",
                   ppo_workdir="runs/align/ppo")
    c.task.update(n_sft=4000, n_rank=600, n_ppo=2000, n_eval=300, max_operand=20)
    c.sft.update(steps=800, batch_size=32, lr=2e-3, warmup_steps=50, ckpt_every=200)
    c.rank.update(k_min=4, k_max=9, samples=12)
    c.reward.update(steps=250, batch_size=8, lr=3e-4, warmup_steps=20, eval_every=50)
    c.ppo.update(iterations=40, rollout_batch=64, minibatch=16, epochs=4, beta=0.02, lr=2e-5, value_lr=1e-4)
    return c
