"""GPT-3 Small with GPT-3's own attention: "alternating dense and locally banded sparse attention
patterns in the layers of the transformer, similar to the Sparse Transformer". The sparse layers
are local+strided with window = stride = 256 over context 2048.
"""

from gpt_jax.gpt3 import gpt3_config


def get_config():
    c = gpt3_config("small", sparse=True)
    c.train.update(grad_accum=4)
    return c
