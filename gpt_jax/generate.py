"""Cached generation: one prefill pass over the prompts, then a `jax.lax.while_loop` of decode steps.

    result = generate(model_cfg, params, [[1, 2, 3], [4, 5]], max_new_tokens=32, key=jax.random.key(0),
                      temperature=0.8, top_k=40, top_p=0.95, stop_token=eot)
    result.tokens   # int32 [batch, max_new_tokens]; after a row's stop token: padding (stop_token or 0)
    result.lengths  # int32 [batch]: tokens generated per row, the stop token included

Prompts of different lengths need no left padding: every row keeps its own position (the prompts are
right-padded for the prefill and row b continues at position len(prompts[b])), so each row sees
exactly the positions a single-row run would. The per-pattern cache layouts are in kv_cache.py: a
local_strided layer reads window + block_size / stride cached entries per token, a dense layer
block_size.

The loop stops early once every row has produced its stop token. temperature 0 is greedy; top_k 0
and top_p 1 switch those filters off. `on_token(step, tokens[batch])` (optional) is called from inside
the compiled loop as each token is produced, in order: it is how the sample CLI streams text.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax.model import GPT, GPTConfig, init_cache
from kernels.patterns import lcm_multiple


@dataclasses.dataclass
class GenerationResult:
    tokens: np.ndarray   # int32 [batch, max_new_tokens]
    lengths: np.ndarray  # int32 [batch]


def sample_logits(logits, key, *, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """Draw one token per row from [batch, vocab] logits; temperature 0 is greedy.

    top_k keeps the k most likely tokens; top_p keeps the smallest set of most likely tokens whose
    probability reaches p (nucleus sampling; the most likely token is always kept)."""
    logits = logits.astype(jnp.float32)
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        kept = jnp.where(before < top_p, sorted_logits, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def check_room(model_cfg: GPTConfig, prompt_lengths, max_new_tokens: int) -> None:
    """ValueError unless every prompt is non-empty and prompt + max_new_tokens fits in the context."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    for n in prompt_lengths:
        if n < 1:
            raise ValueError("empty prompt: generation needs at least one token to condition on")
        if n + max_new_tokens > model_cfg.block_size:
            raise ValueError(f"prompt of {n} tokens + {max_new_tokens} new tokens exceeds the model's context "
                             f"of {model_cfg.block_size} tokens")


def pad_prompts(model_cfg: GPTConfig, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to a length every layer's pattern accepts (a multiple of the schedule's multiple,
    at most block_size). Returns (tokens [batch, P] int32, lengths [batch] int32)."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    # Round up to a multiple of 16 as well: fewer distinct shapes, fewer recompilations.
    q = math.lcm(lcm_multiple(model_cfg.patterns), 16)
    P = min(-(-int(lengths.max()) // q) * q, model_cfg.block_size)
    tokens = np.zeros((len(prompts), P), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    return tokens, lengths


@functools.partial(jax.jit, static_argnames=("model_cfg", "max_new_tokens", "temperature", "top_k", "top_p",
                                             "stop_token", "on_token"))
def _generate(params, tokens, lengths, key, *, model_cfg, max_new_tokens, temperature, top_k, top_p,
              stop_token, on_token):
    model = GPT(model_cfg)
    batch = tokens.shape[0]
    logits, cache = model.apply({"params": params}, tokens, cache=init_cache(model_cfg, batch), lengths=lengths)
    pad = 0 if stop_token is None else stop_token
    out = jnp.full((batch, max_new_tokens), pad, jnp.int32)
    done = jnp.zeros((batch,), bool)
    n_out = jnp.zeros((batch,), jnp.int32)

    def cond(state):
        i, _, _, _, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, logits, cache, out, done, n_out = state
        token = sample_logits(logits, jax.random.fold_in(key, i), temperature=temperature, top_k=top_k,
                              top_p=top_p)
        token = jnp.where(done, pad, token)
        if on_token is not None:
            jax.debug.callback(on_token, i, token, ordered=True)
        out = out.at[:, i].set(token)
        n_out = n_out + (~done).astype(jnp.int32)
        if stop_token is not None:
            done = done | (token == stop_token)
        # The forward after the last token is wasted but keeps one loop body; positions stay in range
        # because prompt + max_new_tokens <= block_size.
        logits, cache = model.apply({"params": params}, token[:, None], cache=cache)
        return i + 1, logits, cache, out, done, n_out

    state = (jnp.zeros((), jnp.int32), logits, cache, out, done, n_out)
    _, _, _, out, _, n_out = jax.lax.while_loop(cond, body, state)
    return out, n_out


def generate(model_cfg: GPTConfig, params, prompts: list[list[int]], *, max_new_tokens: int, key,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, stop_token: int | None = None,
             on_token=None) -> GenerationResult:
    """Sample max_new_tokens tokens after each prompt (a list of token-id lists, lengths may differ).

    Raises ValueError for an empty prompt or prompt + max_new_tokens > block_size."""
    if not prompts:
        raise ValueError("no prompts given")
    prompts = [[int(t) for t in p] for p in prompts]
    check_room(model_cfg, [len(p) for p in prompts], max_new_tokens)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0 or temperature < 0:
        raise ValueError(f"top_k and temperature must be >= 0, got {top_k} and {temperature}")
    tokens, lengths = pad_prompts(model_cfg, prompts)
    out, n_out = _generate(params, tokens, lengths, key, model_cfg=model_cfg, max_new_tokens=int(max_new_tokens),
                           temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                           stop_token=None if stop_token is None else int(stop_token), on_token=on_token)
    return GenerationResult(tokens=np.asarray(out, np.int32), lengths=np.asarray(n_out, np.int32))


def cached_logits(model_cfg: GPTConfig, params, prompts: list[list[int]], continuation: np.ndarray):
    """Logits from prefill + teacher-forced decode: for tests and tools that compare against a full
    forward pass. continuation [batch, n] int32 is fed one token per step after each prompt.
    Returns [batch, n + 1, vocab] float32: the prefill's logits, then each step's."""
    tokens, lengths = pad_prompts(model_cfg, prompts)
    check_room(model_cfg, lengths.tolist(), continuation.shape[1])

    @jax.jit
    def run(params, tokens, lengths, continuation):
        model = GPT(model_cfg)
        logits, cache = model.apply({"params": params}, tokens, cache=init_cache(model_cfg, tokens.shape[0]),
                                    lengths=lengths)

        def step(cache, tok):
            logits, cache = model.apply({"params": params}, tok[:, None], cache=cache)
            return cache, logits.astype(jnp.float32)

        _, rest = jax.lax.scan(step, cache, continuation.T)
        return jnp.concatenate([logits.astype(jnp.float32)[:, None], rest.transpose(1, 0, 2)], axis=1)

    return np.asarray(run(params, tokens, lengths, jnp.asarray(continuation, jnp.int32)))
