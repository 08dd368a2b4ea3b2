"""Word-scrambling few-shot run on CPU: a small byte-level GPT (0.66M params, 1800 steps, 14 minutes
on 2 shared CPU cores) on the standard library, the generated arithmetic worksheets and generated
blocks of word-scrambling examples (`wordtasks`: 1-8 solved examples of one of reversed_words /
random_insertion / cycle_letters per document, laid out as the evaluator's K-shot prompts, over the
non-held-out words only), then scored 0-, 1- and 3-shot. It learns the skills on held-out words
(random_insertion 0.90, reversed_words 0.27-0.33 zero-shot) but few-shot does not beat zero-shot:
the input already tells which transform is wanted (BENCHMARKS.md).

    python -m gpt_jax.train --config experiments/fewshot_demo.py --workdir runs/fewshot
    python -m gpt_jax.evaluate --workdir runs/fewshot --task reversed_words,random_insertion,cycle_letters \
        --shots 0,1,3 --n 100
"""

from gpt_jax.config import get_base_config


def get_config():
    c = get_base_config()
    c.model.update(block_size=192, n_layer=3, n_head=4, n_embd=128, vocab_multiple=64)
    c.data.update(mixture="stdlib:0.05,arith:0.05,wordtasks:0.9", tokenizer="byte")
    c.train.update(steps=1800, batch_size=16, lr=3e-3, warmup_steps=100, log_every=50, eval_every=600,
                   eval_batches=3, ckpt_every=300, sample_tokens=0)
    return c
