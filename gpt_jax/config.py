"""The base experiment config. Files in experiments/ start from it and change only what differs.

Every key a run can take lives here, so `--config.<key>=<value>` on the command line can reach it
and a misspelt key is an error rather than a silently ignored setting.
"""

from __future__ import annotations

import ml_collections

# Logical axis -> mesh axis rules (MaxText style: sharding is data, not code). Parameters use
# 'vocab', 'embed', 'heads', 'kv', 'mlp', 'qkv'; activations use the 'act_*' names so that
# 'embed' can be fully sharded over fsdp on weights while activations stay sharded over batch.
DEFAULT_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("qkv", None),
    ("positions", None),
)


def get_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict(dict(
        vocab_size=0,            # 0: take the tokenizer's vocabulary size
        vocab_multiple=1,        # pad the vocabulary up to a multiple of this (64 helps matmuls)
        block_size=256,          # context length
        n_layer=6,
        n_head=6,
        n_embd=384,
        mlp_ratio=4,
        dropout=0.0,             # on embeddings and residual branches
        attn_dropout=0.0,        # on attention probabilities (inside our Pallas kernels: kernels/dropout.py)
        use_bias=True,
        dtype="auto",            # compute dtype (auto: bfloat16 on GPU/TPU, float32 on CPU); params float32
        param_dtype="float32",
        remat="none",            # none | full | dots (save matmul outputs, recompute the rest)
    ))

    c.attention = ml_collections.ConfigDict(dict(
        schedule=("dense",),     # cycled over the layers, e.g. ("dense", "local_strided") as GPT-3;
                                 # "local/strided": half the heads local, half strided (per-head)
        window=256,
        stride=256,
        block=128,               # for the Sparse Transformer "fixed" pattern
        c=16,
        impl="auto",             # auto | reference | cudnn | xla | pallas
    ))

    c.data = ml_collections.ConfigDict(dict(
        path="",                 # "" = the embedded standard-library corpus; or a text file / folder
        mixture="",              # "source:weight,source:weight" (overrides path)
        tokenizer="byte",        # byte | char | bpe
        bpe_vocab_size=4096,
        val_fraction=0.1,
    ))

    c.train = ml_collections.ConfigDict(dict(
        steps=1000,
        batch_size=32,           # global sequences per step (split into grad_accum micro-batches)
        grad_accum=1,
        lr=6e-4,
        min_lr_ratio=0.1,        # cosine decays to lr * min_lr_ratio (GPT-3: 10%)
        warmup_steps=100,
        decay_steps=0,           # 0: decay over all steps
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,        # matrices only (ndim >= 2)
        grad_clip=1.0,
        log_every=10,
        eval_every=250,
        eval_batches=20,
        ckpt_every=250,
        keep_checkpoints=2,
        sample_tokens=200,       # printed at the end of a run; 0 to skip
        peak_flops=0.0,          # per device, for MFU; 0 = look the device up
    ))

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding_rules = DEFAULT_RULES
    return c
