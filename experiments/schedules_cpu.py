"""The Sparse Transformer's ways of using factorized attention, compared on CPU at one small size.

A 4-layer byte-level GPT on the standard library with context 256 and window = stride = 16, so a
local layer sees 1/16 of the context and a strided one the rest in a few hops. Only
attention.schedule changes between runs (BENCHMARKS.md has the table and the loop that ran it):

    dense                ("dense",)
    GPT-3                ("dense", "local_strided")   alternating layers
    merged heads         ("local_strided",)           every head attends to the union
    interleaved          ("local", "strided")         one factor per layer
    per-head             ("local/strided",)           half the heads local, half strided
    fixed                ("fixed",)                   blocks of 16, last 2 columns summarize
    local only           ("local",)                   no long-range path (the baseline)

    python -m gpt_jax.train --config experiments/schedules_cpu.py --workdir runs/sched_gpt3 \\
        "--config.attention.schedule=('dense','local_strided')"

Validation loss at step 600, mean of two seeds: fixed 1.792, merged 1.977, local only 2.030,
per-head 2.061, interleaved 2.071, GPT-3 2.076, dense 2.087 (5-6 min per run on 2 CPU cores).
"""

from gpt_jax.config import get_base_config


def get_config():
    c = get_base_config()
    c.model.update(block_size=256, n_layer=4, n_head=4, n_embd=128, vocab_multiple=64)
    c.attention.update(schedule=("dense", "local_strided"), window=16, stride=16, block=16, c=2)
    c.data.update(path="", tokenizer="byte")
    c.train.update(steps=600, batch_size=16, lr=2e-3, warmup_steps=60, log_every=50, eval_every=300,
                   eval_batches=40, ckpt_every=300)
    return c
