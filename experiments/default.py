"""The embedded-default run: a small GPT on the interpreter's own standard library, byte-level.

Sized for a few minutes on a laptop CPU; layers alternate dense and local+strided as in GPT-3.
"""

from gpt_jax.config import get_base_config


def get_config():
    c = get_base_config()
    c.model.update(block_size=256, n_layer=4, n_head=4, n_embd=256, vocab_multiple=64)
    c.attention.update(schedule=("dense", "local_strided"), window=64, stride=64)
    c.data.update(path="", tokenizer="byte")
    c.train.update(steps=300, batch_size=16, lr=2e-3, warmup_steps=30, log_every=10, eval_every=100,
                   eval_batches=10, ckpt_every=100)
    return c
