"""The few-shot demo: a small byte-level GPT on the standard library mixed with generated arithmetic
worksheets ("Q: What is 48 plus 76? A: 124", one problem per line; the evaluated problems are held out),
then scored 0-, 1- and few-shot with gpt_jax.evaluate. 1200 steps took 25 minutes on 2 shared CPU
cores; at this size and length it learns the format but not the arithmetic (BENCHMARKS.md).

    python -m gpt_jax.train --config experiments/arith_fewshot.py --workdir runs/arith
    python -m gpt_jax.evaluate --workdir runs/arith --task add2,sub2,add3,sub3,mul2 --shots 0,1,4
"""

from gpt_jax.config import get_base_config


def get_config():
    c = get_base_config()
    c.model.update(block_size=192, n_layer=4, n_head=4, n_embd=128, vocab_multiple=64)
    c.attention.update(schedule=("dense", "local_strided"), window=32, stride=32)
    c.data.update(mixture="stdlib:0.3,arith:0.7", tokenizer="byte")
    c.train.update(steps=1200, batch_size=16, lr=3e-3, warmup_steps=100, log_every=50, eval_every=500,
                   eval_batches=5, ckpt_every=250, sample_tokens=0)
    return c
