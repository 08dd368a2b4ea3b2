"""experiments/align_tasks.py with a larger ranking set and a longer reward-model run (CPU; reuses its SFT).

Same model, task and SFT checkpoint (runs/align/sft); its own data dir and workdirs under runs/align2/.
The defaults here differ from align_tasks.py only in task.n_rank (2000 instead of 600) and
reward.steps (400 instead of 250); the PPO settings tried on top of it (bigger ranking set, larger
rollout batches, adaptive KL, lambda 1.0) are passed as --config.<key>=<value> overrides, listed
with their results in runs/align2/demo.sh.

    python -m gpt_jax.align data   --config experiments/align_tasks_cpu.py
    python -m gpt_jax.align rank   --config experiments/align_tasks_cpu.py
    python -m gpt_jax.align reward --config experiments/align_tasks_cpu.py --workdir runs/align2/reward
    python -m gpt_jax.align ppo    --config experiments/align_tasks_cpu.py --workdir runs/align2/ppo
    python -m gpt_jax.align eval   --config experiments/align_tasks_cpu.py --workdir runs/align2/ppo
"""

from gpt_jax.align.config import get_align_base_config


def get_config():
    c = get_align_base_config()
    # experiments/align_tasks.py, unchanged: model, task, SFT.
    c.model.update(block_size=64, n_layer=2, n_head=4, n_embd=96, vocab_multiple=64)
    c.attention.update(schedule=("dense", "local_strided"), window=16, stride=16)
    c.data.update(tokenizer="byte")
    c.task.update(n_sft=4000, n_rank=600, n_ppo=2000, n_eval=300, max_operand=20)
    c.sft.update(steps=800, batch_size=32, lr=2e-3, warmup_steps=50, ckpt_every=200)
    c.rank.update(k_min=4, k_max=9, samples=12)
    c.reward.update(steps=250, batch_size=8, lr=3e-4, warmup_steps=20, eval_every=50)
    c.ppo.update(iterations=40, rollout_batch=64, minibatch=16, epochs=4, beta=0.02, lr=2e-5, value_lr=1e-4)
    # What differs.
    c.align.update(data_dir="runs/align2/data", sft_workdir="runs/align/sft", reward_workdir="runs/align2/reward",
                   ppo_workdir="runs/align2/ppo")
    c.task.update(n_rank=2000)
    c.reward.update(steps=400, eval_every=100)
    return c
