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

from gpt_jax.align.config import tasks_demo_config


def get_config():
    c = tasks_demo_config()  # experiments/align_tasks.py: same model, task and SFT
    c.align.update(data_dir="runs/align2/data", reward_workdir="runs/align2/reward", ppo_workdir="runs/align2/ppo")
    c.task.update(n_rank=2000)
    c.reward.update(steps=400, eval_every=100)
    return c
