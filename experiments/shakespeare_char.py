"""nanoGPT's config/train_shakespeare_char.py, key for key (data from --config.data.path).

nanoGPT: 6 layers, 6 heads, 384 wide, block 256, batch 64, dropout 0.2 (attention
probabilities too: nanoGPT's attn_dropout), no biases, lr 1e-3 with
100 warmup iterations and cosine decay to 1e-4 over 5000 iterations, AdamW betas (0.9, 0.99),
weight decay 0.1, clip 1.0, evaluation every 250 iterations over 200 batches.

    python -m gpt_jax.train --config experiments/shakespeare_char.py --workdir runs/shakespeare \
        --config.data.path=../shared/data/tinyshakespeare.txt
"""

from gpt_jax.config import get_base_config


def get_config():
    c = get_base_config()
    c.model.update(block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2, attn_dropout=0.2,
                   use_bias=False)
    c.attention.update(schedule=("dense",))
    c.data.update(path="", tokenizer="char")
    c.train.update(steps=5000, batch_size=64, lr=1e-3, min_lr_ratio=0.1, warmup_steps=100, b2=0.99,
                   weight_decay=0.1, grad_clip=1.0, log_every=10, eval_every=250, eval_batches=200,
                   ckpt_every=1000, sample_tokens=500)
    return c
