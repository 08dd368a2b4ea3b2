"""The InstructGPT recipe on gpt-jax: supervised fine-tuning, a reward model on ranked responses, and
PPO with a per-token KL penalty to the SFT model, plus an offline task whose scorer plays the labeler.

    python -m gpt_jax.align {data|sft|rank|reward|ppo|eval|plot} --config experiments/align_tasks.py ...

Modules: task (generator and scorer), data (JSONL and token layouts), losses (pure functions),
models (scalar-head GPT, trainer), rollout (batched sampling with gpt_jax.generate), sft, rank,
reward, ppo, evaluate, cli.
"""
