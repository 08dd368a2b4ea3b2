"""Stage 1: supervised fine-tuning on prompt/response demonstrations, loss on response tokens only.

Starts from align.init_workdir (a gpt_jax.train workdir) or from a fresh model; resumable like
pretraining (the rows of step s depend only on (seed, s)). Packing: see gpt_jax/align/data.py.
"""

from __future__ import annotations

import os

import jax

from gpt_jax import sharding as shd
from gpt_jax.metrics import MetricsWriter
from gpt_jax.model import GPT, count_params
from gpt_jax.optim import make_optimizer
from gpt_jax.tokenizer import load_tokenizer

from gpt_jax.align import common
from gpt_jax.align.config import optimizer_config
from gpt_jax.align.data import batch_indices, load_demos, sft_rows
from gpt_jax.align.losses import masked_cross_entropy
from gpt_jax.align.models import AlignTrainer


def sft_loss(trainer, params, batch, dropout_key):
    tokens = batch["tokens"]
    logits = trainer.apply(params, tokens[:, :-1], dropout_key=dropout_key)
    return masked_cross_entropy(logits, tokens[:, 1:], batch["mask"]), {}


def run_sft(config, workdir: str, *, stop_at_step: int | None = None) -> common.StageResult:
    c = config.sft
    demos = load_demos(common.data_path(config, "sft_data"))
    tok = load_tokenizer(workdir) if os.path.isdir(workdir) else None
    tok = tok or common.sft_tokenizer(config, [p + r for p, r in demos])
    model_cfg, signature = common.model_config(config, tok)
    mesh = common.make_mesh(config)
    shd.check_batch(c.batch_size, c.grad_accum, mesh)
    stage_dir = common.check_stage_dir(workdir, "sft", signature, c.keep_checkpoints)
    tokens, mask = sft_rows(tok, demos, model_cfg.block_size, pack=c.pack, seed=config.seed)

    trainer = AlignTrainer(GPT(model_cfg), make_optimizer(optimizer_config(c, c.steps)), mesh,
                           config.sharding_rules, sft_loss, grad_accum=c.grad_accum)
    if stage_dir.latest is not None:
        checkpointer, state = stage_dir.resume(config, tok, trainer.abstract_state)
    elif config.align.init_workdir:
        gpt_abstract, _ = common.abstract_states(config, model_cfg, mesh)
        init, _ = common.restore_previous(config.align.init_workdir, "align.init_workdir", ("pretrain", "sft"),
                                          signature, gpt_abstract)
        state = trainer.state_from_params(init.params)
        checkpointer = stage_dir.create(config, tok)
    else:
        state = trainer.init_state(jax.random.key(config.seed))
        checkpointer = stage_dir.create(config, tok)
    start = int(state.step)
    common.log(f"sft: {len(demos)} demonstrations packed into {len(tokens)} rows of {model_cfg.block_size + 1} "
               f"tokens ({'packed' if c.pack else 'one per row'}; {mask.mean():.0%} of targets are response "
               f"tokens); model {count_params(state.params) / 1e6:.2f}M parameters")

    def batch_at(step):
        rows = batch_indices(len(tokens), c.batch_size, config.seed, step)
        return jax.device_put({"tokens": tokens[rows], "mask": mask[rows]}, trainer.batch_sharding)

    def save(step, state):
        checkpointer.save(step, state, {"model_signature": signature, "stage": "sft", "data": {"next_step": step}})

    writer = MetricsWriter(workdir)
    try:
        state, step, interrupted = common.run_steps(
            name="sft", trainer=trainer, state=state, start=start, steps=c.steps, batch_at=batch_at,
            writer=writer, log_every=c.log_every, ckpt_every=c.ckpt_every, save=save, seed=config.seed,
            stop_at_step=stop_at_step)
        if not interrupted and stage_dir.latest != c.steps:
            save(step, state)
        checkpointer.wait()
    finally:
        writer.close()
        checkpointer.close()
    return common.StageResult(step=step, interrupted=interrupted, workdir=workdir)

