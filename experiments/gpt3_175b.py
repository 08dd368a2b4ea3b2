"""GPT-3 175B (Table 2.1; the appendix counts its parameters): context 2048, vocabulary 50257,
dense attention in every layer, the paper's learning rate and batch size (gpt_jax/gpt3.py).

grad_accum splits the batch into micro-batches; see `python -m gpt_jax.plan --config <this file>
--mesh data=...,fsdp=...,tensor=...` for the memory a mesh needs before choosing one.
"""

from gpt_jax.gpt3 import gpt3_config


def get_config():
    c = gpt3_config("175b")
    # 3.2M tokens is 1562.5 sequences; 1536 (3.1M tokens) splits evenly over power-of-two meshes.
    c.train.update(batch_size=1536, grad_accum=2)
    return c
