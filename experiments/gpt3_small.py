"""GPT-3 Small (Table 2.1): 125,226,240 parameters, 12 layers, 768 wide, 12 heads, context 2048,
batch 0.5M tokens (244 x 2048), lr 6e-4, dense attention in every layer.

The vocabulary is 50257 as in the paper; our BPE tokenizer is trained on your data with up to
that many tokens. Raise train.grad_accum when the batch does not fit in memory.
"""

from gpt_jax.gpt3 import gpt3_config


def get_config():
    c = gpt3_config("small")
    c.train.update(grad_accum=4)
    return c
