"""Long context: GPT-3 Small's shape over 8192 tokens, dense and local+strided layers alternating.
At this length a sparse layer computes 6.5% of the causal pairs (window = stride = 256), which is
where the Pallas kernels pay off; remat keeps the activations of 8K-token sequences in memory.
"""

from gpt_jax.gpt3 import gpt3_config


def get_config():
    c = gpt3_config("small", sparse=True)
    c.model.update(block_size=8192, remat="dots")
    c.train.update(batch_size=64, grad_accum=4, warmup_steps=715)
    return c
