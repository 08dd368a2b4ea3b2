"""Sample text from a trained workdir with cached decoding (gpt_jax.generate), streaming it.

    python -m gpt_jax.sample --workdir runs/default --prompt "def " [--max-new-tokens 200]
        [--temperature 0.8] [--top-k 40] [--top-p 1.0] [--num-samples 1] [--stop STRING] [--seed 0]

Flags take hyphens or underscores (--max-new-tokens or --max_new_tokens). The prompt plus the new
tokens must fit in the model's context. With one sample the text streams as it is generated; several
samples are generated as one batch and printed one after another.
"""

from __future__ import annotations

import sys

import jax
from absl import flags

from gpt_jax import checkpoint as ckpt_lib
from gpt_jax import cli
from gpt_jax import sharding as shd
from gpt_jax.errors import UserError, cli_entry
from gpt_jax.generate import generate
from gpt_jax.model import GPT
from gpt_jax.optim import make_optimizer
from gpt_jax.tokenizer import load_tokenizer
from gpt_jax.train import build_model
from gpt_jax.train_step import Trainer


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


class _TextStream:
    """Writes decoded text as tokens arrive, holding back an unfinished multi-byte character, and
    stops writing at a stop string."""

    def __init__(self, stream, tokenizer, stop: str | None):
        self.stream, self.tokenizer, self.stop = stream, tokenizer, stop
        self.ids: list[int] = []
        self.written = 0
        self.stopped = False

    def __call__(self, step, tokens):
        if self.stopped:
            return
        self.ids.append(int(tokens[0]))
        text = self.tokenizer.decode(self.ids)
        if self.stop and self.stop in text:
            text, self.stopped = text[:text.index(self.stop)], True
        elif text.endswith("\ufffd"):
            return
        self.stream.write(text[self.written:])
        self.stream.flush()
        self.written = len(text)


def sample_from_workdir(workdir: str, prompt: str, *, max_new_tokens: int, temperature: float, top_k: int,
                        seed: int = 0, stream=None, top_p: float = 1.0, num_samples: int = 1,
                        stop: str | None = None, strict: bool = False):
    """Continue `prompt` (empty: start after an end-of-text token) and return prompt + new text.

    With num_samples > 1, returns a list of num_samples strings. Generation stops at end-of-text or
    at `stop`. When prompt + max_new_tokens exceeds the context, `strict` raises a UserError;
    otherwise generation goes on in rounds, each conditioned on the last half context of tokens.
    """
    trainer, params, tokenizer = load_for_sampling(workdir)
    cfg = trainer.model.cfg
    ids = [int(t) for t in tokenizer.encode(prompt)] if prompt else [tokenizer.eot_id]
    if len(ids) > cfg.block_size:
        raise UserError(f"the prompt is {len(ids)} tokens, longer than the model's context of {cfg.block_size}")
    if strict and len(ids) + max_new_tokens > cfg.block_size:
        raise UserError(f"the prompt ({len(ids)} tokens) plus --max-new-tokens {max_new_tokens} exceeds the "
                        f"model's context of {cfg.block_size} tokens; ask for at most "
                        f"{cfg.block_size - len(ids)} new tokens")
    streaming = stream is not None and num_samples == 1
    on_token = _TextStream(stream, tokenizer, stop) if streaming else None
    if streaming:
        stream.write(prompt)
        stream.flush()
    rows = [list(ids) for _ in range(num_samples)]
    new: list[list[int]] = [[] for _ in range(num_samples)]
    done = [False] * num_samples
    key, remaining, round_ = jax.random.key(seed), max_new_tokens, 0
    while remaining > 0 and not all(done):
        keep = [r[-(cfg.block_size // 2):] if len(r) + 1 > cfg.block_size else r for r in rows]
        room = cfg.block_size - max(len(r) for r in keep)
        if room < 1:  # a prompt that fills the whole context: keep half of it
            keep = [r[-(cfg.block_size // 2):] for r in rows]
            room = cfg.block_size - max(len(r) for r in keep)
        n = min(remaining, room)
        res = generate(cfg, params, keep, max_new_tokens=n, key=jax.random.fold_in(key, round_),
                       temperature=temperature, top_k=top_k, top_p=top_p, stop_token=tokenizer.eot_id,
                       on_token=on_token)
        for i in range(num_samples):
            if done[i]:
                continue
            got = res.tokens[i, :res.lengths[i]].tolist()
            new[i] += got
            rows[i] = keep[i] + got
            done[i] = bool(got and got[-1] == tokenizer.eot_id)
        remaining -= n
        round_ += 1
    texts = []
    for i in range(num_samples):
        text = tokenizer.decode(new[i])
        if stop and stop in text:
            text = text[:text.index(stop)]
        texts.append(prompt + text)
    return texts[0] if num_samples == 1 else texts


def _define_flags(fv):
    flags.DEFINE_string("workdir", None, "a training workdir", flag_values=fv)
    flags.DEFINE_string("prompt", None, "text to continue (left out: start after an end-of-text token)",
                        flag_values=fv)
    flags.DEFINE_integer("max_new_tokens", 200, "tokens to generate", flag_values=fv)
    flags.DEFINE_float("temperature", 0.8, "softmax temperature; 0 is greedy", flag_values=fv)
    flags.DEFINE_integer("top_k", 40, "sample among the k most likely tokens; 0 for all", flag_values=fv)
    flags.DEFINE_float("top_p", 1.0, "nucleus sampling: the smallest set of tokens with this much probability",
                       flag_values=fv)
    flags.DEFINE_integer("num_samples", 1, "independent samples (one batch)", flag_values=fv)
    flags.DEFINE_string("stop", None, "stop string: the text is cut before it", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "random seed", flag_values=fv)


@cli_entry
def main(argv):
    fv = cli.parse(argv, "gpt_jax.sample", _define_flags, need_config=False)
    if not fv.workdir:
        raise UserError("--workdir is required")
    if fv.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {fv.max_new_tokens}")
    if fv.num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {fv.num_samples}")
    if not 0 < fv.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {fv.top_p}")
    if fv.temperature < 0 or fv.top_k < 0:
        raise UserError("--temperature and --top-k must be >= 0")
    if fv.prompt == "":
        raise UserError("--prompt is empty; leave the flag out to start from an end-of-text token")
    out = sample_from_workdir(fv.workdir, fv.prompt or "", max_new_tokens=fv.max_new_tokens, temperature=fv.temperature,
                              top_k=fv.top_k, top_p=fv.top_p, seed=fv.seed, stream=sys.stdout,
                              num_samples=fv.num_samples, stop=fv.stop, strict=True)
    if fv.num_samples == 1:
        print()
    else:
        for i, text in enumerate(out):
            print(f"--- sample {i + 1} ---\n{text}")


if __name__ == "__main__":
    main()
