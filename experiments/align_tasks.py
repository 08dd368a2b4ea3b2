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

from gpt_jax.align.config import tasks_demo_config


def get_config():
    return tasks_demo_config()
