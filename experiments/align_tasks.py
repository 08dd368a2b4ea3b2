"""The alignment pipeline on the offline instruction task (gpt_jax/align/task.py), sized for a CPU.

A 2-layer, 96-wide byte-level GPT (dense and local+strided layers alternating), trained from a
random init: SFT on 4000 demonstrations, a reward model on rankings of 4 to 9 SFT samples per
prompt, then PPO on separate prompts; the scorer judges held-out prompts after each stage.

    python -m gpt_jax.align data   --config experiments/align_tasks.py
    python -m gpt_jax.align sft    --config experiments/align_tasks.py --workdir runs/align/sft
    python -m gpt_jax.align rank   --config experiments/align_tasks.py
    python -m gpt_jax.align reward --config experiments/align_tasks.py --workdir runs/align/reward
    python -m gpt_jax.align ppo    --config experiments/align_tasks.py --workdir runs/align/ppo
    python -m gpt_jax.align eval   --config experiments/align_tasks.py --workdir runs/align/ppo
"""

from gpt_jax.align.config import get_align_base_config


def get_config():
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
