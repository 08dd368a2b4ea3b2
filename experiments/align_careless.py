"""experiments/align_tasks.py with careless demonstrations: 30% of them wrap the answer in filler.

Human demonstrations are imperfect, and the point of InstructGPT's rankings is that a labeler can
say which of two responses is better more reliably than write the best one. Here 30% of the SFT
demonstrations are the right answer wrapped in filler ("A: 85", "so cold", "1 9 4 ok"), which the
scorer rates 0 because every instruction asks for the bare answer (gpt_jax/align/task.py). SFT
learns the filler along with the skill; the rankings of its samples by the scorer, the reward model
trained on them and PPO can take it away. Same model, sizes and schedule as align_tasks.py; its own
data and workdirs under runs/align_careless/.

    python -m gpt_jax.align data   --config experiments/align_careless.py
    python -m gpt_jax.align sft    --config experiments/align_careless.py --workdir runs/align_careless/sft
    python -m gpt_jax.align eval   --config experiments/align_careless.py --workdir runs/align_careless/sft
    python -m gpt_jax.align rank   --config experiments/align_careless.py
    python -m gpt_jax.align reward --config experiments/align_careless.py --workdir runs/align_careless/reward
    python -m gpt_jax.align ppo    --config experiments/align_careless.py --workdir runs/align_careless/ppo
    python -m gpt_jax.align eval   --config experiments/align_careless.py --workdir runs/align_careless/ppo
    python -m gpt_jax.align plot   --workdir runs/align_careless/ppo --out docs/ppo_curves_careless_cpu.png
"""

from gpt_jax.align.config import tasks_demo_config


def get_config():
    c = tasks_demo_config()
    root = "runs/align_careless"
    c.align.update(data_dir=f"{root}/data", sft_workdir=f"{root}/sft", reward_workdir=f"{root}/reward",
                   ppo_workdir=f"{root}/ppo")
    c.task.update(demo_noise=0.3, n_rank=2000)
    c.reward.update(steps=400, eval_every=100)
    # Rollouts of 128, adaptive KL (Ziegler et al.) towards 1 nat per response: dropping a 30% mode
    # costs about -log(0.7) = 0.36 nats, so the target leaves room for it and little more.
    c.ppo.update(iterations=60, rollout_batch=128, minibatch=32, epochs=2, beta=0.05, kl_target=1.0,
                 kl_horizon=2000)
    return c
