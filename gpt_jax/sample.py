"""Sample text from a trained workdir (simple version: each token reruns the model on the window).

    python -m gpt_jax.sample --workdir runs/default --prompt "def " [--max_new_tokens 200]
        [--temperature 0.8] [--top_k 40] [--seed 0]
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from gpt_jax import checkpoint as ckpt_lib
from gpt_jax import cli
from gpt_jax import sharding as shd
from gpt_jax.errors import UserError, cli_entry
from gpt_jax.model import GPT
from gpt_jax.optim import make_optimizer
from gpt_jax.tokenizer import load_tokenizer
from gpt_jax.train import build_model
from gpt_jax.train_step import Trainer


def sample_logits(logits, key, *, temperature: float, top_k: int):
    """Draw one token per row from [batch, vocab] logits; temperature 0 is greedy."""
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1)
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


def generate(trainer: Trainer, params, prompt: list[int], max_new_tokens: int, *, temperature: float,
             top_k: int, key, stop_token: int | None = None, on_token=None) -> list[int]:
    """Autoregressive sampling without a cache: the last block_size tokens are re-read every step.

    One compiled function serves every step: the window is a fixed [1, block_size] buffer and the
    position of the last real token is an argument.
    """
    block = trainer.model.cfg.block_size

    @jax.jit
    def next_token(params, window, last, key):
        logits = trainer.apply(params, window)[0, last]
        return sample_logits(logits[None], key, temperature=temperature, top_k=top_k)[0]

    tokens = list(prompt)
    for i in range(max_new_tokens):
        context = tokens[-block:]
        window = np.zeros((1, block), np.int32)
        window[0, :len(context)] = context
        token = int(next_token(params, window, len(context) - 1, jax.random.fold_in(key, i)))
        tokens.append(token)
        if on_token:
            on_token(token)
        if token == stop_token:
            break
    return tokens[len(prompt):]


def load_for_sampling(workdir: str):
    """(trainer, params, tokenizer) from a training workdir's config, tokenizer and last checkpoint."""
    config = ckpt_lib.read_config(workdir)
    tokenizer = load_tokenizer(workdir)
    if tokenizer is None:
        raise UserError(f"workdir {workdir} has no tokenizer.json: it was not made by gpt_jax.train")
    checkpointer = ckpt_lib.Checkpointer(workdir)
    step = checkpointer.latest_step()
    if step is None:
        raise UserError(f"workdir {workdir} has no checkpoint to sample from")
    model_cfg = build_model(config, tokenizer.vocab_size)
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    trainer = Trainer(GPT(model_cfg), make_optimizer(config.train), shd.make_mesh(config.mesh),
                      config.sharding_rules)
    state = checkpointer.restore_state(step, trainer.abstract_state)
    checkpointer.close()
    return trainer, state.params, tokenizer


def sample_from_workdir(workdir: str, prompt: str, *, max_new_tokens: int, temperature: float, top_k: int,
                        seed: int = 0, stream=None) -> str:
    trainer, params, tokenizer = load_for_sampling(workdir)
    ids = [int(t) for t in tokenizer.encode(prompt)] if prompt else [tokenizer.eot_id]
    if len(ids) > trainer.model.cfg.block_size:
        ids = ids[-trainer.model.cfg.block_size:]
    on_token = None
    if stream is not None:
        stream.write(prompt)
        on_token = lambda t: (stream.write(tokenizer.decode([t])), stream.flush())  # noqa: E731
    out = generate(trainer, params, ids, max_new_tokens, temperature=temperature, top_k=top_k,
                   key=jax.random.key(seed), stop_token=tokenizer.eot_id, on_token=on_token)
    return prompt + tokenizer.decode(out)


def _define_flags(fv):
    flags.DEFINE_string("workdir", None, "a training workdir", flag_values=fv)
    flags.DEFINE_string("prompt", "", "text to continue (empty: start after an end-of-text token)", flag_values=fv)
    flags.DEFINE_integer("max_new_tokens", 200, "tokens to generate", flag_values=fv)
    flags.DEFINE_float("temperature", 0.8, "softmax temperature; 0 is greedy", flag_values=fv)
    flags.DEFINE_integer("top_k", 40, "sample among the k most likely tokens; 0 for all", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "random seed", flag_values=fv)


@cli_entry
def main(argv):
    fv = cli.parse(argv, "gpt_jax.sample", _define_flags, need_config=False)
    if not fv.workdir:
        raise UserError("--workdir is required")
    if fv.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, got {fv.max_new_tokens}")
    sample_from_workdir(fv.workdir, fv.prompt, max_new_tokens=fv.max_new_tokens, temperature=fv.temperature,
                        top_k=fv.top_k, seed=fv.seed, stream=sys.stdout)
    print()


if __name__ == "__main__":
    main()
