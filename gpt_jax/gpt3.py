"""The GPT-3 model family (Brown et al. 2020, Table 2.1) as configs.

Every size has context 2048 and vocabulary 50257. Two fixes to the table: 13B's width is 5120
(5140 is a typo: 40 heads x 128), and XL uses 16 heads of 128 so that heads x head_dim = width.
"""

from __future__ import annotations

from gpt_jax.config import get_base_config

# name: (n_layer, n_embd, n_head, batch size in tokens, learning rate)
TABLE_2_1 = {
    "small": (12, 768, 12, 0.5e6, 6.0e-4),
    "medium": (24, 1024, 16, 0.5e6, 3.0e-4),
    "large": (24, 1536, 16, 0.5e6, 2.5e-4),
    "xl": (24, 2048, 16, 1e6, 2.0e-4),
    "2_7b": (32, 2560, 32, 1e6, 1.6e-4),
    "6_7b": (32, 4096, 32, 2e6, 1.2e-4),
    "13b": (40, 5120, 40, 2e6, 1.0e-4),
    "175b": (96, 12288, 96, 3.2e6, 0.6e-4),
}
CONTEXT = 2048
VOCAB = 50257
WARMUP_TOKENS = 375e6


def gpt3_config(size: str, *, sparse: bool = False):
    """A GPT-3 config; `sparse` alternates dense and local+strided layers (window = stride = 256)."""
    n_layer, n_embd, n_head, batch_tokens, lr = TABLE_2_1[size]
    c = get_base_config()
    c.model.update(vocab_size=VOCAB, block_size=CONTEXT, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                   dtype="bfloat16")
    if sparse:
        c.attention.update(schedule=("dense", "local_strided"), window=256, stride=256)
    batch = int(batch_tokens // CONTEXT)
    c.data.update(tokenizer="bpe", bpe_vocab_size=VOCAB)
    # The paper decays over 260B tokens; a research budget shortens steps (decay follows them).
    c.train.update(steps=20000, batch_size=batch, lr=lr, warmup_steps=int(WARMUP_TOKENS // (batch * CONTEXT)),
                   log_every=10, eval_every=500, eval_batches=20, ckpt_every=500)
    return c
